"""Linear probes on frozen features: ImageNet / CIFAR-10 top-1 and VOC07 multi-label mAP, and
the kNN top-1 of the same frozen features (the trainer's monitor protocol).
`python -m pretrain.linear --checkpoint CKPT --data ROOT --preset imagenet|cifar|voc07`, or
`--random-init --arch resnet18 [--stem cifar] --seed S --output-dir D` for an untrained network."""
import argparse
import math
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from pretrain.config import DEFAULTS
from pretrain.data import CIFAR, MEAN, STD, cifar_dataset, eval_transform
from pretrain.knn import extract_features, knn_top1
from pretrain.model import STEMS, build_backbone
from pretrain.resume import EpochState
from pretrain.safe_load import WeightsFileError
from pretrain.utils import MetricLogger, UserError, cosine_lr, run_command, seed_all
from pretrain.weights import BackboneError, backbone_stem, read_backbone
from suite import contract, provenance

# The paper's protocols (method.md). Features are extracted once with the test transform and
# cached, except for `augment` presets, whose train features are re-extracted every epoch from
# RandomResizedCrop+flip views (MoCo main_lincls). The backbone is always frozen, BN in eval.
# normalize: L2-normalise features before the classifier (the VOC07 SVM protocol does; the
# ImageNet/CIFAR probes train nn.Linear on the raw pooled features as main_lincls does).
PRESETS = {
    "imagenet": dict(optimizer="sgd", lr=10.0, momentum=0.9, weight_decay=0.0, epochs=100,
                     batch_size=256, image_size=224, augment=True, normalize=False),
    "cifar": dict(optimizer="adam", lr=0.01, momentum=0.0, weight_decay=0.0, epochs=200,
                  batch_size=256, image_size=32, augment=False, normalize=False),
    "voc07": dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.0, epochs=100,
                  batch_size=256, image_size=224, augment=False, normalize=True),
}
assert tuple(PRESETS) == contract.PROBE_PRESETS  # the pipeline's probe stages name these


# ---------------------------------------------------------------- checkpoints and backbone
def read_backbone_state(path):
    """(torchvision-named backbone state dict without fc, arch or None) from any of: this
    project's pretraining checkpoint, a plain torchvision state dict, or MoCo's official
    {"state_dict": {"module.encoder_q.*"}, "arch"}."""
    state, arch, _ = read_checkpoint(path)
    return state, arch


def read_checkpoint(path):
    """read_backbone_state's (state, arch) and the checkpoint's saved config (dict or None); the
    backbone found by pretrain.weights (the one table of checkpoint layouts), read safely."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; pass --checkpoint PATH to a "
                        "pretraining checkpoint.pth or a torchvision/MoCo state dict")
    try:
        backbone, ckpt = read_backbone(path)  # weights_only: a checkpoint from elsewhere runs no code
    except (WeightsFileError, BackboneError) as e:
        raise UserError(f"checkpoint {e}; pass a ResNet checkpoint") from None
    # MoCo's main_moco names the arch beside its state_dict; ours is in the saved config
    arch = ckpt.get("arch") if isinstance(ckpt.get("state_dict"), dict) else _config_arch(ckpt.get("config"))
    config = ckpt.get("config")
    return backbone.state, arch if isinstance(arch, str) else None, config if isinstance(config, dict) else None


def _config_arch(config):
    """The backbone name stored in a pretraining checkpoint's resolved config, if any."""
    if not isinstance(config, dict):
        return None
    model = config.get("model")
    arch = config.get("arch") or (model.get("arch") if isinstance(model, dict) else None)
    return arch if isinstance(arch, str) else None


def _config_value(config, section, key):
    value = (config or {}).get(section)
    value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) else None


def probe_backbone(checkpoint=None, arch=None, stem=None):
    """(frozen backbone with fc = Identity, {"arch", "stem", "data_format"}). From a checkpoint:
    arch and stem from the arguments, else the checkpoint's; data_format is its config's
    data.format (None without one). checkpoint=None: a random-init network (seed first),
    arch default resnet50, stem default imagenet."""
    state, config = None, None
    if checkpoint is not None:
        state, ckpt_arch, config = read_checkpoint(checkpoint)
        arch, stem = arch or ckpt_arch, stem or backbone_stem({"config": config}, state)[0]
    arch, stem = arch or "resnet50", stem or "imagenet"
    where = f" (checkpoint {checkpoint})" if checkpoint is not None else ""
    try:
        backbone = build_backbone(arch, stem)
    except ValueError as e:  # build_backbone names the bad arch or stem and the fix
        raise UserError(f"{e}{where}") from None
    if state is not None:
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError:
            raise UserError(f"checkpoint {checkpoint} does not match arch {arch} with the {stem} stem "
                            "(missing, extra or mis-shaped keys); pass the --arch / --stem it was "
                            "trained with") from None
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone.eval(), {"arch": arch, "stem": stem,
                             "data_format": _config_value(config, "data", "format")}


