"""Convert a pretraining, MoCo or torchvision ResNet checkpoint to Detectron2 (or torchvision) weights.
Needs only torch + numpy (it runs on any stack): the rename rules follow MoCo's
detection/convert-pretrain-to-detectron2.py. The command is `python tools/convert_checkpoint.py`:

    python tools/convert_checkpoint.py checkpoint.pth backbone.pkl [--format d2|torchvision]

Input is read with the suite's safe loader (pretrain/safe_load.py: torch.load weights_only=True,
a .pkl through the restricted unpickler), so no file runs code; the backbone is found by
pretrain/weights.py (the one table of checkpoint layouts); non-finite tensors are refused.

A CIFAR-stem backbone (model.stem=cifar: 3x3 stride-1 conv1, no max-pool) is refused for
Detectron2: its ResNet stem is always 7x7 stride 2 with a max-pool, so the weights would load into
a different network. It may still be written as a torchvision state dict (build the ResNet with
pretrain.model.build_backbone(arch, stem="cifar")).
"""
import argparse
import collections
import os
import pickle
import re
import sys

import torch

from pretrain import safe_load
from pretrain.weights import BackboneError, backbone_of, backbone_stem
from suite import contract

# torchvision ResNet name -> Detectron2 ResNet name, applied in order (MoCo's table).
RENAME_RULES = (
    (r"^conv1\.", "stem.conv1."),
    (r"^bn1\.", "stem.conv1.norm."),
    (r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}."),
    (r"\.bn(\d)\.", r".conv\1.norm."),
    (r"\.downsample\.0\.", ".shortcut."),
    (r"\.downsample\.1\.", ".shortcut.norm."),
)

# depth -> (convs per block, blocks per stage): torchvision's resnet18..152.
ARCHS = {
    18: (2, (2, 2, 2, 2)),
    34: (2, (3, 4, 6, 3)),
    50: (3, (3, 4, 6, 3)),
    101: (3, (3, 4, 23, 3)),
    152: (3, (3, 8, 36, 3)),
}
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


class ConversionError(Exception):
    """Bad input: the message names the file and the fix."""


def load_checkpoint(path):
    """The checkpoint through pretrain.safe_load: tensors and plain containers only, never code."""
    if str(path).endswith(".pkl"):  # read (safely) only to say what it is
        try:
            obj = safe_load.load_pickle(path)
        except safe_load.WeightsFileError as e:
            if e.unsafe or not os.path.isfile(path):
                raise ConversionError(str(e)) from None
            obj = None
        n = len(obj["model"]) if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else 0
        what = f"Detectron2 weights ({n} arrays)" if n else "a .pkl"
        raise ConversionError(f"{path}: {what}, Detectron2's format already (use it as "
                              "MODEL.WEIGHTS); convert the .pth checkpoint it came from instead")
    return _read(safe_load.load_torch, path)


def _read(loader, path):
    try:
        return loader(path)
    except safe_load.WeightsFileError as e:
        raise ConversionError(str(e)) from None


def expected_keys(state):
    """All torchvision key names of the ResNet whose block layout `state` has, and its depth."""
    convs = 3 if "layer1.0.conv3.weight" in state else 2
    blocks = tuple(
        1 + max((int(m.group(1)) for k in state for m in [re.match(rf"layer{s}\.(\d+)\.", k)] if m),
                default=-1)
        for s in (1, 2, 3, 4)
    )
    depth = next((d for d, arch in ARCHS.items() if arch == (convs, blocks)), None)
    if depth is None:
        return None, None
    keys = ["conv1.weight"] + [f"bn1.{t}" for t in BN_TENSORS]
    for s, n in enumerate(blocks, start=1):
        for b in range(n):
            p = f"layer{s}.{b}."
            for c in range(1, convs + 1):
                keys += [f"{p}conv{c}.weight"] + [f"{p}bn{c}.{t}" for t in BN_TENSORS]
            if b == 0 and (s > 1 or convs == 3):  # Bottleneck res2 widens 64 -> 256 too
                keys += [f"{p}downsample.0.weight"] + [f"{p}downsample.1.{t}" for t in BN_TENSORS]
    return depth, keys


