"""Detectron2's checkpointer with the suite's safe loader: every weights file train_net opens
(MODEL.WEIGHTS, the --resume snapshot, --eval-only) goes through pretrain.safe_load, so none runs
code; the backbone must load whole; snapshots are written atomically; a damaged one falls back.

- `.pth` (and pycls `.pyth`): torch.load(weights_only=True). `.pkl` (Detectron2, MoCo, Caffe2 model
  zoo): the restricted unpickler of pretrain/safe_load.py (dicts, lists, str, numbers, numpy arrays).
- Every weight must be a finite numeric array.
- Every backbone tensor of the model (stem, res2..res5, wherever the architecture keeps them:
  `backbone.`, `backbone.bottom_up.`, the C4 head's `roi_heads.res5.`) must load, with its shape;
  only the heads, the FPN layers and the MoCo protocol's new `roi_heads.res5.norm` may be missing.
  An empty MODEL.WEIGHTS (the random-init baseline) loads nothing and is not checked.
- --resume: `last_checkpoint` names the snapshot; if it is empty or names a missing, truncated or
  non-finite file, the newest other readable `model_*.pth` of OUTPUT_DIR is used (a warning names
  both); if there is none, one line says so. A refused (unsafe) file never falls back.
"""
import logging
import os
import re

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer

from pretrain.safe_load import WeightsFileError, load_pickle, load_torch
from suite import contract

# the ResNet inside a detector: C4 (backbone.res2-4 + roi_heads.res5), FPN (backbone.bottom_up.)
BACKBONE_KEY = re.compile(r"^(backbone\.(bottom_up\.)?|roi_heads\.)(stem|res[2-5])\.")
NEW_IN_PROTOCOL = re.compile(r"^roi_heads\.res5\.norm\.")  # Res5ROIHeadsExtraNorm's extra BN
SNAPSHOT = contract.D2_SNAPSHOT


class WeightsError(ValueError):
    """A weights file train_net cannot use: one line naming the file, the reason and the fix."""

    def __init__(self, message, unsafe=False):
        super().__init__(message)
        self.unsafe = unsafe


def is_backbone_key(key):
    return (bool(BACKBONE_KEY.match(key)) and not NEW_IN_PROTOCOL.match(key)
            and not key.endswith("num_batches_tracked"))


def _nonfinite(weights):
    bad = []
    for k, v in weights.items():
        if isinstance(v, np.ndarray) and v.dtype.kind == "f" and not np.isfinite(v).all():
            bad.append(k)
        elif torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
            bad.append(k)
    return bad


def check_weights(data, filename):
    """`data["model"]` must be a dict of finite numeric arrays / tensors."""
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not model:
        raise WeightsError(f"{filename}: holds no weights (expected a dict with 'model': "
                           "{name: array}); pass a .pkl written by tools/convert_checkpoint.py "
                           "or a Detectron2 checkpoint")
    odd = [k for k, v in model.items() if not (torch.is_tensor(v) or (
        isinstance(v, np.ndarray) and v.dtype.kind in "fiub"))]
    if odd:
        raise WeightsError(f"{filename}: '{odd[0]}' (and {len(odd) - 1} more) is not a numeric "
                           "array; pass a .pkl written by tools/convert_checkpoint.py")
    bad = _nonfinite(model)
    if bad:
        raise WeightsError(f"{filename}: {len(bad)} of {len(model)} tensors hold NaN/Inf (e.g. "
                           f"{', '.join(bad[:3])}); convert an earlier, finite checkpoint")


class SafeCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose file loading is pretrain.safe_load's, which refuses a
    backbone that does not fit, saves atomically and resumes past a damaged snapshot."""

    def _load_file(self, filename):
        self.logger.info(f"safe loading {filename}")
        if filename.endswith(".pkl"):
            data = _safe(load_pickle, filename)
            if not isinstance(data, dict):
                raise WeightsError(f"{filename}: not a weights file (a pickled {type(data).__name__})")
            if not ("model" in data and "__author__" in data):  # Caffe2 / Detectron1 model zoo
                blobs = data.get("blobs", data)
                blobs = {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")} \
                    if isinstance(blobs, dict) else None
                data = {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}
        elif filename.endswith(".pyth"):  # pycls, as Detectron2 reads it (but safely)
            data = _safe(load_torch, filename)
            state = data.get("model_state") if isinstance(data, dict) else None
            if not isinstance(state, dict):
                raise WeightsError(f"{filename}: a pycls .pyth must hold 'model_state'")
            data = {"model": {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
                    "__author__": "pycls", "matching_heuristics": True}
        else:
            data = super()._load_file(filename)  # Detectron2's post-processing; reads via _torch_load
        check_weights(data, filename)
        self._loading = filename
        return data

    def _torch_load(self, f):
        data = _safe(load_torch, f)
        if not isinstance(data, dict):
            raise WeightsError(f"{f}: not a checkpoint (a saved {type(data).__name__}, not a dict)")
        return data

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        missing = [k for k in incompatible.missing_keys if is_backbone_key(k)]
        shapes = [(k, a, b) for k, a, b in incompatible.incorrect_shapes if is_backbone_key(k)]
        if missing or shapes:
            # align_and_update_state_dicts drops mis-shaped tensors: they show up as missing too
            what = []
            if missing:
                what.append(f"{len(missing)} backbone tensors of the model are not in it "
                            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
            if shapes:
                k, a, b = shapes[0]
                what.append(f"{len(shapes)} have another shape ({k}: {tuple(a)} in the file, "
                            f"{tuple(b)} in the model)")
            raise WeightsError(f"{self._loading}: {'; '.join(what)}: these weights do not fit this "
                               "config's backbone (e.g. ResNet-50 weights for an R18 config): use "
                               "the config of the weights' depth, or convert the matching backbone")
        return incompatible

    # -- writing: atomic, so a job killed mid-save leaves the previous snapshot intact
    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        contract.write_atomic(save_file, lambda f: torch.save(data, f), fsync=True)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        contract.write_text(os.path.join(self.save_dir, contract.D2_LAST_CHECKPOINT), last_filename_basename)

    # -- resuming: past a damaged snapshot to the newest good one
    def resume_or_load(self, path, *, resume=True):
        if resume and self.has_checkpoint():
            return self.load(self.resume_file())
        return self.load(path, checkpointables=[])

    def resume_file(self):
        """The snapshot --resume loads: last_checkpoint's, else the newest readable one."""
        tag = os.path.join(self.save_dir, contract.D2_LAST_CHECKPOINT)
        with open(tag) as f:
            named = f.read().strip()
        others = sorted((n for n in os.listdir(self.save_dir) if SNAPSHOT.match(n) and n != named),
                        key=lambda n: (SNAPSHOT.match(n).group(1) == "final", n), reverse=True)
        damaged = [] if named else [f"{tag} is empty"]
        for name in ([named] if named else []) + others:
            filename = os.path.join(self.save_dir, name)
            try:
                self._probe(filename)
            except WeightsError as e:
                if e.unsafe:
                    raise
                damaged.append(str(e))
                continue
            for reason in damaged:
                self.logger.warning(f"{reason}; resuming from {filename} instead")
            return filename
        raise WeightsError(f"{'; '.join(damaged)}; no other readable snapshot (model_*.pth) in "
                           f"{self.save_dir}: remove {tag} to start over from MODEL.WEIGHTS, or "
                           "restore the snapshot")

    def _probe(self, filename):
        if not os.path.isfile(filename):
            raise WeightsError(f"{filename}: no such file (named by last_checkpoint)")
        data = _safe(load_torch, filename)
        check_weights(data if isinstance(data, dict) else {}, filename)


def _safe(loader, filename):
    try:
        return loader(filename)
    except WeightsFileError as e:
        raise WeightsError(str(e), unsafe=e.unsafe) from None


def quiet_load(cfg, resume):
    """Build the model of `cfg` on the CPU and load what train_net would (MODEL.WEIGHTS, or the
    --resume snapshot) through SafeCheckpointer, with Detectron2's logging muted: raises
    WeightsError before any process, directory or training starts."""
    from detectron2.modeling import build_model

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        model = build_model(cfg)
        SafeCheckpointer(model, cfg.OUTPUT_DIR, save_to_disk=False).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=resume)
    finally:
        logging.disable(previous)
