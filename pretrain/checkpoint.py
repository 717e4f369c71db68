"""A pretraining run's state on disk: atomic checkpoint writes that never leave a temp file, a
finite check before every write, and the resume that falls back to the previous good checkpoint.

Files in output_dir (docs/formats.md):
  checkpoint.pth        the latest state (what a rerun resumes from)
  checkpoint.prev.pth   the checkpoint.pth before it, kept when a new one is written (one extra
                        checkpoint of disk) so that a damaged latest file costs one save interval
  checkpoint_NNNN.pth   snapshots every checkpoint.save_every_epochs epochs

Policy:
- Nothing is written unless every floating tensor of the model and optimizer state is finite:
  NaN/Inf stops the run (NonFiniteError, one line) naming the iteration and the checkpoint kept.
- Resume reads checkpoint.pth, else checkpoint.prev.pth, else the newest snapshot: the first
  that loads safely (weights_only), is a pretraining checkpoint and is finite. Each damaged one
  it passes over (truncated, zero bytes, not a checkpoint, NaN) is named in a warning; if none
  is good the run stops with one line and touches nothing. A file that safe loading refuses
  (Python objects: this suite never writes those) stops the run: it is not "damaged", it is
  someone else's file.
- A damaged checkpoint.pth is never rotated into checkpoint.prev.pth.
- Temp files of a write killed midway (suite.contract.TEMP) are removed when a run starts.
"""
import json
from pathlib import Path

import torch

from pretrain.safe_load import WeightsFileError, load_torch
from pretrain.utils import UserError
from suite import contract

LATEST, PREVIOUS, SNAPSHOT = contract.CHECKPOINT, contract.PREVIOUS_CHECKPOINT, contract.SNAPSHOT
REQUIRED = ("model", "optimizer", "iter", "config")


class NonFiniteError(UserError):
    """NaN/Inf in the training state: the run stops, the last good checkpoint stays."""


def _tensors(obj, prefix=""):
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def nonfinite(state):
    """(names of the floating tensors in `state` holding NaN/Inf, number of floating tensors);
    one host sync per device, not one per tensor."""
    floats = [(k, t) for k, t in _tensors(state) if t.is_floating_point()]
    bad = []
    for device in {t.device for _, t in floats}:
        group = [(k, t) for k, t in floats if t.device == device]
        ok = torch.stack([torch.isfinite(t).all() for _, t in group]).tolist()
        bad += [k for (k, _), good in zip(group, ok) if not good]
    return bad, len(floats)


def candidates(out):
    """Checkpoint files of a run, newest first: latest, previous, then snapshots by epoch."""
    out = Path(out)
    snaps = sorted((p for p in out.iterdir() if SNAPSHOT.match(p.name)),
                   key=lambda p: int(SNAPSHOT.match(p.name).group(1)), reverse=True) if out.is_dir() else []
    return [p for p in (out / LATEST, out / PREVIOUS, *snaps) if p.is_file()]


def has_run_state(out):
    """Does `out` hold a run (a checkpoint or done.json) that a new start would resume or relabel?"""
    return bool(candidates(out)) or contract.done_file("pretrain", out).is_file()


def read_checkpoint(path):
    """A pretraining checkpoint, or WeightsFileError naming why it cannot be resumed from."""
    ckpt = load_torch(path)
    missing = [k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise WeightsFileError(f"{path}: not a pretraining checkpoint (no {', '.join(missing)})")
    bad, n = nonfinite(ckpt["model"])
    if bad:
        raise WeightsFileError(f"{path}: {len(bad)} of {n} model tensors hold NaN/Inf")
    return ckpt


class RunCheckpoints:
    """The checkpoint files of one output_dir: resume (with fallback) and checked, atomic saves."""

    def __init__(self, out):
        self.out = Path(out)
        self.latest = self.out / LATEST
        self.kept = None            # (path, iteration) of the newest good checkpoint on disk
        self.latest_good = False    # checkpoint.pth is known good: it may become checkpoint.prev.pth

    def resume(self, log):
        """The checkpoint dict to resume from (None: start fresh); see the module's policy."""
        damaged = []
        for path in candidates(self.out):
            try:
                ckpt = read_checkpoint(path)
            except WeightsFileError as e:
                if e.unsafe:
                    raise UserError(f"{e} (in the output_dir of this run)") from None
                damaged.append(str(e))
                continue
            for reason in damaged:
                log.warning(f"{reason}; resuming from {path} (iteration {ckpt['iter']}) instead")
            self.kept = (path, ckpt["iter"])
            self.latest_good = path == self.latest
            return ckpt
        if damaged:
            raise UserError(f"{'; '.join(damaged)}; no earlier good checkpoint in {self.out} "
                            f"({PREVIOUS} or checkpoint_NNNN.pth): move the damaged file away to "
                            "start this run over")
        return None

    def restore(self, ckpt, model, optimizer, scaler):
        """Load the resumed state; a checkpoint of another model is one line, not a traceback."""
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if "scaler" in ckpt:
                scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{self.kept[0]}: does not fit this run's model ({first[:200]}); it "
                            "belongs to another config: use a new output_dir") from None

    def stop(self, reason):
        """The error that ends a run whose state went non-finite: one line, with what is kept."""
        if self.kept:
            kept = f"{self.kept[0]} (iteration {self.kept[1]}) is kept and a rerun resumes from it"
        else:
            kept = f"no checkpoint was written yet in {self.out}"
        return NonFiniteError(f"{reason}; nothing saved: {kept}; lower optim.lr or check the input "
                              "data")

    def check(self, state, it):
        """Raise NonFiniteError unless the model and optimizer state are finite (every rank)."""
        bad, n = nonfinite({"model": state["model"], "optimizer": state["optimizer"]})
        if bad:
            raise self.stop(f"{len(bad)} of {n} model/optimizer tensors hold NaN/Inf at iteration "
                            f"{it} (e.g. {', '.join(bad[:2])})")

    def save(self, state, path, it):
        """Write a checked state to `path` (rank 0), atomically and on disk before it replaces the old
        one; checkpoint.pth keeps its predecessor."""
        path = Path(path)
        latest = path == self.latest
        previous = self.out / PREVIOUS if latest and self.latest_good else None
        contract.write_atomic(path, lambda f: torch.save(state, f), fsync=True, keep_previous=previous)
        if latest:
            self.kept, self.latest_good = (path, it), True


def rewind_metrics(path, it):
    """Drop the records after iteration `it` from metrics.jsonl (all of them when `it` is 0):
    what a killed run logged after its last checkpoint is logged again by the resumed run."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by the kill
            dropped += 1
            continue
        if it and isinstance(rec, dict) and rec.get("iter", 0) <= it:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        contract.write_text(path, "".join(line + "\n" for line in kept))
    return dropped
