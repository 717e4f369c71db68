"""Pretraining config: the defaults below (= SANE-Single, ResNet-50, ImageNet), a YAML file
on top, then `key=value` overrides with dotted keys; types come from the defaults.

`method` names a preset of the recipe switches (METHODS): it sets slr.enabled, slr.p, slr.q,
mm.enabled and model.in_batch_negatives, so a config names its method and need not set them.
A switch set in the same layer as the method, or a later one (file < command line), must agree
with it (one clear error otherwise); a method named on the command line replaces the switches
of the file beneath it (`--config sane.yaml method=mocov2` is MoCo v2)."""
import copy
import difflib
from pathlib import Path

import yaml

from pretrain.utils import UserError

DEFAULTS = {
    "method": "sane",            # a preset of the recipe switches (METHODS below)
    "output_dir": "",
    "epochs": 200,
    "seed": 0,
    "device": "auto",            # auto (CUDA when available) | cpu | cuda
    "cpu_threads": 0,            # >0: torch.set_num_threads on CPU (0 = PyTorch's default)
    "deterministic": False,      # bit-exact mode: deterministic kernels, num_workers 0
    "max_iters_this_run": 0,     # >0: stop (and checkpoint) after this many steps; resume later
    "compile": False,            # torch.compile the encoders
    "amp": "bf16",               # bf16 | none; autocast on CUDA only
    "channels_last": True,       # CUDA only
    "data": {
        "root": "",              # ImageFolder root: train/<class>/*.jpg, optional val/
                                 # (cifar10 / cifar100: the folder holding cifar-10-batches-py/)
        "format": "imagefolder",  # imagefolder | cifar10 | cifar100 (torchvision's python batches)
        "pipeline": "cpu",       # cpu | gpu (pretrain.gpu_augment)
        "gpu_decoder": "torchvision",  # gpu pipeline's JPEG decoder: torchvision (nvJPEG) | dali
        "crop": 224,             # q / k crop size
        "scale": [0.2, 1.0],     # RandomResizedCrop scale of q, k (and MM crops of size `crop`)
        "small_scale": [0.086, 0.429],  # scale of smaller MM crops (CLSA)
        "strong_mm": False,      # RandAugment(n=5, m=10) on the MM crops ("strong")
        "batch_size": 256,       # total over all processes
        "num_workers": 8,        # per process
    },
    "model": {
        "arch": "resnet50",
        "stem": "imagenet",      # imagenet (7x7/2 conv + max-pool) | cifar (3x3/1 conv, no max-pool)
        "dim": 128,              # feature dim of the head output
        "head_depth": 2,         # linear layers in the MLP head (MoCo v2: 2; paper: 3)
        "head_hidden": 0,        # hidden width; 0 = backbone width (2048 for ResNet-50)
        "queue": 65536,          # b
        "m": 0.999,              # EMA momentum of g_ξ
        "tau": 0.2,              # τ
        "in_batch_negatives": True,  # B̄ includes in-batch keys; False = MoCo v2 exactly
        "shuffle_bn": True,
        "shuffle_bn_splits": 2,  # world size 1: key BN over this many shuffled sub-batches
        "sync_bn": False,
    },
    "slr": {
        "enabled": True,
        "p": True,
        "q": True,
        "tau_prime": 1.0,        # τ′
        "mu_start": 0.5,         # m1
        "mu_end": 10.0,          # m2
        "vanilla": "auto",       # labels of the vanilla term: onehot | refined | auto
                                 # (auto: one-hot when MM is on, refined ȳ when MM is off)
    },
    "mm": {
        "enabled": True,
        "crops": [96],           # MM crop sizes; SANE-Multi: [224, 192, 160, 128, 96]
        "kappa": 0.1,            # κ of Beta(κ, κ)
        "lam": 0.5,              # λ
    },
    "optim": {
        "lr": 0.03,              # per 256 images (linear scaling)
        "momentum": 0.9,
        "weight_decay": 0.0001,
        "warmup_epochs": 0,
    },
    "log": {"every_iters": 20, "progress": True, "tensorboard": True},
    "checkpoint": {"every_iters": 1000, "save_every_epochs": 20},
    "knn": {"every_epochs": 10, "k": 50, "t": 0.05, "max_train_images": 0, "batch_size": 256},
}


