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
    "resume_allow": [],          # keys of RESUME_ALLOWED that may differ from output_dir's config
    "compile": False,            # torch.compile the encoders
    "numerics": "fast",          # a preset of amp and tf32 (NUMERICS below): fast | reference
    "amp": "bf16",               # bf16 | none; autocast on CUDA only
    "tf32": True,                # TF32 matmuls and convolutions on CUDA (Ampere and later)
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
        "in_batch_negatives": True,  # B̄ includes in-batch keys; False = MoCo v2's positive vs queue
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
    "mocov2": _preset(False, False, False, in_batch=False),  # MoCo v2: positive vs queue only
    "mocov2_inbatch": _preset(False, False, False),          # + the other in-batch keys as negatives
    "slr_p": _preset(True, False, False),
    "slr_q": _preset(False, True, False),
    "slr": _preset(True, True, False),
    "mm": _preset(False, False, True),                       # MM with one-hot labels
    "slr_p_mm": _preset(True, False, True),
    "slr_q_mm": _preset(False, True, True),
    "sane": _preset(True, True, True),
}


# Numerics presets: fast (bf16 autocast + TF32 on CUDA) or the reference code's fp32 (MoCo v2's
# main_moco.py: no autocast; TF32 off, as on the V100s it ran on). A config names its preset.
NUMERICS = {"fast": {"amp": "bf16", "tf32": True}, "reference": {"amp": "none", "tf32": False}}


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


def apply_numerics(cfg, layers):
    """Set amp and tf32 from cfg["numerics"] (NUMERICS) as apply_method sets the method's switches: a
    value given in the preset's layer or a later one must agree with it (one UserError line)."""
    name = cfg["numerics"]
    at = max((i for i, (_, keys) in enumerate(layers) if "numerics" in keys), default=-1)
    if name not in NUMERICS:
        raise UserError(f"{layers[at][0] if at >= 0 else 'config'}: unknown numerics '{name}'; "
                        f"known: {', '.join(NUMERICS)}")
    for src, keys in layers[max(at, 0):]:
        for key, value in NUMERICS[name].items():
            if key in keys and keys[key] != value:
                other = [n for n, p in NUMERICS.items() if p[key] == keys[key]]
                named = name if at >= 0 else f"{name} (the default)"
                raise UserError(f"{src}: {key}={str(keys[key]).lower()} contradicts numerics {named}, which "
                                f"sets {key}={str(value).lower()}: drop the key, the preset sets it"
                                + (f"; or name the preset: numerics={other[0]}" if other else ""))
    cfg.update(NUMERICS[name])


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
    apply_numerics(cfg, layers)
    cfg = Config.wrap(cfg)
    validate(cfg)
    check_ranges(cfg)
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
    from suite import contract

    contract.write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# Values a run cannot use, found with the config rather than at step 1 (or never: epochs=0
