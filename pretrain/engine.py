"""The pretraining loop: DDP, bf16 autocast, cosine SGD, atomic checkpoints with automatic
resume, metrics (train loss, kNN, SLR label quality) and done.json at the end."""
import contextlib
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from torch.utils.data import DataLoader, DistributedSampler

from pretrain import utils
from pretrain.checkpoint import RunCheckpoints, has_run_state, rewind_metrics
from pretrain.config import check_resumable, read_config_file, save_config, switches
from pretrain.data import SkippedImages
from pretrain.gpu_augment import gpu_batches
from pretrain.losses import mu_schedule
from pretrain.model import build_model
from suite import contract, provenance

STAT_KEYS = ("loss", "loss_vanilla", "loss_mm", "inst_top1")
QUALITY_KEYS = ("slr_same_class_mass", "onehot_same_class_mass", "slr_other_same_class_mass",
                "slr_moved_mass", "slr_on_class_share", "other_same_class_key_share",
                "slr_label_error", "onehot_label_error")


def build_data(cfg, device):
    """(dataset, per-step batch fn). The CPU path collates the batch dict in the loader;
    the GPU path decodes and augments raw JPEG bytes on the device (pretrain.gpu_augment)."""
    if cfg.data.pipeline == "gpu":
        from pretrain.data import check_split_dir
        from pretrain.gpu_augment import GPUMultiCrop, RawJPEGFolder

        dataset = RawJPEGFolder(check_split_dir(cfg.data.root, "train"))
        return dataset, RawJPEGFolder.collate, GPUMultiCrop.from_config(cfg).to(device)
    from pretrain.data import build_train_dataset, collate_views

    return build_train_dataset(cfg), collate_views, None


def epoch_loader(cfg, dataset, collate, epoch, skip_batches, rank, world, local_batch):
    """This epoch's loader, starting `skip_batches` in (resume mid-epoch). The order depends
    only on (seed, epoch), and the loader has its own generator, so global RNG is untouched."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    usable = len(indices) // local_batch * local_batch
    indices = indices[skip_batches * local_batch:usable]
    g = torch.Generator()
    g.manual_seed(cfg.seed * 100003 + epoch * 1009 + rank)
    workers = 0 if cfg.deterministic else cfg.data.num_workers
    gpu_path = cfg.data.pipeline == "gpu"
    # GPU path: workers only read bytes, which nvJPEG parses on the host (pinning them is wasted
    # copies), and a batch is ~100x smaller than decoded views, so workers can run further ahead
    extra = {"prefetch_factor": 4} if gpu_path and workers > 0 else {}
    return DataLoader(dataset, batch_size=local_batch, sampler=indices, num_workers=workers,
                      collate_fn=collate, pin_memory=torch.cuda.is_available() and not gpu_path,
                      drop_last=True, worker_init_fn=utils.seed_worker, generator=g,
                      persistent_workers=False, **extra)


def knn_eval(cfg, model, device, rank, world):
    """kNN top-1 (k, exp(cos/t) weights) of the query backbone on val/ (CIFAR: test), fed by
    train/ (CIFAR: train)."""
    from pretrain.data import build_eval_datasets
    from pretrain.knn import extract_features, knn_top1

    sets = build_eval_datasets(cfg)
    if sets is None:
        return None
    train, val = sets
    if cfg.knn.max_train_images and len(train) > cfg.knn.max_train_images:
        g = torch.Generator().manual_seed(cfg.seed)
        keep = torch.randperm(len(train), generator=g)[: cfg.knn.max_train_images]
        train = torch.utils.data.Subset(train, keep.tolist())
    enc = model.encoder_q
    backbone = nn.Sequential(*[m for name, m in enc.named_children() if name != "fc"], nn.Flatten())

    def loader(ds):
        sampler = DistributedSampler(ds, world, rank, shuffle=False) if world > 1 else None
        # own generator: the monitor must not consume the training RNG (bit-exact resume)
        return DataLoader(ds, batch_size=cfg.knn.batch_size, sampler=sampler,
                          num_workers=0 if cfg.deterministic else cfg.data.num_workers,
                          generator=torch.Generator().manual_seed(cfg.seed))

    with torch.no_grad(), autocast_ctx(cfg, device):
        ftr, ltr = extract_features(backbone, loader(train), device)
        fte, lte = extract_features(backbone, loader(val), device)
    return float(knn_top1(ftr, ltr, fte, lte, len(val.classes), k=cfg.knn.k, t=cfg.knn.t))


def autocast_ctx(cfg, device):
    if device.type == "cuda" and cfg.amp == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def checkpoint_state(cfg, model, optimizer, scaler, it, ipe, knn_top1=None, skipped=None):
    """The checkpoint dict (docs/formats.md); pretrain.checkpoint checks and writes it."""
    m = model.module if hasattr(model, "module") else model
    state = m.state_dict()
    return {
        "model": state,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        # the same tensors as model's buffers: torch.save stores shared storage once
        "queue": {k: state[k] for k in ("queue", "queue_ptr", "queue_labels")},
        "epoch": it // ipe,
        "iter": it,
        "config": cfg.to_dict(),
        "rng": utils.get_rng_state(),
        "knn_top1": knn_top1,
        "skipped_images": skipped.state() if skipped is not None else None,
    }


def configure_determinism(cfg):
    """Deterministic kernels or cudnn's autotuner; TF32 as the numerics preset sets cfg.tf32."""
    if cfg.deterministic:
        # cuBLAS needs a fixed workspace for deterministic matmuls (read at its first call)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32


