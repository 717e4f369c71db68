"""The one safe loader of weights files: `.pth` through torch.load(weights_only=True), Detectron2 /
MoCo `.pkl` through a restricted unpickler. Nothing a weights file holds can run code.

Standard library + numpy at import (torch only inside `load_torch`), so the converter, the
pretraining resume, the linear probe and transfer/ (Detectron2's checkpointer) all share it.

Allowed in a `.pkl` (the types Detectron2 and MoCo weights hold, nothing else):
dicts, lists, tuples, str, bytes, numbers, bool, None (pickle opcodes, no import), and the globals
  collections.OrderedDict
  numpy.ndarray, numpy.dtype and numpy's own pickle helpers `_reconstruct` (arrays, protocol <= 4),
  `_frombuffer` (arrays, protocol 5) and `scalar` (numpy scalars), under numpy.core or numpy._core
  _codecs.encode (how a Python 2 / protocol-2 pickle spells bytes)
Any other global (os.system, builtins.eval, a class of some package ...) is refused by name, and
so are persistent ids; an array of dtype object is refused after loading (weights are numbers).
"""
import collections
import os
import pickle

import numpy as np

def _numpy_helpers():
    """{(module, name): numpy's pickle helper}: numpy 1.x pickles name numpy.core, numpy 2.x
    numpy._core, and a file may come from either."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray, numeric
    out = {}
    for pkg in ("numpy.core", "numpy._core"):
        out[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct
        out[(f"{pkg}.multiarray", "scalar")] = multiarray.scalar
        out[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer
    return out


def _latin1(text, encoding):
    """_codecs.encode as protocol-2 pickles call it for bytes; only that one codec, so no codec
    lookup (which imports modules) is reachable from a file."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): lambda text, encoding="utf-8": _latin1(text, encoding),
    **_numpy_helpers(),
}


class WeightsFileError(ValueError):
    """A weights file that cannot be used: the message is one line naming the file, the reason
    and the fix. `unsafe` is True when the file holds something safe loading refuses (code)."""

    def __init__(self, message, unsafe=False):
        super().__init__(message)
        self.unsafe = unsafe


class _Refused(pickle.UnpicklingError):
    """A global or persistent id outside the allow-list; str() names it."""


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only ALLOWED_GLOBALS (Python docs, "Restricting Globals")."""

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"the global {module}.{name}") from None

    def persistent_load(self, pid):
        raise _Refused("a persistent id")


def _check_size(path):
    if not os.path.isfile(path):
        raise WeightsFileError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise WeightsFileError(f"{path}: the file is empty (0 bytes): it was truncated; copy or "
                               "write it again")


def _object_arrays(obj, depth=0):
    """True if any numpy array inside `obj` (nested containers) has dtype object."""
    if isinstance(obj, np.ndarray):
        return obj.dtype.hasobject
    if depth > 8:
        return False
    if isinstance(obj, dict):
        obj = obj.values()
    if isinstance(obj, (list, tuple, type({}.values()))):
        return any(_object_arrays(v, depth + 1) for v in obj)
    return False


def load_pickle(path, encoding="latin1"):
    """A Detectron2 / MoCo / Caffe2 weights `.pkl`, unpickled with RestrictedUnpickler.

    `encoding` as Detectron2 uses it (Python 2 pickles of the Caffe2 model zoo). Raises
    WeightsFileError (unsafe=True for a refused global) with one line naming the file.
    """
    path = str(path)
    _check_size(path)
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding=encoding).load()
    except _Refused as e:
        raise WeightsFileError(
            f"{path}: refused: its pickle calls {e}, and a weights file may hold only dicts, "
            "lists, tuples, str, numbers and numpy arrays (loading it could run code); "
            "get the weights from a source you trust, or re-save them as plain arrays",
            unsafe=True) from None
    except pickle.UnpicklingError as e:
        raise WeightsFileError(f"{path}: not a readable pickle ({e}): the file is truncated or "
                               "not a weights file; copy or convert it again") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, RecursionError) as e:
        reason = str(e) or type(e).__name__
        raise WeightsFileError(f"{path}: not a readable pickle ({reason}): the file is truncated "
                               "or not a weights file; copy or convert it again") from None
    if _object_arrays(obj):
        raise WeightsFileError(f"{path}: refused: it holds a numpy array of Python objects, and "
                               "weights are numbers; re-save them as numeric arrays", unsafe=True)
    return obj


def load_torch(path):
    """A `.pth` / `.pt` file through torch.load(weights_only=True, map_location cpu): tensors and
    plain containers only. Raises WeightsFileError (unsafe=True when the file holds objects)."""
    import torch

    path = str(path)
    _check_size(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, or a pickle with objects
        text = str(e).strip()
        if "Weights only load failed" in text:
            # torch 2.3: "... WeightsUnpickler error: Unsupported class posix.system"; later
            # versions: "Unsupported global: GLOBAL posix.system was not an allowed global ..."
            detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0]
            raise WeightsFileError(
                f"{path}: refused: safe loading (torch.load weights_only=True) does not allow "
                f"what it holds ({detail[:160]}); loading it could run code: re-save it as "
                "torch.save({'state_dict': model.state_dict()}, path) from a source you trust",
                unsafe=True) from None
        first = text.splitlines()[0] if text else type(e).__name__
        raise WeightsFileError(f"{path}: cannot be read as a torch checkpoint ({first[:160]}): the "
                               "file is truncated or not a .pth; copy or write it again") from None
