"""Provenance: one JSON record per run (pretraining, probe, fine-tune), written atomically beside
its output as suite.contract.PROVENANCE just before the run's done marker, so that every number of
the results table traces to the code, versions, GPUs, schedule and checkpoint that made it.

Fields (docs/formats.md): kind; suite_commit and suite_dirty (this checkout's `git rev-parse HEAD`
and whether a tracked file differs from it; null where the suite is no git checkout or git is
missing); versions (python, torch, torchvision, detectron2: null when not installed); gpu_model and
gpu_count (the GPUs the run used: 0 and null on CPU); batch_size (effective: over every process),
lr (the base lr the optimizer got), schedule; numerics (the named preset of the run's config,
"default" when it names none); amp; seed; weights and weights_sha256 (a pretraining: the
checkpoint it wrote; a probe or fine-tune: the weights it read; null for random init);
pretrain_config and pretrain_config_sha256 (the pretraining run's config.yaml, for a fine-tune
found through the run layout (contract.pretrain_config_of_weights): null when the weights come from
elsewhere); wall_time_s (the attempt that finished the run: a resumed run counts its last
attempt only) and resumed; finished (UTC).

Batch, lr and schedule are read from the config the run saved (or, for a fine-tune, the config the
trainer ran with, which also holds what Detectron2's auto_scale_workers changed), so any scaling of
them is what is recorded. Reading records needs the standard library only; building one imports
torch where it runs."""
import hashlib
import json
import platform
import subprocess
import time
from pathlib import Path

from suite import contract

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("kind", "suite_commit", "suite_dirty", "versions", "gpu_model", "gpu_count", "batch_size",
          "lr", "schedule", "numerics", "amp", "seed", "weights", "weights_sha256", "pretrain_config",
          "pretrain_config_sha256", "wall_time_s", "resumed", "finished")
VERSIONS = ("python", "torch", "torchvision", "detectron2")
DEFAULT_NUMERICS = "default"


# ---------------------------------------------------------------- pieces
def sha256(path, chunk=1 << 20):
    """Hex SHA-256 of a file, or None for no file ('' / None: random init)."""
    if not path or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _git(*args):
    try:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def suite_commit():
    """(commit, dirty) of the checkout this code runs from; (None, None) outside a git checkout.
    Dirty: a tracked file differs from the commit (untracked outputs such as runs/ do not count)."""
    top = _git("rev-parse", "--show-toplevel")  # the suite's own checkout, not one that holds a venv
    head = _git("rev-parse", "HEAD") if top and Path(top.strip()).resolve() == REPO else None
    if not head:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return head.strip(), (None if status is None else bool(status.strip()))


def versions():
    """{python, torch, torchvision, detectron2}: the versions this process runs (None when absent).
    Detectron2's is read from its distribution's metadata unless it is imported already: pretraining
    never imports it."""
    import importlib.metadata as md
    import sys

    out = {"python": platform.python_version()}
    for name in VERSIONS[1:]:
        module = sys.modules.get(name)
        if module is None and name != "detectron2":
            try:
                module = __import__(name)
            except ImportError:
                pass
        out[name] = getattr(module, "__version__", None)
        if out[name] is None:  # the distribution of the import package (sal-detectron2, detectron2)
            for dist in md.packages_distributions().get(name, ()):
                out[name] = md.version(dist)
    return out


def gpus(count):
    """(model, count) of the CUDA devices a run used (count: its processes on CUDA), (None, 0) on CPU."""
    if not count:
        return None, 0
    import torch

    return (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None), int(count)


def _get(cfg, dotted, default=None):
    for key in dotted.split("."):
        if not isinstance(cfg, dict) or key not in cfg:
            return default
        cfg = cfg[key]
    return cfg


