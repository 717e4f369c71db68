"""Throughput of the pretraining stack on one device, one table from one run: the ResNet compute
ceiling, the mocov2 / sane / sane_multi training steps, the CPU and GPU data paths, end to end.

    python tools/benchmark.py                      # one GPU: ResNet-50, batch 256, 224 px (< 6 min)
    python tools/benchmark.py --cpu                # tiny (ResNet-18, batch 8, 64 px), < 60 s on CPU
    python tools/benchmark.py --json bench.json --sections ceiling,step
    (or python -m pretrain.benchmark ..., from the repository root without installing the suite)

Every row is fail-soft: an error prints as "error: ..." in its row and the rest still runs.
Only torch, torchvision, numpy, PIL, yaml and the pretrain package are imported.
"""
import argparse
import importlib.util
import os
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

from pretrain.config import load_config
from pretrain.data import ImageDataset, MultiCropTransform, collate_views
from pretrain.engine import autocast_ctx, configure_determinism, to_device
from pretrain.gpu_augment import GPUMultiCrop, RawJPEGFolder, decode_jpegs, gpu_batches
from pretrain.model import build_encoder, build_model
from suite import contract

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"

METHODS = {"mocov2": "mocov2_r50_200ep.yaml", "sane": "sane_r50_200ep.yaml",
           "sane_multi": "sane_multi_r50_200ep.yaml"}
SECTIONS = ("ceiling", "step", "data", "e2e")


# ---------------------------------------------------------------- setup
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (ResNet-18, batch 8, 64 px)")
    p.add_argument("--batch-size", type=int, help="images per step (default 256; --cpu 8)")
    p.add_argument("--size", type=int, help="q/k crop size (default 224; --cpu 64); MM crops scale with it")
    p.add_argument("--arch", help="torchvision ResNet (default resnet50; --cpu resnet18)")
    p.add_argument("--iters", type=int, help="timed iterations per row (default 20; --cpu 2)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (default 5; --cpu 1)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile'd ceiling and sane step (default: on GPU only)")
    p.add_argument("--workers", type=int, help="DataLoader workers (default: CPU cores; --cpu 2)")
    p.add_argument("--data", help="ImageFolder root with train/<class>/*.jpg (default: generate JPEGs)")
    p.add_argument("--num-images", type=int, help="JPEGs to generate (default 2048; --cpu 32)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="skip compiled rows (run last) that would start after this many seconds, "
                        "and any row after 1.5x it")
    p.add_argument("--json", help="write every number here (JSON, rewritten after each row)")
    args = p.parse_args(argv)
    tiny = args.cpu
    defaults = dict(batch_size=8 if tiny else 256, size=64 if tiny else 224,
                    arch="resnet18" if tiny else "resnet50", iters=2 if tiny else 20,
                    warmup=1 if tiny else 5, workers=2 if tiny else min(16, os.cpu_count() or 1),
                    num_images=32 if tiny else 2048)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"--sections: unknown {bad}; choose from {','.join(SECTIONS)}")
    args.sections = sections
    if not tiny and not torch.cuda.is_available():
        p.error("no CUDA device: pass --cpu for the small CPU run")
    if args.compile is None:
        args.compile = not tiny
    if args.data and not (Path(args.data) / "train").is_dir():
        p.error(f"--data {args.data}: expected an ImageFolder root holding train/<class>/*.jpg")
    return args


def method_config(args, name):
    """The trainer's own config for `name`, at the benchmark's batch, size and arch."""
    scale = args.size / 224   # MM crops keep their ratio to the q/k crop (96/224 ...)
    base = load_config(CONFIGS / METHODS[name])
    crops = [max(16, int(round(s * scale))) for s in base.mm.crops]
    over = [f"data.batch_size={args.batch_size}", f"data.crop={args.size}",
            f"model.arch={args.arch}", f"mm.crops={crops}", f"data.num_workers={args.workers}",
            "compile=false"]
    return load_config(CONFIGS / METHODS[name], over)


def _texture(args):
    """One ImageNet-like JPEG (~500x375): smooth colour fields plus fine noise, quality 90."""
    path, seed, (w, h) = args
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, "JPEG", quality=90)


