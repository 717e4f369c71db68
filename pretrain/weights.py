"""A ResNet backbone out of any checkpoint the suite reads, by one short table of where it sits:
this suite's pretraining checkpoint, MoCo's, a DistributedDataParallel or a plain torchvision state
dict. Used by the model, the linear probe and the converter; torch only (the converter's rule)."""
from dataclasses import dataclass

import torch

from pretrain.safe_load import load_torch

# The tensor dict of a checkpoint: the first of these keys that holds a dict (ours, MoCo's
# main_moco), else the file itself when it is one.
CONTAINERS = ("model", "state_dict")
# The backbone's key prefix inside it, most specific first: the first under which a conv1.weight
# sits wins; keys under it minus the head (HEAD) are the backbone.
PREFIXES = (
    ("module.encoder_q.", "MoCo v1/v2 checkpoint (module.encoder_q.)"),
    ("encoder_q.", "SANE/MoCo pretraining checkpoint (encoder_q.)"),
    ("module.", "DistributedDataParallel ResNet state dict (module.)"),
    ("", "torchvision ResNet / plain backbone state dict"),
)
HEAD = "fc."  # the projection head (ours, MoCo's) or the classifier


class BackboneError(ValueError):
    """A checkpoint without a recognisable ResNet backbone: one line naming the file."""


@dataclass(frozen=True)
class Backbone:
    state: dict       # torchvision names, no fc.*, CPU tensors
    skipped: tuple    # the checkpoint's other keys: head, momentum encoder, queue
    prefix: str
    source: str       # what kind of checkpoint it was (PREFIXES)


def state_dict_of(checkpoint, path):
    """The tensor dict inside a checkpoint (CONTAINERS), or BackboneError."""
    if isinstance(checkpoint, dict):
        for key in CONTAINERS:
            if isinstance(checkpoint.get(key), dict):
                return checkpoint[key]
        if checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
            return checkpoint
    raise BackboneError(f"{path}: unknown checkpoint format (expected a dict with 'model' or "
                        "'state_dict', or a ResNet state dict)")


def backbone_of(checkpoint, path):
    """The Backbone of a loaded checkpoint (`path` names it in errors)."""
    state = state_dict_of(checkpoint, path)
    for prefix, source in PREFIXES:
        if prefix + "conv1.weight" in state:
            break
    else:
        raise BackboneError(f"{path}: unknown checkpoint format: no ResNet 'conv1.weight' under any of "
                            f"{[p for p, _ in PREFIXES[:-1]]} or at the top level")
    backbone, skipped = {}, []
    for k, v in state.items():
        name = k[len(prefix):]
        if k.startswith(prefix) and torch.is_tensor(v) and not name.startswith(HEAD):
            backbone[name] = v.detach().cpu()
        else:
            skipped.append(k)
    return Backbone(backbone, tuple(skipped), prefix, source)


def read_backbone(path):
    """(Backbone, the checkpoint dict) of a `.pth` file, read safely (pretrain.safe_load:
    weights_only). Raises safe_load.WeightsFileError or BackboneError."""
    checkpoint = load_torch(path)
    return backbone_of(checkpoint, path), checkpoint


def backbone_stem(checkpoint, state):
    """(stem, why): the `model.stem` of a pretraining checkpoint's saved config, else `cifar` for a
    3x3 conv1 (the ImageNet stem's conv1 is 7x7), else `imagenet`."""
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    model = config.get("model") if isinstance(config, dict) else None
    stem = model.get("stem") if isinstance(model, dict) else None
    if isinstance(stem, str):
        return stem, f"its config's model.stem={stem}"
    if tuple(state["conv1.weight"].shape[-2:]) == (3, 3):
        return "cifar", "conv1 is 3x3"
    return "imagenet", "conv1 is not 3x3"