def check_finite(backbone, path):
    """Refuse NaN/Inf weights: Detectron2 would load them and fail (or report nonsense) much later."""
    bad = [k for k, v in backbone.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ConversionError(
            f"{path}: {len(bad)} of {len(backbone)} backbone tensors hold NaN/Inf (e.g. "
            f"{', '.join(bad[:3])}); the run diverged before this checkpoint: convert an earlier one")


def check_complete(backbone, path):
    """Refuse a backbone that misses any tensor: Detectron2 would silently leave it random."""
    depth, keys = expected_keys(backbone)
    if depth is None:
        raise ConversionError(
            f"{path}: the layer1..layer4 blocks match no ResNet-18/34/50/101/152 "
            "(a truncated checkpoint or another architecture)"
        )
    missing = [k for k in keys if k not in backbone]
    if missing:
        raise ConversionError(
            f"{path}: ResNet-{depth} checkpoint lacks {len(missing)} backbone tensors "
            f"(e.g. {', '.join(missing[:3])}); re-export it from the full model"
        )
    return depth


def to_detectron2_name(name):
    for pattern, repl in RENAME_RULES:
        name = re.sub(pattern, repl, name)
    return name


def to_detectron2(backbone):
    """Detectron2's pickle: numpy arrays under Detectron2 names; BN step counters are not weights."""
    model = {
        to_detectron2_name(k): v.numpy()
        for k, v in backbone.items()
        if not k.endswith("num_batches_tracked")
    }
    return {"model": model, "__author__": "sane-transfer", "matching_heuristics": True}


def convert(src, dst, fmt="d2", log=print):
    """Read `src`, check it holds a whole ResNet, write `dst`; returns the written object."""
    checkpoint = load_checkpoint(src)
    try:
        found = backbone_of(checkpoint, src)
    except BackboneError as e:
        raise ConversionError(str(e)) from None
    backbone = found.state
    depth = check_complete(backbone, src)
    check_finite(backbone, src)
    stem, why = backbone_stem(checkpoint, backbone)
    if stem != "imagenet" and fmt == "d2":
        raise ConversionError(
            f"{src}: a CIFAR-stem ResNet ({why}) has no Detectron2 equivalent (its stem is a 7x7 "
            "stride-2 conv with max-pool): pretrain with model.stem=imagenet for detection, or "
            "write --format torchvision")
    out = to_detectron2(backbone) if fmt == "d2" else backbone
    write(out, dst, fmt)
    n = len(out["model"]) if fmt == "d2" else len(out)
    log(f"{src}: {found.source}, ResNet-{depth}" + (f", CIFAR stem ({why}): build it with "
                                               "conv1 3x3 stride 1 and no max-pool" if stem != "imagenet" else ""))
    log(f"mapped {n} tensors to {'Detectron2' if fmt == 'd2' else 'torchvision'} names -> {dst}")
    if found.skipped:
        log(f"skipped {len(found.skipped)} non-backbone entries: {summarize(found.skipped, found.prefix)}")
    return out


def write(obj, path, fmt):
    """The output, atomically (suite.contract: a crash leaves no partial file; mode as open() gives,
    readable by the group on a shared cluster): Detectron2's pickle, or torch.save for torchvision."""
    dump = pickle.dump if fmt == "d2" else torch.save
    try:
        contract.write_atomic(path, lambda f: dump(obj, f), mkdir=True)
    except OSError as e:
        raise ConversionError(f"{path}: cannot write it ({e.strerror or e}); pick an output path in a "
                              "writable folder with free space") from None


def summarize(keys, prefix):
    """'encoder_k (120), encoder_q.fc (4), queue (1)': the skipped modules, with tensor counts."""
    groups = collections.Counter(
        prefix + k[len(prefix):].split(".")[0] if prefix and k.startswith(prefix) else k.split(".")[0]
        for k in keys
    )
    return ", ".join(f"{name} ({n})" for name, n in sorted(groups.items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="pretraining / MoCo / torchvision checkpoint (.pth)")
    parser.add_argument("output", help="output file (.pkl for Detectron2)")
    parser.add_argument("--format", choices=("d2", "torchvision"), default="d2")
    args = parser.parse_args(argv)
    try:
        convert(args.input, args.output, args.format)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