def make_jpeg_folder(root, num, tiny, workers):
    """root/train/<class>/<i>.jpg: `num` random-texture JPEGs in 8 classes, sizes around 500x375."""
    jobs = []
    rng = np.random.default_rng(0)
    for i in range(num):
        d = Path(root) / "train" / f"c{i % 8}"
        d.mkdir(parents=True, exist_ok=True)
        w, h = (int(rng.integers(120, 200)), int(rng.integers(90, 150))) if tiny else \
            (int(rng.integers(400, 600)), int(rng.integers(300, 450)))
        jobs.append((d / f"{i:05d}.jpg", i, (w, h)))
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            list(ex.map(_texture, jobs, chunksize=16))
    else:
        for j in jobs:
            _texture(j)
    return Path(root)


def write_jpegs(args, root):
    t = time.perf_counter()
    make_jpeg_folder(root, args.num_images, args.cpu, args.workers)
    return args.num_images / (time.perf_counter() - t)


# ---------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_iter(fn, iters, warmup, device):
    """Mean wall time of fn() over `iters` calls after `warmup` untimed ones (device synced)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def sgd(params):
    return torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=1e-4)


# ---------------------------------------------------------------- sections
def ceiling_fns(args, device, size, compiled):
    """(fwd+bwd+SGD step, fwd-only) closures for a bare encoder: bf16 autocast, channels_last."""
    cl = device.type == "cuda"
    net = build_encoder(args.arch, 128, 2, 0).to(device)
    if cl:
        net = net.to(memory_format=torch.channels_last)
    run = torch.compile(net) if compiled else net
    opt = sgd(net.parameters())
    x = torch.randn(args.batch_size, 3, size, size, device=device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cl else torch.autocast("cpu", enabled=False)

    def train():
        with amp:
            loss = run(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def forward():
        with torch.no_grad(), amp:
            run(x)
    return train, forward


def build_step(args, cfg, device, compiled=False):
    """The trainer's step (pretrain.engine's loop body) on batch tensors already on the device."""
    model = build_model(cfg).to(device)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compiled:
        model.encoder_q.compile()
        model.encoder_k.compile()
    model.train()
    opt = sgd([p for p in model.parameters() if p.requires_grad])
    mu = cfg.slr.mu_start

    def step(batch, labels):
        im_q, im_k, mm = (to_device(batch[n], device, cfg) for n in ("q", "k", "mm"))
        with autocast_ctx(cfg, device):
            loss, _ = model(im_q, im_k, mm, labels.to(device, non_blocking=True), mu)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def random_batch(cfg, device):
    b, s = cfg.data.batch_size, cfg.data.crop
    crops = cfg.mm.crops if cfg.mm.enabled else []
    return ({"q": torch.randn(b, 3, s, s, device=device), "k": torch.randn(b, 3, s, s, device=device),
             "mm": [torch.randn(b, 3, c, c, device=device) for c in crops]},
            torch.arange(b, device=device) % 8)


def jpeg_loader(args, dataset, collate, batches, pin=True):
    """`batches` batches drawn with replacement (a small folder serves any number of iters)."""
    sampler = RandomSampler(dataset, replacement=True, num_samples=batches * args.batch_size,
                            generator=torch.Generator().manual_seed(0))
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=args.workers, pin_memory=pin and torch.cuda.is_available(),
                      drop_last=True, prefetch_factor=4 if args.workers else None,
                      timeout=300 if args.workers else 0)


def loop_img_s(args, batches, consume, device, warmup):
    """img/s of `consume` over an iterator of batches, the first `warmup` batches untimed."""
    it = iter(batches)
    for _ in range(warmup):
        consume(*next(it))
    sync(device)
    t0, n = time.perf_counter(), 0
    for item in it:
        consume(*item)
        n += 1
    sync(device)
    return n * args.batch_size / (time.perf_counter() - t0)


class Bench:
    """Runs rows fail-soft and keeps every number for the table and the JSON."""

    def __init__(self, args):
        self.args, self.t0 = args, time.perf_counter()
        self.device = torch.device("cpu" if args.cpu else "cuda")
        self.rows, self.ceiling, self.steps = [], {}, {}

    def step(self, name, cfg, compiled=False):
        """One model per (method, compiled) for the whole run: a second compile costs minutes."""
        if (name, compiled) not in self.steps:
            self.steps[name, compiled] = build_step(self.args, cfg, self.device, compiled)
        return self.steps[name, compiled]

    def elapsed(self):
        return time.perf_counter() - self.t0

    def row(self, section, name, fn, composition=None):
        """fn() -> img/s. composition: (batch, q/k size, MM sizes) of a step, whose ceiling and
        ratio the report computes from the ceiling rows (measured before or after this row)."""
        r = {"section": section, "name": name}
        if composition is not None:
            r["composition"] = dict(zip(("batch", "size", "mm"), composition))
        budget = self.args.budget_s * (1 if name.endswith("compiled") else 1.5)
        if self.elapsed() > budget:
            r["error"] = f"skipped: past {budget:.0f} s (--budget-s)"
        else:
            t = time.perf_counter()
            try:
                r["img_s"] = float(fn())
            except Exception as e:  # noqa: BLE001 - fail-soft: one row's error, the run goes on
                traceback.print_exc()
                where = traceback.extract_tb(e.__traceback__)[-1]
                msg = (str(e).splitlines()[0] if str(e).strip()
                       else f"at {Path(where.filename).name}:{where.lineno}")
                r["error"] = f"error: {type(e).__name__}: {msg}"[:160]
            finally:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            r["seconds"] = round(time.perf_counter() - t, 1)
        self.rows.append(r)
        print(f"[{self.elapsed():6.1f}s] {section}/{name}: "
              f"{r.get('error') or format(r['img_s'], '.1f') + ' img/s'}", file=sys.stderr, flush=True)
        self.save()
        return r.get("img_s")

    def save(self):
        if self.args.json:
            contract.write_json(self.args.json, self.report(), mkdir=True)

    def report(self):
        a = self.args
        dev = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        rows = [dict(r, **self.ratios(r)) for r in self.rows]
        return {"device": dev, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "torch": torch.__version__, "cpu_cores": os.cpu_count(),
                "args": {k: v for k, v in vars(a).items()}, "ceiling": self.ceiling,
                "rows": rows, "wall_s": round(self.elapsed(), 1)}

    def ratios(self, r):
        """The ceiling of a step: query fwd+bwd and key fwd at its size, fwd+bwd of each MM crop;
        compiled = eager x the compile speed-up measured at the q/k size."""
        c, out = r.get("composition"), {}
        fb, f = self.ceiling.get("fwd_bwd", {}), self.ceiling.get("fwd", {})
        sizes = [c["size"]] + c["mm"] if c else []
        if "img_s" not in r or not c or not all(str(s) in fb for s in sizes) or str(c["size"]) not in f:
            return out
        b = c["batch"]
        t = b / fb[str(c["size"])] + b / f[str(c["size"])] + sum(b / fb[str(s)] for s in c["mm"])
        out["ceiling_eager"] = b / t
        out["ratio_eager"] = r["img_s"] / out["ceiling_eager"]
        speedup = self.ceiling.get("compile_speedup")
        if speedup:
            out["ceiling_compiled"] = out["ceiling_eager"] * speedup
            out["ratio_compiled"] = r["img_s"] / out["ceiling_compiled"]
        return out


def composition(cfg):
    return cfg.data.batch_size, cfg.data.crop, list(cfg.mm.crops) if cfg.mm.enabled else []


def run_ceiling(bench, sizes):
    a, dev = bench.args, bench.device
    fb, f = bench.ceiling.setdefault("fwd_bwd", {}), bench.ceiling.setdefault("fwd", {})
    for size in sizes:
        def measure(size=size):
            train, forward = ceiling_fns(a, dev, size, compiled=False)
            fb[str(size)] = a.batch_size / seconds_per_iter(train, a.iters, a.warmup, dev)
            if size == a.size:
                f[str(size)] = a.batch_size / seconds_per_iter(forward, a.iters, a.warmup, dev)
            return fb[str(size)]
        bench.row("ceiling", f"{a.arch} fwd+bwd {size}px eager", measure)
    if str(a.size) in f:
        bench.row("ceiling", f"{a.arch} fwd {a.size}px eager", lambda: f[str(a.size)])


def run_steps(bench, cfgs):
    a, dev = bench.args, bench.device
    for name, cfg in cfgs.items():
        def measure(name=name, cfg=cfg):
            step, batch = bench.step(name, cfg), random_batch(cfg, dev)
            return a.batch_size / seconds_per_iter(lambda: step(*batch), a.iters, a.warmup, dev)
        bench.row("step", f"{name} (tensors on device)", measure, composition(cfg))


def cpu_dataset(cfg, root):
    d, crops = cfg.data, (cfg.mm.crops if cfg.mm.enabled else [])
    return ImageDataset(Path(root) / "train",
                        MultiCropTransform(d.crop, d.scale, d.small_scale, crops, d.strong_mm))


def run_data(bench, cfgs, root):
    a, dev = bench.args, bench.device
    cpu_batches = max(2, a.iters // 2)   # the CPU path is slow: fewer batches keep the run short
    for name in [n for n in ("sane", "sane_multi") if n in cfgs]:
        cfg = cfgs[name]

        def cpu_path(cfg=cfg):
            loader = jpeg_loader(a, cpu_dataset(cfg, root), collate_views, cpu_batches + 1)
            return loop_img_s(a, loader, lambda batch, labels: None, dev, warmup=1)
        bench.row("data", f"{name} CPU path ({a.workers} workers)", cpu_path)

        def gpu_path(cfg=cfg):
            aug = GPUMultiCrop.from_config(cfg).to(dev)
            loader = jpeg_loader(a, RawJPEGFolder(Path(root) / "train"), RawJPEGFolder.collate,
                                 a.iters + a.warmup, pin=False)   # nvJPEG reads pageable bytes
            return loop_img_s(a, loader, lambda data, labels: aug(data, dev), dev, warmup=a.warmup)
        bench.row("data", f"{name} GPU path (decode+augment on {dev.type})", gpu_path)

    def decode_only(decoder="torchvision"):
        loader = jpeg_loader(a, RawJPEGFolder(Path(root) / "train"), RawJPEGFolder.collate,
                             a.iters + a.warmup, pin=False)
        return loop_img_s(a, loader, lambda data, labels: decode_jpegs(data, dev, decoder), dev,
                          warmup=a.warmup)
    bench.row("data", f"decode only ({'nvJPEG' if dev.type == 'cuda' else 'CPU'})", decode_only)
    if dev.type == "cuda":
        if importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.dali"):
            bench.row("data", "decode only (DALI mixed)", lambda: decode_only("dali"))
        else:
            bench.rows.append({"section": "data", "name": "decode only (DALI mixed)",
                               "error": "skipped: NVIDIA DALI not installed"})


def e2e_prefetch(bench, name, cfg, ds, compiled=False):
    a, dev = bench.args, bench.device
    step, aug = bench.step(name, cfg, compiled), GPUMultiCrop.from_config(cfg).to(dev)
    loader = jpeg_loader(a, ds, RawJPEGFolder.collate, a.iters + a.warmup, pin=False)
    return loop_img_s(a, gpu_batches(loader, aug, dev), step, dev, warmup=a.warmup)


def run_compiled(bench, cfgs, root):
    """Last, as each compile costs a minute or more: the ceiling at the q/k size (its speed-up
    scales every composition ceiling) and SANE-Single's step and end to end (one compile)."""
    a, dev = bench.args, bench.device
    fb = bench.ceiling.setdefault("fwd_bwd", {})

    def ceiling_compiled():
        train, _ = ceiling_fns(a, dev, a.size, compiled=True)
        img_s = a.batch_size / seconds_per_iter(train, a.iters, a.warmup, dev)
        bench.ceiling["fwd_bwd_compiled"] = {str(a.size): img_s}
        if str(a.size) in fb:
            bench.ceiling["compile_speedup"] = img_s / fb[str(a.size)]
        return img_s
    bench.row("ceiling", f"{a.arch} fwd+bwd {a.size}px compiled", ceiling_compiled)
    if "sane" not in cfgs:
        return
    cfg = cfgs["sane"]

    def step_compiled():
        step, batch = bench.step("sane", cfg, compiled=True), random_batch(cfg, dev)
        return a.batch_size / seconds_per_iter(lambda: step(*batch), a.iters, a.warmup, dev)
    if "step" in a.sections:
        bench.row("step", "sane (tensors on device) compiled", step_compiled, composition(cfg))
    if "e2e" in a.sections and root:
        ds = RawJPEGFolder(Path(root) / "train")
        bench.row("e2e", "sane GPU path, side-stream prefetch compiled",
                  lambda: e2e_prefetch(bench, "sane", cfg, ds, compiled=True), composition(cfg))