# The recipe switches each method sets: the paper's ablation grid (Table 4) plus MoCo v2 with
# in-batch negatives, which separates that change from SLR and MM.
SWITCHES = ("slr.enabled", "slr.p", "slr.q", "mm.enabled", "model.in_batch_negatives")


def _preset(p, q, mm, in_batch=True):
    return dict(zip(SWITCHES, (p or q, p, q, mm, in_batch)))


METHODS = {
    "mocov2": _preset(False, False, False, in_batch=False),  # the reference: positive vs queue
    "mocov2_inbatch": _preset(False, False, False),          # + the other in-batch keys as negatives
    "slr_p": _preset(True, False, False),
    "slr_q": _preset(False, True, False),
    "slr": _preset(True, True, False),
    "mm": _preset(False, False, True),                       # MM with one-hot labels
    "slr_p_mm": _preset(True, False, True),
    "slr_q_mm": _preset(False, True, True),
    "sane": _preset(True, True, True),
}


class Config(dict):
    """A dict with attribute access (cfg.model.queue); plain data, read once."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @staticmethod
    def wrap(d):
        return Config({k: Config.wrap(v) if isinstance(v, dict) else v for k, v in d.items()})

    def to_dict(self):
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self.items()}


def _flat_keys(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _unknown_key(key, source):
    close = difflib.get_close_matches(key, list(_flat_keys(DEFAULTS)), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return UserError(f"{source}: unknown config key '{key}'.{hint}")


def _coerce(value, default, key, source):
    """Cast `value` to the type of the default (YAML parses '1e-4' as a string, for one)."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, list):
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            elem = default[0] if default else None
            return [_coerce(v, elem, key, source) if elem is not None else v for v in value]
        if isinstance(default, str):
            return str(value)
    except (TypeError, ValueError):
        raise UserError(
            f"{source}: '{key}' expects {type(default).__name__} (default {default!r}), got {value!r}"
        ) from None
    return value


def _set(cfg, key, value, source, seen=None):
    """Set a dotted key (typed as its default); `seen` records key -> value."""
    parts = key.split(".")
    node, ref = cfg, DEFAULTS
    for p in parts[:-1]:
        if not isinstance(ref.get(p), dict):
            raise _unknown_key(key, source)
        node, ref = node[p], ref[p]
    if parts[-1] not in ref or isinstance(ref[parts[-1]], dict):
        raise _unknown_key(key, source)
    node[parts[-1]] = _coerce(value, ref[parts[-1]], key, source)
    if seen is not None:
        seen[key] = node[parts[-1]]


def _merge_yaml(cfg, d, source, prefix="", seen=None):
    for k, v in d.items():
        if isinstance(v, dict):
            _merge_yaml(cfg, v, source, f"{prefix}{k}.", seen)
        else:
            _set(cfg, f"{prefix}{k}", v, source, seen)