# ---------------------------------------------------------------- schedules, from a saved config
def pretrain_schedule(cfg):
    """(batch_size, lr, schedule, numerics, amp, seed) of a pretraining config.yaml (as a dict):
    the engine's lr is optim.lr per 256 images, scaled by the batch (pretrain/engine.py)."""
    batch = _get(cfg, "data.batch_size")
    per_256 = _get(cfg, "optim.lr")
    lr = per_256 * batch / 256 if isinstance(batch, int) and isinstance(per_256, (int, float)) else None
    schedule = {"name": "cosine", "epochs": cfg.get("epochs"),
                "warmup_epochs": _get(cfg, "optim.warmup_epochs", 0), "lr_per_256": per_256}
    return batch, lr, schedule, cfg.get("numerics") or DEFAULT_NUMERICS, cfg.get("amp"), cfg.get("seed")


def detection_numerics(cfg):
    """The named numerics preset of a Detectron2 config (SANE.NUMERICS, TRANSFER.NUMERICS or
    NUMERICS, whichever it has), else "default"."""
    for key in ("SANE.NUMERICS", "TRANSFER.NUMERICS", "NUMERICS"):
        value = _get(cfg, key)
        if value:
            return str(value)
    return DEFAULT_NUMERICS


def detection_schedule(cfg):
    """(batch_size, lr, schedule, numerics, amp, seed) of a Detectron2 config (as a dict)."""
    solver = cfg.get("SOLVER") or {}
    schedule = {"name": solver.get("LR_SCHEDULER_NAME"), "steps": list(solver.get("STEPS") or ()),
                "max_iter": solver.get("MAX_ITER"), "warmup_iters": solver.get("WARMUP_ITERS"),
                "gamma": solver.get("GAMMA"), "reference_world_size": solver.get("REFERENCE_WORLD_SIZE")}
    return (solver.get("IMS_PER_BATCH"), solver.get("BASE_LR"), schedule, detection_numerics(cfg),
            bool(_get(cfg, "SOLVER.AMP.ENABLED", False)), cfg.get("SEED"))


def probe_schedule(cfg):
    """(batch_size, lr, schedule, numerics, amp, seed) of a probe's linear_config.json."""
    schedule = {"name": "cosine", "epochs": cfg.get("epochs"), "optimizer": cfg.get("optimizer")}
    return (cfg.get("batch_size"), cfg.get("lr"), schedule, cfg.get("numerics") or DEFAULT_NUMERICS,
            None, cfg.get("seed"))


# ---------------------------------------------------------------- the record
def build(kind, schedule, *, gpu_count, weights, pretrain_config, wall_time_s, resumed=False):
    """The record of a finished run; `schedule` is one of the *_schedule tuples above."""
    batch, lr, sched, numerics, amp, seed = schedule
    commit, dirty = suite_commit()
    model, count = gpus(gpu_count)
    return {"kind": kind, "suite_commit": commit, "suite_dirty": dirty, "versions": versions(),
            "gpu_model": model, "gpu_count": count, "batch_size": batch, "lr": lr, "schedule": sched,
            "numerics": numerics, "amp": amp, "seed": seed,
            "weights": str(weights) if weights else None, "weights_sha256": sha256(weights),
            "pretrain_config": str(pretrain_config) if pretrain_config else None,
            "pretrain_config_sha256": sha256(pretrain_config),
            "wall_time_s": round(float(wall_time_s), 3), "resumed": bool(resumed),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_frozen_run(output_dir, kind, schedule, *, device, weights, started):
    """The record of a run on a backbone read from `weights` (a probe, an SVM, a semi-supervised
    fine-tune; None: random init), on `device`, started at time.time() `started`, written to
    output_dir; its pretraining config is the one beside `weights`, if any."""
    return write(output_dir, build(kind, schedule, gpu_count=int(device.type == "cuda"), weights=weights,
                                   pretrain_config=contract.pretrain_config_of_weights(weights),
                                   wall_time_s=time.time() - started))


def write(output_dir, record):
    """OUTPUT_DIR/provenance.json, atomically."""
    return contract.write_json(Path(output_dir) / contract.PROVENANCE, record)


def read(run_dir):
    """The record of a run folder, or None (no record, or an unreadable one)."""
    try:
        record = json.loads((Path(run_dir) / contract.PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def short(sha, n=12):
    return sha[:n] if isinstance(sha, str) else "—"