def add_source_args(p):
    """--checkpoint | --random-init: the backbone of a command on frozen features (this probe,
    pretrain.svm, pretrain.semisup), read by source_backbone."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="pretraining checkpoint.pth, torchvision or MoCo state dict")
    source.add_argument("--random-init", action="store_true",
                        help="an untrained network (--arch, --stem; weights from --seed)")


def source_backbone(args):
    """(backbone, info, device) of add_source_args' choice with --arch, --stem, --seed, --device:
    --random-init needs --output-dir (it has no checkpoint folder to write into), and its weights
    come from --seed (every generator is seeded here, before building)."""
    if args.random_init and not args.output_dir:
        raise UserError("--random-init has no checkpoint folder to write into: pass --output-dir")
    seed_all(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone, info = probe_backbone(None if args.random_init else args.checkpoint, args.arch, args.stem)
    return backbone, info, device


def source_name(args):
    """The backbone's name in the results table: --backbone, else random_init, else the name of the
    checkpoint's pretraining run."""
    if args.backbone:
        return args.backbone
    if args.random_init:
        return contract.RANDOM_INIT
    return contract.pretrain_run(Path(args.checkpoint).resolve().parent).backbone


def source_output_dir(args, default, settings=None):
    """The folder a command on frozen features writes: --output-dir, else default(<checkpoint
    folder>) (source_backbone refuses --random-init without --output-dir), created, with
    `settings` = (file name, dict) written into it first; one line when it cannot be written."""
    out_dir = Path(args.output_dir or default(Path(args.checkpoint).resolve().parent))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if settings is not None:
            contract.write_json(out_dir / settings[0], settings[1])
    except OSError as e:
        raise UserError(f"--output-dir {out_dir} cannot be written ({e.strerror or e}); pass a "
                        "writable --output-dir") from None
    return out_dir


def build_frozen_backbone(checkpoint, arch=None, stem=None):
    """The checkpoint's backbone with fc = Identity, frozen, and its arch (probe_backbone)."""
    backbone, info = probe_backbone(checkpoint, arch, stem)
    return backbone, info["arch"]


# ---------------------------------------------------------------- data
def probe_transforms(image_size, fmt="imagefolder"):
    """(train-augmentation, test) transforms. The test view is the kNN monitor's for the data
    format (pretrain.data.eval_transform): CIFAR batches are only resized (the images are the
    crop), image folders resized (size·256/224) and center-cropped, whatever the preset, so the
    probe's kNN of a checkpoint is the number its run logged."""
    norm = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    train = transforms.Compose([transforms.RandomResizedCrop(image_size),
                                transforms.RandomHorizontalFlip()] + norm)
    return train, eval_transform(image_size, fmt)


def image_folders(root, train_tf, test_tf):
    """ImageFolder train/ and val/; val labels use train's class indices (val may lack classes)."""
    root = Path(root)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise UserError(f"data root {root} has no train/ and val/ folders; pass an "
                        "ImageFolder root (synthetic corpus: DIR/imagefolder), or --data-format "
                        "cifar10 / cifar100 for torchvision's CIFAR batches")
    try:
        train, val = datasets.ImageFolder(root / "train", train_tf), datasets.ImageFolder(root / "val", test_tf)
    except FileNotFoundError as e:  # no class folders / no images in one split
        raise UserError(f"data root {root}: {e}; expected train/<class>/*.jpg and val/<class>/*.jpg") from None
    unknown = set(val.classes) - set(train.classes)
    if unknown:
        raise UserError(f"data root {root}: val/ has classes {sorted(unknown)} missing "
                        "from train/; give both splits the same class folders")
    val.samples = [(p, train.class_to_idx[val.classes[t]]) for p, t in val.samples]
    val.targets = [t for _, t in val.samples]
    return train, val