# used to write a done.json pointing at no checkpoint). (key, test, what it must be)
RANGES = (
    ("epochs", lambda v: v >= 1, ">= 1"),
    ("max_iters_this_run", lambda v: v >= 0, ">= 0 (0: no limit)"),
    ("cpu_threads", lambda v: v >= 0, ">= 0 (0: PyTorch's default)"),
    ("data.crop", lambda v: v >= 1, ">= 1 pixel"),
    ("data.batch_size", lambda v: v >= 1, ">= 1 (the total over all processes)"),
    ("data.num_workers", lambda v: v >= 0, ">= 0"),
    ("model.dim", lambda v: v >= 1, ">= 1"),
    ("model.head_hidden", lambda v: v >= 0, ">= 0 (0: the backbone's width)"),
    ("model.queue", lambda v: v >= 1, ">= 1"),
    ("model.m", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("model.tau", lambda v: v > 0, "> 0"),
    ("model.shuffle_bn_splits", lambda v: v >= 1, ">= 1"),
    ("slr.tau_prime", lambda v: v > 0, "> 0"),
    ("mm.kappa", lambda v: v > 0, "> 0 (Beta(kappa, kappa))"),
    ("mm.lam", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim.lr", lambda v: v >= 0, ">= 0"),
    ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("log.every_iters", lambda v: v >= 1, ">= 1"),
    ("checkpoint.every_iters", lambda v: v >= 0, ">= 0 (0: only at epoch ends)"),
    ("checkpoint.save_every_epochs", lambda v: v >= 0, ">= 0 (0: no snapshots)"),
    ("knn.every_epochs", lambda v: v >= 0, ">= 0 (0: no kNN monitor)"),
    ("knn.k", lambda v: v >= 1, ">= 1"),
    ("knn.t", lambda v: v > 0, "> 0"),
    ("knn.max_train_images", lambda v: v >= 0, ">= 0 (0: all)"),
    ("knn.batch_size", lambda v: v >= 1, ">= 1"),
)


def _get(d, key):
    for part in key.split("."):
        d = d[part]
    return d


def check_ranges(cfg):
    """One UserError line naming the first key whose value no run can use, and the range."""
    for key, ok, must in RANGES:
        value = _get(cfg, key)
        if not ok(value):
            raise UserError(f"config: {key}={value!r} is out of range: it must be {must}")
    for key in ("data.scale", "data.small_scale"):
        v = _get(cfg, key)
        if len(v) != 2 or not 0 < v[0] <= v[1] <= 1:
            raise UserError(f"config: {key}={v!r} must be [low, high] with 0 < low <= high <= 1")
    if cfg.mm.enabled and min(cfg.mm.crops) < 1:
        raise UserError(f"config: mm.crops={cfg.mm.crops!r}: every size must be >= 1 pixel")
    if cfg.model.queue < cfg.data.batch_size:
        # every step enqueues the whole global batch of keys
        raise UserError(f"config: model.queue={cfg.model.queue} is smaller than data.batch_size="
                        f"{cfg.data.batch_size}: the queue must hold at least one batch of keys")
    bad = [k for k in cfg.resume_allow if k not in RESUME_ALLOWED]
    if bad:
        raise UserError(f"config: resume_allow={cfg.resume_allow!r}: {', '.join(map(str, bad))} cannot "
                        f"change on resume; only {', '.join(RESUME_ALLOWED)} can")


# Resuming in an output_dir that holds a run (a checkpoint or done.json) with another config
# would mix two experiments under one name, so a run compares its config with the saved
# config.yaml first. Keys that never change the weights may differ freely; RESUME_ALLOWED keys
# change the result but leave the checkpoint resumable (extend `epochs`, move `data.root`, another
# device), and may differ only when named in the new run's `resume_allow` (an explicit
# `resume_allow=[epochs]`). Anything else: use a new output_dir.
RESUME_FREE = ("output_dir", "max_iters_this_run", "cpu_threads", "resume_allow", "data.num_workers",
               "log.*", "knn.*", "checkpoint.*")
RESUME_ALLOWED = ("epochs", "data.root", "device", "compile", "channels_last")


def _free_on_resume(key):
    return any(key == f or (f.endswith(".*") and key.startswith(f[:-1])) for f in RESUME_FREE)


def config_differences(saved, cfg):
    """[(key, saved value, new value)] over the keys that matter on resume; a key the saved
    config lacks (written by an older version) counts as its default."""
    diffs = []
    for key in _flat_keys(DEFAULTS):
        if _free_on_resume(key):
            continue
        default, old = _get(DEFAULTS, key), _get(DEFAULTS, key)
        if _has(saved, key):
            old = _get(saved, key)
            try:
                old = _coerce(old, default, key, "saved config")
            except UserError:
                pass  # compared as written: it differs
        new = _get(cfg, key)
        if old != new:
            diffs.append((key, old, new))
    return diffs


def _has(d, key):
    try:
        _get(d, key)
        return True
    except (KeyError, TypeError):
        return False


def read_config_file(path):
    """The mapping a saved config.yaml holds (UserError, one line, if it cannot be read)."""
    try:
        d = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot be read ({e}); restore it or use a new output_dir") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: not a config mapping; restore it or use a new output_dir")
    return d


def check_resumable(saved, cfg, source="output_dir/config.yaml"):
    """Refuse (UserError, one line) a config that differs from the `saved` one (a dict read from
    `source`) in a key that changes the result, unless the key is in RESUME_ALLOWED and named in
    cfg.resume_allow. Returns the accepted differences, for the log."""
    diffs = config_differences(saved, cfg)
    blocking = [d for d in diffs if d[0] not in cfg.resume_allow]
    if not blocking:
        return diffs
    listed = ", ".join(f"{k} (saved {old!r}, now {new!r})" for k, old, new in blocking)
    fixable = [k for k, _, _ in blocking if k in RESUME_ALLOWED]
    allow = "resume_allow=[" + ",".join(sorted(set(cfg.resume_allow) | set(fixable))) + "]"
    if len(fixable) == len(blocking):
        how = f"use a new output_dir, or continue this run with the change: add {allow}"
    elif fixable:
        how = (f"use a new output_dir ({', '.join(fixable)} alone could change on resume "
               f"with {allow})")
    else:
        how = "use a new output_dir (or restore the saved values to resume this run)"
    raise UserError(f"{source} belongs to a run with another config: {listed}; these change the "
                    f"result: {how}")
