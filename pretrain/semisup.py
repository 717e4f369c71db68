"""Semi-supervised fine-tuning (SimCLR / BYOL protocol): the whole pretrained network plus a new
linear head trained on the labelled subset of an ImageFolder's train/ that a subset list names (1 %
or 10 %), top-1 / top-5 on val/.
`python -m pretrain.semisup --checkpoint CKPT --data ROOT --subset 1percent.txt --task semi_1pct`.

A subset list is SimCLR's format: one train image file name a line (`n01558993_4750.JPEG`), found
in ROOT/train/<class>/ by name (a line with a `/` is matched against the path's tail instead).
Schedule (SimCLR appendix B.5): SGD with Nesterov momentum 0.9, lr 0.05·batch/256, no weight
decay, no warm-up, here a per-step cosine decay to 0; 60 epochs for semi_1pct, 30 for semi_10pct;
train views RandomResizedCrop + flip, val views resize + center crop (the kNN monitor's). BN is
trained with the rest; bf16 autocast on CUDA. One process on one device; killed or requeued, a
rerun with the same arguments resumes after the last finished epoch (pretrain/resume.py), as the
linear probe does."""
import argparse
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from pretrain.linear import (add_source_args, image_folders, probe_transforms, source_backbone, source_name,
                             source_output_dir)
from pretrain.model import STEMS
from pretrain.resume import EpochState
from pretrain.utils import MetricLogger, UserError, cosine_lr, run_command
from suite import contract, provenance

EPOCHS = {"semi_1pct": 60, "semi_10pct": 30}


def read_subset(path, samples):
    """Indices into `samples` ([(path, label)]) of the images a subset list names, in list order.
    A name that matches no train image, or several, is a UserError naming the list and the name."""
    path = Path(path)
    try:
        names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except OSError as e:
        raise UserError(f"subset list {path} cannot be read ({e.strerror or e}); pass --subset FILE "
                        "(one train image file name a line)") from None
    if not names:
        raise UserError(f"subset list {path} names no image; pass a list with one file name a line")
    by_name = {}
    for i, (p, _) in enumerate(samples):
        by_name.setdefault(Path(p).name, []).append(i)
    picked = []
    for name in dict.fromkeys(names):   # a repeated line counts once
        hits = by_name.get(Path(name).name, [])
        if "/" in name:
            hits = [i for i in hits if Path(samples[i][0]).as_posix().endswith("/" + name.strip("/"))]
        if len(hits) != 1:
            what = "no" if not hits else f"{len(hits)}"
            raise UserError(f"subset list {path}: {name!r} matches {what} train images; the list must name "
                            "images under the train/ of --data (with class/name where names repeat)")
        picked.append(hits[0])
    return picked