def read_voc_annotation(xml_path, class_index):
    """(present [C], difficult_only [C]) for one image; difficult objects count as present."""
    present, easy = torch.zeros(len(class_index)), torch.zeros(len(class_index))
    for obj in ET.parse(xml_path).getroot().iter("object"):
        c = class_index[obj.findtext("name").strip()]
        present[c] = 1
        if int(obj.findtext("difficult") or 0) == 0:
            easy[c] = 1
    return present, (present == 1) & (easy == 0)


class VOC07Classification(Dataset):
    """VOC2007 image-level multi-label set; items are (image, index), targets looked up by index."""

    def __init__(self, voc_root, split, transform, classes):
        self.root, self.transform, self.classes = Path(voc_root), transform, list(classes)
        ids_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        self.ids = [i.strip() for i in ids_file.read_text().split() if i.strip()]
        index = {c: i for i, c in enumerate(self.classes)}
        try:
            rows = [read_voc_annotation(self.root / "Annotations" / f"{i}.xml", index) for i in self.ids]
        except KeyError as e:
            raise UserError(f"{self.root}/Annotations names class {e} not in --classes; "
                            "pass the full class list") from None
        self.targets = torch.stack([r[0] for r in rows])      # [N, C] 1 = present
        self.ignore = torch.stack([r[1] for r in rows])       # [N, C] only difficult objects

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        img = Image.open(self.root / "JPEGImages" / f"{self.ids[i]}.jpg").convert("RGB")
        return self.transform(img), i


def voc_classes(voc_root, splits=("trainval", "test")):
    """The sorted set of object names in the annotations of the given splits."""
    names = set()
    for split in splits:
        for i in (voc_root / "ImageSets" / "Main" / f"{split}.txt").read_text().split():
            names.update(o.findtext("name").strip() for o in
                         ET.parse(voc_root / "Annotations" / f"{i}.xml").getroot().iter("object"))
    return sorted(names)


def voc07_sets(root, train_tf, test_tf, classes=None):
    """VOC07 trainval and test; classes from --classes, else the names in the annotations."""
    voc = Path(root) / "VOC2007"
    if not all((voc / "ImageSets" / "Main" / f"{s}.txt").is_file() for s in ("trainval", "test")):
        raise UserError(f"data root {root} has no VOC2007/ImageSets/Main/{{trainval,test}}.txt; "
                        "pass the folder holding VOC2007 (synthetic corpus: DIR)")
    classes = classes or voc_classes(voc)
    return (VOC07Classification(voc, "trainval", train_tf, classes),
            VOC07Classification(voc, "test", test_tf, classes))


# ---------------------------------------------------------------- metrics
def average_precision(scores, targets, ignore=None):
    """VOC all-points AP of one class: area under the precision envelope (max precision at
    recall >= r), summed where recall rises. `ignore` rows (difficult-only) are dropped."""
    if ignore is not None:
        scores, targets = scores[~ignore], targets[~ignore]
    targets = targets.float()
    if targets.sum() == 0:
        return float("nan")
    order = torch.sort(scores, descending=True, stable=True).indices
    tp = targets[order].cumsum(0)
    precision = tp / torch.arange(1, len(tp) + 1, dtype=tp.dtype, device=tp.device)
    recall = tp / targets.sum()
    envelope = precision.flip(0).cummax(0).values.flip(0)
    recall_step = recall - torch.cat([recall.new_zeros(1), recall[:-1]])
    return float((recall_step * envelope).sum())


def mean_average_precision(scores, targets, ignore):
    """(mAP in percent over classes with a positive, per-class AP list) for [N, C] inputs."""
    aps = [average_precision(scores[:, c], targets[:, c], ignore[:, c]) for c in range(scores.shape[1])]
    valid = [a for a in aps if not math.isnan(a)]
    return 100.0 * sum(valid) / max(len(valid), 1), aps


def top1(logits, labels):
    return 100.0 * (logits.argmax(dim=1) == labels).float().mean().item()