def train(cfg):
    """Run (or resume) the pretraining described by `cfg` in cfg.output_dir."""
    started = time.time()
    rank, world, device = utils.init_distributed(cfg.device)
    out = Path(cfg.output_dir or "output/pretrain")
    accepted, saved_config = [], out / contract.CONFIG
    if has_run_state(out) and saved_config.is_file():  # another run's directory?
        accepted = check_resumable(read_config_file(saved_config), cfg, saved_config)
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            contract.remove_stale_temp(out)
        except OSError as e:
            raise utils.UserError(f"output_dir={out} cannot be written ({e.strerror or e}: "
                                  f"{e.filename or out}): pass a writable output_dir=PATH") from None
    log = utils.setup_logger(out, rank)
    if accepted:
        log.info("config changed on resume (resume_allow): "
                 + ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in accepted))
    configure_determinism(cfg)
    if device.type == "cpu" and cfg.cpu_threads > 0:
        # leave cores to the loader workers: oversubscribed small CPUs run many times slower
        torch.set_num_threads(cfg.cpu_threads)
    utils.seed_all(cfg.seed + rank)

    if cfg.data.batch_size % world:
        raise utils.UserError(f"data.batch_size={cfg.data.batch_size} is not divisible by "
                              f"the {world} processes")
    local_batch = cfg.data.batch_size // world
    dataset, collate, gpu_aug = build_data(cfg, device)
    ipe = len(dataset) // cfg.data.batch_size
    if ipe == 0:
        raise utils.UserError(f"{cfg.data.root}: the training set has {len(dataset)} images, fewer than "
                              f"data.batch_size={cfg.data.batch_size}: lower the batch size")
    total_iters = cfg.epochs * ipe
    has_labels = bool(getattr(dataset, "classes", None))

    model = build_model(cfg).to(device)
    on_cuda = device.type == "cuda"
    if cfg.model.sync_bn and world > 1:
        if on_cuda:  # PyTorch's SyncBatchNorm runs on GPU modules only
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.warning("model.sync_bn ignored on CPU (SyncBatchNorm needs CUDA)")
    if on_cuda and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    base_lr = cfg.optim.lr * cfg.data.batch_size / 256
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=False)  # bf16 needs no loss scaling

    it, last_knn = 0, None
    ckpt_path = out / contract.CHECKPOINT
    ckpts = RunCheckpoints(out)
    ckpt = ckpts.resume(log)
    skipped = SkippedImages.from_state(ckpt.get("skipped_images") if ckpt else None)
    if ckpt is not None:
        ckpts.restore(ckpt, model, optimizer, scaler)
        it, last_knn = ckpt["iter"], ckpt.get("knn_top1")
        if world == 1:
            utils.set_rng_state(ckpt["rng"])
        else:
            utils.seed_all(cfg.seed + rank + 7919 * it)
        log.info(f"resumed from {ckpts.kept[0]} at iteration {it} (epoch {it // ipe})")
        if it > total_iters:
            raise utils.UserError(f"{ckpts.kept[0]} is at iteration {it}, past epochs={cfg.epochs} "
                                  f"({total_iters} iterations): pass epochs >= {-(-it // ipe)}")
    if rank == 0:  # the config is saved once the run is known to start (or resume) here
        save_config(cfg, saved_config)
        rewind_metrics(out / contract.METRICS, it)  # what ran after the checkpoint runs again
        if it < total_iters:  # not complete (any more): done.json would describe another run
            contract.done_file("pretrain", out).unlink(missing_ok=True)
    if cfg.compile:
        model.encoder_q.compile()
        model.encoder_k.compile()
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if on_cuda else None)

    metrics = utils.MetricLogger(out, enabled=rank == 0, tensorboard=cfg.log.tensorboard)
    log.info(f"{cfg.method} ({', '.join(f'{k}={v}' for k, v in switches(cfg).items())}); numerics "
             f"{cfg.numerics} (amp={cfg.amp}, tf32={str(cfg.tf32).lower()}, on CUDA)")
    log.info(f"{cfg.method}: {cfg.model.arch} ({cfg.model.stem} stem), {len(dataset)} images, {ipe} it/epoch, "
             f"{cfg.epochs} epochs, batch {cfg.data.batch_size} on {world} x {device.type}")
    progress = None
    if rank == 0 and cfg.log.progress:
        from tqdm import tqdm
        progress = tqdm(total=total_iters, initial=it, dynamic_ncols=True, desc=cfg.method)

    ran = 0

    def checkpoint(path):  # reads it and last_knn when called; every rank checks, rank 0 writes
        state = checkpoint_state(cfg, model, optimizer, scaler, it, ipe, last_knn, skipped)
        ckpts.check(state, it)
        if rank == 0:
            ckpts.save(state, path, it)

    sums = {}
    timer = utils.Throughput()
    for epoch in range(it // ipe, cfg.epochs):
        loader = epoch_loader(cfg, dataset, collate, epoch, it - epoch * ipe, rank, world, local_batch)
        if gpu_aug is not None:   # decode + augment batch n+1 on a side stream while step n runs
            loader = gpu_batches(loader, gpu_aug, device)
        net.train()
        for batch, labels in loader:
            lr = utils.cosine_lr(base_lr, it, total_iters, cfg.optim.warmup_epochs * ipe)
            for group in optimizer.param_groups:
                group["lr"] = lr
            mu = mu_schedule(it, total_iters, cfg.slr.mu_start, cfg.slr.mu_end)  # Eq. (5)
            skipped.add(batch.get("skipped", 0))
            im_q, im_k, mm = (to_device(batch[n], device, cfg) for n in ("q", "k", "mm"))
            labels = labels.to(device, non_blocking=True) if has_labels else None
            with autocast_ctx(cfg, device):
                loss, stats = net(im_q, im_k, mm, labels, mu)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            it += 1
            ran += 1
            timer.add(cfg.data.batch_size)
            for k, v in stats.items():  # summed on the device: no host sync per step
                sums[k] = sums.get(k, 0) + v
            sums["_n"] = sums.get("_n", 0) + 1
            if it % cfg.log.every_iters == 0 or it % ipe == 0:
                try:
                    log_step(metrics, progress, log, sums, epoch, it, lr, mu, timer, skipped.total(world))
                except FloatingPointError as e:  # the loss went NaN/Inf: say what is kept
                    raise ckpts.stop(str(e)) from None
                sums = {}
            elif progress is not None:
                progress.update(1)
            if cfg.max_iters_this_run and ran >= cfg.max_iters_this_run:
                checkpoint(ckpt_path)
                log.info(f"stopping after {ran} iterations as max_iters_this_run asks; "
                         f"rerun the same command to resume")
                finish(progress, metrics)
                return None
            if cfg.checkpoint.every_iters and it % cfg.checkpoint.every_iters == 0:
                checkpoint(ckpt_path)
        done_epochs = epoch + 1
        if cfg.knn.every_epochs and (done_epochs % cfg.knn.every_epochs == 0 or done_epochs == cfg.epochs):
            last_knn = run_knn(cfg, model, device, rank, world, log, metrics, done_epochs, it)
        checkpoint(ckpt_path)
        if cfg.checkpoint.save_every_epochs and done_epochs % cfg.checkpoint.save_every_epochs == 0:
            checkpoint(out / contract.snapshot(done_epochs))
    finish(progress, metrics)
    if rank == 0:
        # the record of what made the run (suite/provenance.py), then the done marker
        provenance.write(out, provenance.build(
            "pretrain", provenance.pretrain_schedule(yaml.safe_load(saved_config.read_text())),
            gpu_count=world if on_cuda else 0, weights=ckpt_path, pretrain_config=saved_config,
            wall_time_s=time.time() - started, resumed=ckpt is not None))
        contract.write_json(contract.done_file("pretrain", out), {
            "method": cfg.method, "switches": switches(cfg), "numerics": cfg.numerics, "arch": cfg.model.arch,
            "stem": cfg.model.stem, "epochs": cfg.epochs, "iters": it, "knn_top1": last_knn,
            "checkpoint": contract.CHECKPOINT})
        log.info(f"done: {it} iterations, kNN top-1 {last_knn}")
    return out


def to_device(x, device, cfg):
    if isinstance(x, (list, tuple)):
        return [to_device(t, device, cfg) for t in x]
    x = x.to(device, non_blocking=True)
    if device.type == "cuda" and cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def run_knn(cfg, model, device, rank, world, log, metrics, epoch, it):
    top1 = knn_eval(cfg, model, device, rank, world)
    if top1 is not None:
        metrics.log({"type": "knn", "epoch": epoch, "iter": it, "knn_top1": top1})
        log.info(f"epoch {epoch}: kNN top-1 {top1:.2f}")
    return top1


def log_step(metrics, progress, log, sums, epoch, it, lr, mu, timer, skipped_total):
    """Average the step statistics since the last call (one host sync) and write them."""
    n = sums.pop("_n")
    vals = {k: (v / n).item() for k, v in sums.items()}
    if not math.isfinite(vals["loss"]):
        # checked here, not per step, to keep the step free of host syncs
        raise FloatingPointError(f"non-finite loss {vals['loss']} by iteration {it} (epoch {epoch}): "
                                 "check the input batches (data.pipeline) and optim.lr")
    rate = timer.rate()
    rec = {"type": "train", "epoch": epoch, "iter": it, "lr": lr, "mu": mu, "img_per_s": rate,
           "skipped_images": skipped_total}
    rec.update({k: vals[k] for k in STAT_KEYS if k in vals})
    metrics.log(rec)
    if QUALITY_KEYS[0] in vals:
        metrics.log({"type": "label_quality", "epoch": epoch, "iter": it,
                     **{k: vals[k] for k in QUALITY_KEYS}})
    if progress is not None:
        progress.update(it - progress.n)
        progress.set_postfix(loss=f"{vals['loss']:.3f}", top1=f"{vals.get('inst_top1', math.nan):.0f}", lr=f"{lr:.4f}",
                             img_s=f"{rate:.0f}")
    log.info(f"epoch {epoch} it {it}: loss {vals['loss']:.4f} inst top-1 {vals.get('inst_top1', math.nan):.1f} "
             f"lr {lr:.5f} {rate:.1f} img/s")


def finish(progress, metrics):
    if progress is not None:
        progress.close()
    metrics.close()
