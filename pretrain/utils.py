"""Shared helpers for pretraining and the probes: distributed init, lr schedule, RNG state, and the
MetricLogger (metrics.jsonl + TensorBoard). Files are written through suite.contract."""
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from suite import contract


def run_command(prog, run, args, summary=None):
    """The main of a probe-like command: `run(args)`; a UserError is one line on stderr and exit 2;
    the result (or the keys of it in `summary`) printed as one JSON line, and returned."""
    try:
        result = run(args)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result if summary is None else {k: result[k] for k in summary if k in result}))
    return result


class UserError(Exception):
    """Bad input (config, data folder): the CLI prints the message and exits with code 2."""


def init_distributed(device="auto"):
    """Join the env:// process group set by torchrun or Submitit; NCCL on GPU, gloo on CPU.

    device: auto (CUDA when available) | cpu | cuda. Returns (rank, world_size, device).
    One process without WORLD_SIZE>1 runs alone.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but CUDA is not available: use device=auto or cpu")
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return rank, world, device


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def cosine_lr(base_lr, it, total_iters, warmup_iters=0):
    """Linear warm-up then half-cosine decay to 0 over iterations (MoCo v2's schedule, per step)."""
    if it < warmup_iters:
        return base_lr * (it + 1) / warmup_iters
    t = (it - warmup_iters) / max(1, total_iters - warmup_iters)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))


def get_rng_state():
    """All RNG states as tensors/ints/tuples, so the checkpoint loads with weights_only=True."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id):
    """DataLoader worker_init_fn: numpy is not seeded per worker by PyTorch, do it here."""
    np.random.seed(torch.initial_seed() % 2**32)


def setup_logger(output_dir, rank):
    """The human log: log.txt + stdout on rank 0, warnings only elsewhere."""
    logger = logging.getLogger("pretrain")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%m/%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0 and output_dir:
        handlers.append(logging.FileHandler(Path(output_dir) / contract.LOG))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger


class MetricLogger:
    """Writes each record as one JSON line of metrics.jsonl and as TensorBoard scalars
    `<type>/<name>`; a no-op off rank 0."""

    def __init__(self, output_dir, enabled=True, tensorboard=True):
        self.enabled = enabled
        self.path = Path(output_dir) / contract.METRICS
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # TensorBoard is optional on the GPU machine
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(log_dir=str(output_dir))

    def log(self, record):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("iter", 0)
            for key, value in record.items():
                if key not in ("type", "epoch", "iter") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{record['type']}/{key}", value, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


class Throughput:
    """Images per second between two calls of `rate`."""

    def __init__(self):
        self.t0, self.n = time.perf_counter(), 0

    def add(self, n):
        self.n += n

    def rate(self):
        t = time.perf_counter()
        r = self.n / max(t - self.t0, 1e-9)
        self.t0, self.n = t, 0
        return r