# ---------------------------------------------------------------- training on cached features
def fit_linear(train_features, num_outputs, epochs, lr, batch_size, optimizer="sgd", momentum=0.9,
               weight_decay=0.0, evaluate=None, log=None, state=None):
    """Train nn.Linear on frozen features with a per-iteration cosine lr and return it.

    train_features(epoch) -> (feats [N, D], targets): class indices [N] (cross-entropy) or
    multi-hot [N, C] (binary cross-entropy, VOC07). evaluate(classifier) -> dict of metrics,
    called after every epoch; log(record) receives them with type, epoch, iter, loss and lr.
    state: a pretrain.resume.EpochState, saved after each epoch and resumed from.
    """
    feats, targets = train_features(0)
    classifier = nn.Linear(feats.shape[1], num_outputs).to(feats.device)
    nn.init.normal_(classifier.weight, std=0.01)   # main_lincls init
    nn.init.zeros_(classifier.bias)
    if optimizer == "sgd":
        opt = torch.optim.SGD(classifier.parameters(), lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(classifier.parameters(), lr, weight_decay=weight_decay)
    total_iters = epochs * math.ceil(feats.shape[0] / batch_size)
    loss_fn = F.cross_entropy if targets.dim() == 1 else F.binary_cross_entropy_with_logits
    parts = {"classifier": classifier, "optimizer": opt}
    start, it = state.restore(parts) if state is not None else (0, 0)
    for epoch in range(start, epochs):
        if epoch > 0:
            feats, targets = train_features(epoch)
        total = torch.zeros((), device=feats.device)   # summed on device: no sync per step
        for idx in torch.randperm(feats.shape[0], device=feats.device).split(batch_size):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(lr, it, total_iters)
            loss = loss_fn(classifier(feats[idx]), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, it = total + loss.detach() * len(idx), it + 1
        row = {"type": "linear", "epoch": epoch + 1, "iter": it, "loss": total.item() / feats.shape[0],
               "lr": opt.param_groups[0]["lr"]}
        if evaluate is not None:
            with torch.no_grad():
                row.update(evaluate(classifier.eval()))
            classifier.train()
        if log is not None:
            log(row)
        if state is not None:
            state.save(parts, epoch + 1, it)
    return classifier


# ---------------------------------------------------------------- the probe
def run_probe(args):
    """Extract frozen features, train the linear classifier, write linear_metrics.json; for the
    top-1 presets also the kNN top-1 of the same frozen features (test transform, L2-normalised,
    the monitor's k and t), so a random-init backbone and a pretrained one are measured alike."""
    started = time.time()
    cfg = dict(PRESETS[args.preset])
    cfg.update({k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "image_size")
                if getattr(args, k) is not None})
    backbone, info, device = source_backbone(args)
    backbone.to(device)
    fmt = args.data_format or info["data_format"] or "imagefolder"
    train_tf, test_tf = probe_transforms(cfg["image_size"], fmt)
    classes = _parse_classes(args.classes, args.data)
    if args.preset == "voc07":
        train_set, test_set = voc07_sets(args.data, test_tf, test_tf, classes)
        fmt = "voc07"
    else:
        train_set, test_set = classification_sets(args.data, fmt, train_tf if cfg["augment"] else test_tf,
                                                  test_tf)
    num_outputs = len(train_set.classes)
    # the resolved settings next to the results (design.md: every run saves its config)
    settings = {**vars(args), **cfg, **info, "data_format": fmt, "device": str(device)}
    out_dir = source_output_dir(args, lambda run: contract.probe_dir(run, args.preset),
                                (contract.PROBE_CONFIG, settings))

    def loader(ds):
        return DataLoader(ds, batch_size=cfg["batch_size"], shuffle=False, num_workers=args.num_workers,
                          pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0)

    train_loader, test_loader = loader(train_set), loader(test_set)

    def features(loader):
        feats, labels = extract_features(backbone, loader, device, normalize=cfg["normalize"])
        if args.preset == "voc07":  # labels are image indices: look up multi-hot targets
            return feats, loader.dataset.targets.to(device)[labels]
        return feats, labels

    cached = features(train_loader)
    test_feats, test_targets = features(test_loader)
    knn = None
    if args.preset != "voc07":
        # the monitor's protocol on the test-transform features of both splits (L2-normalised)
        knn_train = cached
        if cfg["augment"]:
            knn_train = features(loader(classification_sets(args.data, fmt, test_tf, test_tf)[0]))
        knn = knn_top1(F.normalize(knn_train[0], dim=1), knn_train[1], F.normalize(test_feats, dim=1),
                       test_targets, num_outputs, k=args.knn_k, t=args.knn_t)
        del knn_train

    def train_features(epoch):  # fresh augmented views each epoch, else the cached features
        return features(train_loader) if cfg["augment"] and epoch > 0 else cached

    if args.preset == "voc07":
        ignore = test_set.ignore.to(device)

        def evaluate(clf):
            return {"mAP": mean_average_precision(clf(test_feats), test_targets, ignore)[0]}
    else:
        def evaluate(clf):
            return {"top1": top1(clf(test_feats), test_targets)}

    logger, last = MetricLogger(out_dir), {}
    state = EpochState(out_dir, settings)
    fit_linear(train_features, num_outputs, cfg["epochs"], cfg["lr"], cfg["batch_size"],
               cfg["optimizer"], cfg["momentum"], cfg["weight_decay"], evaluate,
               log=lambda row: (last.update(row), logger.log(row)), state=state)
    logger.close()
    if not last:  # resumed after its last epoch (killed before the result): the record it logged
        last = [r for r in contract.read_jsonl(out_dir / contract.METRICS) if r.get("type") == "linear"][-1]
    metric = "mAP" if args.preset == "voc07" else "top1"
    result = {"preset": args.preset, metric: last[metric]}
    if knn is not None:
        result.update(knn_top1=knn, knn_k=args.knn_k, knn_t=args.knn_t)
    result.update({"checkpoint": None if args.random_init else str(args.checkpoint),
                   contract.PROBE_RANDOM_INIT: bool(args.random_init)},
                  arch=info["arch"], stem=info["stem"],
                  data=str(args.data), data_format=fmt, epochs=cfg["epochs"], seed=args.seed)
    weights = None if args.random_init else args.checkpoint
    provenance.write_frozen_run(  # suite/provenance.py; then the done marker
        out_dir, "probe", provenance.probe_schedule(settings),
        device=device, weights=weights, started=started)
    contract.write_json(contract.done_file("probe", out_dir), result)
    state.remove()
    return result


def classification_sets(root, fmt, train_tf, test_tf):
    """(train, test) of a top-1 probe: ImageFolder train/ val/, or CIFAR-10/100 train / test."""
    if fmt in CIFAR:
        return (cifar_dataset(root, fmt, True, train_tf, keys=("--data", "--data-format")),
                cifar_dataset(root, fmt, False, test_tf, keys=("--data", "--data-format")))
    if fmt != "imagefolder":
        raise UserError(f"--data-format {fmt}: use imagefolder, cifar10 or cifar100")
    return image_folders(root, train_tf, test_tf)


def _parse_classes(spec, data):
    """--classes: "synthetic" (the class list of the corpus in `data`, from its corpus.json), a comma
    list, or None (the names in the annotations)."""
    if not spec:
        return None
    if spec == "synthetic":
        try:
            return list(contract.corpus_classes(data))
        except (OSError, ValueError) as e:
            reason = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) else str(e)
            raise UserError(f"--classes synthetic reads the corpus's class list ({reason}); pass as --data "
                            "the corpus folder, or the names as --classes a,b,c") from None
    return [c.strip() for c in spec.split(",") if c.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pretrain.linear", description=__doc__)
    add_source_args(p)
    p.add_argument("--data", required=True, help="ImageFolder root with train/ val/, the folder holding "
                                                 "cifar-10-batches-py/ (or cifar-100-python/), or the "
                                                 "folder holding VOC2007")
    p.add_argument("--data-format", choices=("imagefolder", *CIFAR),
                   help="of --data for the imagenet / cifar presets (default: the checkpoint config's "
                        "data.format, else imagefolder)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="imagenet")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--arch", help="torchvision ResNet name (default: the checkpoint's, else resnet50)")
    p.add_argument("--stem", choices=STEMS, help="ResNet stem (default: the checkpoint config's model.stem, "
                                                 "else cifar for a 3x3 conv1, else imagenet)")
    p.add_argument("--knn-k", type=int, default=DEFAULTS["knn"]["k"], help="kNN neighbours (the monitor's)")
    p.add_argument("--knn-t", type=float, default=DEFAULTS["knn"]["t"], help="kNN temperature (the monitor's)")
    p.add_argument("--classes", help='VOC class list: "synthetic" or comma-separated names '
                                     "(default: sorted names found in the annotations)")
    p.add_argument("--output-dir", help="default: <checkpoint folder>/linear_<preset> (required with --random-init)")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="classifier init and order; --random-init's weights")
    return p.parse_args(argv)


def main(argv=None):
    return run_command("pretrain.linear", run_probe, parse_args(argv))


def cli(argv=None):
    """The command (sane-probe): main's exit code, not its result."""
    main(argv)
    return 0


if __name__ == "__main__":
    main()