def topk_accuracy(logits, labels, ks=(1, 5)):
    """{k: percent of rows whose label is among the k highest logits} (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return {k: 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks}


@torch.no_grad()
def evaluate(model, loader, device):
    model.eval()
    logits, labels = [], []
    for images, target in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits.append(model(images.to(device, non_blocking=True)).float())
        labels.append(target.to(device))
    model.train()
    return topk_accuracy(torch.cat(logits), torch.cat(labels))


def fine_tune(model, loader, epochs, lr, device, log=None, state=None):
    """SGD + Nesterov on every parameter, per-step cosine lr; log(record) after each epoch.
    state: a pretrain.resume.EpochState (with the loader's generator), saved after each epoch and
    resumed from."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr, momentum=0.9, nesterov=True, weight_decay=0.0)
    total = epochs * len(loader)
    parts = {"model": model, "optimizer": opt}
    start, it = state.restore(parts, loader.generator) if state is not None else (0, 0)
    model.train()
    for epoch in range(start, epochs):
        loss_sum, n = torch.zeros((), device=device), 0
        for images, target in loader:
            for group in opt.param_groups:
                group["lr"] = cosine_lr(lr, it, total)
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(images).float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, n, it = loss_sum + loss.detach() * len(target), n + len(target), it + 1
        if not torch.isfinite(loss_sum):
            raise UserError(f"fine-tuning diverged (loss {loss_sum.item()}) in epoch {epoch + 1}; pass a smaller --lr")
        if log is not None:
            log({"type": "semisup", "epoch": epoch + 1, "iter": it, "loss": loss_sum.item() / n,
                 "lr": opt.param_groups[0]["lr"]})
        if state is not None:
            state.save(parts, epoch + 1, it, loader.generator)
    return model


def run(args):
    started = time.time()
    backbone, info, device = source_backbone(args)
    train_tf, test_tf = probe_transforms(args.image_size, "imagefolder")
    train, val = image_folders(args.data, train_tf, test_tf)
    picked = read_subset(args.subset, train.samples)
    epochs = args.epochs or EPOCHS.get(args.task, 30)
    batch_size = args.batch_size
    lr = args.lr if args.lr is not None else 0.05 * batch_size / 256
    for p in backbone.parameters():  # probe_backbone freezes it: here every layer trains
        p.requires_grad_(True)
    with torch.no_grad():
        dim = backbone(torch.zeros(1, 3, args.image_size, args.image_size)).flatten(1).shape[1]
    head = nn.Linear(dim, len(train.classes))
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    model = nn.Sequential(backbone, nn.Flatten(1), head).to(device)
    out_dir = source_output_dir(args, lambda run: run / args.task)
    g = torch.Generator().manual_seed(args.seed)
    cuda = device.type == "cuda"
    train_loader = DataLoader(Subset(train, picked), batch_size=min(batch_size, len(picked)), shuffle=True,
                              generator=g, num_workers=args.num_workers, pin_memory=cuda, drop_last=False)
    val_loader = DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=args.num_workers, pin_memory=cuda)
    state = EpochState(out_dir, {**vars(args), "epochs": epochs, "lr": lr, "device": str(device)})
    logger = MetricLogger(out_dir)
    fine_tune(model, train_loader, epochs, lr, device, logger.log, state)
    acc = evaluate(model, val_loader, device)
    logger.log({"type": "semisup_eval", "epoch": epochs, "top1": acc[1], "top5": acc[5]})
    logger.close()
    result = {"task": args.task, "backbone": source_name(args), "seed": args.seed, "top1": acc[1], "top5": acc[5],
              "subset": str(args.subset), "num_labelled": len(picked), "num_train": len(train),
              "num_val": len(val), "epochs": epochs, "lr": lr, "batch_size": batch_size,
              "checkpoint": None if args.random_init else str(args.checkpoint),
              contract.RANDOM_INIT: bool(args.random_init), "arch": info["arch"], "stem": info["stem"],
              "data": str(args.data), "image_size": args.image_size}
    schedule = {"name": "cosine", "epochs": epochs, "optimizer": "SGD nesterov 0.9, no weight decay"}
    provenance.write_frozen_run(  # suite/provenance.py; then the done marker
        out_dir, "semisup", (batch_size, lr, schedule, provenance.DEFAULT_NUMERICS,
                             "bf16" if device.type == "cuda" else None, args.seed),
        device=device, weights=None if args.random_init else args.checkpoint, started=started)
    contract.write_json(contract.done_file("semisup", out_dir), result)
    state.remove()
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pretrain.semisup", description=__doc__.split("\n\n")[0])
    add_source_args(p)
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/")
    p.add_argument("--subset", required=True, help="subset list: one train image file name a line (SimCLR's)")
    p.add_argument("--task", default="semi_1pct", help="its name in the table; semi_1pct / semi_10pct set "
                                                       "the epochs (60 / 30)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float, help="default 0.05 * batch size / 256")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--arch", help="torchvision ResNet name (default: the checkpoint's, else resnet50)")
    p.add_argument("--stem", choices=STEMS, help="default: the checkpoint's")
    p.add_argument("--backbone", help="the name in the results table (default: the checkpoint's run folder)")
    p.add_argument("--output-dir", help="default: <checkpoint folder>/<task> (required with --random-init)")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="head init, batch order, augmentation; --random-init's weights")
    return p.parse_args(argv)


def main(argv=None):
    return run_command("pretrain.semisup", run, parse_args(argv),
                       ("task", "backbone", "seed", "top1", "top5", "num_labelled"))


def cli(argv=None):
    """The command (sane-semisup): main's exit code, not its result."""
    main(argv)
    return 0


if __name__ == "__main__":
    main()