def _effective(sw):
    """What a set of switches runs: p / q count only with SLR on."""
    on = sw["slr.enabled"]
    return (on and sw["slr.p"], on and sw["slr.q"], sw["mm.enabled"], sw["model.in_batch_negatives"])


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def apply_method(cfg, layers):
    """Set the switches of cfg["method"] (METHODS) in the plain dict `cfg`.

    layers: [(source, {key: value})] in the order applied (the file, then the command line).
    A switch set in the method's layer or a later one must agree with the method; earlier ones
    are replaced. Raises UserError naming the key, the method and the method the switches
    would make.
    """
    method = cfg["method"]
    at = max((i for i, (_, keys) in enumerate(layers) if "method" in keys), default=-1)
    source = layers[at][0] if at >= 0 else "config"
    if method not in METHODS:
        raise UserError(f"{source}: unknown method '{method}'; known methods: {', '.join(METHODS)}")
    preset = METHODS[method]
    for src, keys in layers[max(at, 0):]:
        for key in SWITCHES:
            if key in keys and keys[key] != preset[key]:
                wanted = {**preset, **{k: v for _, ks in layers[max(at, 0):] for k, v in ks.items()
                                       if k in SWITCHES}}
                match = [m for m, sw in METHODS.items() if _effective(sw) == _effective(wanted)]
                if match == [method]:
                    hint = "; slr.p and slr.q act only with slr.enabled=true"
                elif match:
                    hint = f"; or name the method with the switches given: method={match[0]}"
                else:
                    hint = f"; no method has the switches given (known: {', '.join(METHODS)})"
                named = method if at >= 0 else f"{method} (the default; set method=...)"
                raise UserError(
                    f"{src}: {key}={str(keys[key]).lower()} contradicts method {named}, which sets "
                    f"{key}={str(preset[key]).lower()}: drop the key, the method sets it{hint}")
    for key, value in preset.items():
        section, name = key.split(".")
        cfg[section][name] = value


def switches(cfg):
    """The resolved recipe switches of a config, e.g. for done.json."""
    return {key: _get(cfg, key) for key in SWITCHES}


def load_config(path=None, overrides=()):
    """Defaults ← YAML file ← `key=value` overrides; returns a validated Config."""
    cfg = copy.deepcopy(DEFAULTS)
    layers = []  # [(source, {key: value})]: what the file and the command line set
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} not found: pass --config configs/pretrain/NAME.yaml")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(d, dict):
            raise UserError(f"{p}: expected a mapping of config keys")
        layers.append((str(p), {}))
        _merge_yaml(cfg, d, str(p), seen=layers[-1][1])
    layers.append(("command line", {}))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}': expected key=value, e.g. epochs=10")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), yaml.safe_load(value) if value != "" else "", "command line",
             layers[-1][1])
    apply_method(cfg, layers)
    cfg = Config.wrap(cfg)
    validate(cfg)
    return cfg


def validate(cfg):
    src = "config"
    if cfg.data.pipeline not in ("cpu", "gpu"):
        raise UserError(f"{src}: data.pipeline must be cpu or gpu, got {cfg.data.pipeline!r}")
    if cfg.data.gpu_decoder not in ("torchvision", "dali"):
        raise UserError(f"{src}: data.gpu_decoder must be torchvision or dali, got {cfg.data.gpu_decoder!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"{src}: device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.amp not in ("bf16", "none"):
        raise UserError(f"{src}: amp must be bf16 or none, got {cfg.amp!r}")
    if cfg.model.stem not in ("imagenet", "cifar"):
        raise UserError(f"{src}: model.stem must be imagenet or cifar, got {cfg.model.stem!r}")
    if cfg.data.format not in ("imagefolder", "cifar10", "cifar100"):
        raise UserError(f"{src}: data.format must be imagefolder, cifar10 or cifar100, got {cfg.data.format!r}")
    if cfg.data.pipeline == "gpu" and cfg.data.format != "imagefolder":
        raise UserError(f"{src}: data.pipeline=gpu decodes JPEG files; data.format={cfg.data.format} "
                        "holds decoded arrays: use data.pipeline=cpu")
    if cfg.slr.vanilla not in ("auto", "onehot", "refined"):
        raise UserError(f"{src}: slr.vanilla must be auto, onehot or refined")
    if (cfg.slr.enabled or cfg.mm.enabled) and not cfg.model.in_batch_negatives:
        raise UserError(
            f"{src}: SLR and MM label the in-batch keys of B̄: set model.in_batch_negatives=true "
            "(or slr.enabled=false mm.enabled=false for plain MoCo v2)"
        )
    if cfg.mm.enabled and not cfg.mm.crops:
        raise UserError(f"{src}: mm.enabled needs at least one size in mm.crops")
    if cfg.model.head_depth < 1:
        raise UserError(f"{src}: model.head_depth must be >= 1")


def save_config(cfg, path):
    from pretrain.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