def run_e2e(bench, cfgs, root):
    a, dev = bench.args, bench.device
    ds = RawJPEGFolder(Path(root) / "train")
    for name, cfg in cfgs.items():
        bench.row("e2e", f"{name} GPU path, side-stream prefetch",
                  lambda name=name, cfg=cfg: e2e_prefetch(bench, name, cfg, ds), composition(cfg))
    if "sane" in cfgs:
        cfg = cfgs["sane"]

        def e2e_inline():   # as pretrain.engine does it: augment then step, one stream
            step, aug = bench.step("sane", cfg), GPUMultiCrop.from_config(cfg).to(dev)
            loader = jpeg_loader(a, ds, RawJPEGFolder.collate, a.iters + a.warmup)
            return loop_img_s(a, ((aug(d, dev), lab) for d, lab in loader), step, dev, warmup=a.warmup)
        bench.row("e2e", "sane GPU path, inline (as engine)", e2e_inline, composition(cfg))

        def e2e_cpu():
            step = bench.step("sane", cfg)
            loader = jpeg_loader(a, cpu_dataset(cfg, root), collate_views, max(2, a.iters // 2) + 1)
            return loop_img_s(a, loader, step, dev, warmup=1)
        bench.row("e2e", f"sane CPU path ({a.workers} workers)", e2e_cpu, composition(cfg))


# ---------------------------------------------------------------- table
def fmt(v, spec):
    return "" if v is None else format(v, spec)


def table(report):
    a = report["args"]
    lines = [f"# {report['device']}, torch {report['torch']}, {report['cpu_cores']} CPU cores, "
             f"{report['date']}; {a['arch']}, batch {a['batch_size']}, {a['size']} px, "
             f"{a['iters']} timed iters; wall {report['wall_s']} s",
             "| section | row | img/s | ceiling eager | ratio | ceiling compiled | ratio | s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if "error" in r:
            cells = [r["error"], "", "", "", ""]
        else:
            cells = [fmt(r["img_s"], ".1f"), fmt(r.get("ceiling_eager"), ".1f"),
                     fmt(r.get("ratio_eager"), ".2f"), fmt(r.get("ceiling_compiled"), ".1f"),
                     fmt(r.get("ratio_compiled"), ".2f")]
        cells.append(str(r.get("seconds", "")))
        lines.append(f"| {r['section']} | {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    try:  # before minutes of measurements, not after
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"benchmark: error: --json {args.json} cannot be written ({e.strerror or e}); pass a "
              "path in a writable folder", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    bench = Bench(args)
    cfgs = {}
    for name in METHODS:
        try:
            cfgs[name] = method_config(args, name)
        except Exception as e:  # noqa: BLE001
            bench.rows.append({"section": "config", "name": name, "error": f"error: {e}"[:120]})
    if cfgs:
        configure_determinism(next(iter(cfgs.values())))   # cudnn.benchmark, TF32, as the trainer
    mm_sizes = sorted({c for cfg in cfgs.values() if cfg.mm.enabled for c in cfg.mm.crops} - {args.size})
    with tempfile.TemporaryDirectory(prefix="bench_jpeg_") as tmp:
        root = args.data
        if not root and ("data" in args.sections or "e2e" in args.sections):
            # first, before CUDA and compile threads exist: the pool forks
            bench.row("data", f"write {args.num_images} JPEGs (images/s)", lambda: write_jpegs(args, tmp))
            root = tmp if (Path(tmp) / "train").is_dir() else None
        if "ceiling" in args.sections or "step" in args.sections or "e2e" in args.sections:
            run_ceiling(bench, [args.size] + mm_sizes)
        if "step" in args.sections:
            run_steps(bench, cfgs)
        if "data" in args.sections and root:
            run_data(bench, cfgs, root)
        if "e2e" in args.sections and root:
            run_e2e(bench, cfgs, root)
        if args.compile and set(args.sections) & {"ceiling", "step", "e2e"}:
            run_compiled(bench, cfgs, root)
    bench.save()
    print(table(bench.report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
