"""CPU data path: ImageFolder (or flat folder) that skips corrupted images, torchvision's
CIFAR-10/100 python batches, MoCo v2 weak / RandAugment strong views, and the collate into
the batch dict {"q", "k", "mm"} + labels."""
import warnings
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from pretrain.utils import UserError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def check_split_dir(root, split):
    """The folder `root/split`, or one clear error saying what to pass instead."""
    if not str(root):
        raise UserError("data.root is not set: pass data.root=PATH (an ImageFolder root with train/)")
    path = Path(root) / split
    if not path.is_dir():
        raise UserError(f"{path} not found: data.root must be an ImageFolder root holding "
                        f"{split}/<class>/*.jpg (got data.root={root})")
    return path


CIFAR = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}


def cifar_dataset(root, fmt, train, transform, keys=("data.root", "data.format")):
    """torchvision's CIFAR-10 / CIFAR-100 reader (download=False) on the python batches under
    `root` (root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} or
    root/cifar-100-python/{train,test,meta}), train or test split; yields (transform(PIL), label).

    Those batches are Python pickles, and torchvision reads them with pickle.load, which can run
    code. torchvision first checks every file's MD5 against the official archive's and refuses
    any other file, so only the published batches are ever unpickled. A missing file or a
    failed check is one clear error (UserError) naming `keys` (the root and format settings).
    """
    root_key, fmt_key = keys
    if not str(root):
        raise UserError(f"{root_key} is not set: pass the folder holding {CIFAR[fmt].base_folder}/")
    cls = CIFAR[fmt]
    folder = Path(root) / cls.base_folder
    names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{folder / missing[0]} not found: {fmt_key} {fmt} reads torchvision's "
                        f"python batches; pass as {root_key} the folder holding {cls.base_folder}/ "
                        f"(as extracted from {cls.filename})")
    try:
        return cls(str(root), train=train, transform=transform, download=False)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        raise UserError(f"{folder}: a file differs from the official {cls.filename} (MD5 check; "
                        "only those pickles are read): extract the archive again") from None


class ImageDataset(Dataset):
    """ImageFolder layout (root/<class>/x.jpg) or a flat folder of images (labels -1).

    A file that fails to decode is skipped: a warning names it, the next image is used in
    its place (the batch keeps its size, as DDP's collectives need) and the view dict of
    the sample records the indices of the files it skipped under `skipped`.
    """

    def __init__(self, root, transform):
        self.root, self.transform = Path(root), transform
        classes = sorted(d.name for d in self.root.iterdir() if d.is_dir()) if self.root.is_dir() else []
        if classes:
            self.classes = classes
            self.samples = make_dataset(str(self.root), {c: i for i, c in enumerate(classes)},
                                        extensions=IMG_EXTENSIONS, allow_empty=True)
        else:
            self.classes = []
            self.samples = [(str(p), -1) for p in sorted(self.root.iterdir())
                            if p.suffix.lower() in IMG_EXTENSIONS]
        if not self.samples:
            raise UserError(f"{self.root}: no images found (expected <class>/*.jpg or *.jpg); "
                            "check data.root")

    @property
    def has_labels(self):
        return bool(self.classes)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        skipped = []
        for _ in range(len(self.samples)):
            path, target = self.samples[index]
            try:
                with open(path, "rb") as f:
                    img = Image.open(f).convert("RGB")  # convert() forces the full decode
                break
            except (OSError, ValueError, UnidentifiedImageError) as e:
                warnings.warn(f"skipping corrupted image {path}: {e}", RuntimeWarning)
                skipped.append(index)
                index = (index + 1) % len(self.samples)
        else:
            raise UserError(f"{self.root}: no image could be decoded")
        out = self.transform(img)
        if isinstance(out, dict):
            out["skipped"] = skipped
        return out, target


def weak_augmentation(size, scale):
    """MoCo v2 augmentation as PIL ops (ToTensor/Normalize come after)."""
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # ~10% of the crop, odd (SimCLR / BYOL)
    return [
        T.RandomResizedCrop(size, scale=tuple(scale)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
    ]


def view_transform(size, scale, strong=False):
    """Weak view, or weak followed by RandAugment(n=5, m=10) (CLSA's "strong")."""
    ops = weak_augmentation(size, scale)
    if strong:
        ops.append(T.RandAugment(num_ops=5, magnitude=10))
    return T.Compose(ops + [T.ToTensor(), T.Normalize(MEAN, STD)])


def eval_transform(size, fmt="imagefolder"):
    """Resize (crop·256/224) + center crop, for the kNN monitor; CIFAR images (32 px, already
    the object) are only resized to `size` (a no-op at 32), as the CIFAR probes do."""
    if fmt in CIFAR:
        return T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(MEAN, STD)])
    return T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(MEAN, STD)])


class MultiCropTransform:
    """x (query) and x̃ (key) weak views at `crop`, plus one MM query crop per size in
    `mm_crops` (crops smaller than `crop` use the small scale range)."""

    def __init__(self, crop, scale, small_scale, mm_crops=(), strong_mm=False):
        self.view = view_transform(crop, scale)
        self.mm = [view_transform(s, scale if s >= crop else small_scale, strong_mm)
                   for s in mm_crops]

    def __call__(self, img):
        return {"q": self.view(img), "k": self.view(img), "mm": [t(img) for t in self.mm]}


def collate_views(samples):
    """[(views, label)] -> ({"q": [B,3,H,W], "k": ..., "mm": [[B,3,h,w], ...], "skipped": [file
    indices]}, labels)."""
    views = [s[0] for s in samples]
    batch = {
        "q": torch.stack([v["q"] for v in views]),
        "k": torch.stack([v["k"] for v in views]),
        "mm": [torch.stack([v["mm"][j] for v in views]) for j in range(len(views[0]["mm"]))],
        "skipped": [i for v in views for i in v.get("skipped", ())],
    }
    return batch, torch.tensor([s[1] for s in samples], dtype=torch.long)


def build_train_dataset(cfg):
    """The training dataset of the CPU pipeline, with the views of the config."""
    d = cfg.data
    mm_crops = cfg.mm.crops if cfg.mm.enabled else []
    tf = MultiCropTransform(d.crop, d.scale, d.small_scale, mm_crops, d.strong_mm)
    if d.format in CIFAR:
        return cifar_dataset(d.root, d.format, True, tf)
    return ImageDataset(check_split_dir(d.root, "train"), tf)


class SkippedImages:
    """The undecodable images of a run: distinct files (sample indices of the CPU path), not
    retries, counted on across a resume (the checkpoint keeps `state()`). The GPU path only knows
    how many images of a batch failed: those counts are added as they come."""

    def __init__(self, files=(), count=0):
        self.files, self.count = set(files), count

    @classmethod
    def from_state(cls, state):
        state = state if isinstance(state, dict) else {}
        return cls(state.get("files", ()), state.get("count", 0))

    def state(self):
        return {"files": sorted(self.files), "count": self.count}

    def add(self, skipped):
        if isinstance(skipped, int):
            self.count += skipped
        else:
            self.files.update(int(i) for i in skipped)

    def total(self, world=1):
        """Distinct files over every process (a collective when world > 1) plus GPU-path counts."""
        if world > 1:
            import torch.distributed as dist

            parts = [None] * world
            dist.all_gather_object(parts, (sorted(self.files), self.count))
            self.files.update(i for files, _ in parts for i in files)
            return len(self.files) + sum(c for _, c in parts)
        return len(self.files) + self.count


def build_eval_datasets(cfg):
    """(train, val) datasets of the kNN monitor with the evaluation transform: ImageFolder
    train/ and val/ (None when val/ is absent or either is unlabelled), or CIFAR's train and
    test splits."""
    d = cfg.data
    tf = eval_transform(d.crop, d.format)
    if d.format in CIFAR:
        return cifar_dataset(d.root, d.format, True, tf), cifar_dataset(d.root, d.format, False, tf)
    root = Path(d.root)
    if not (root / "val").is_dir():
        return None
    train, val = ImageDataset(root / "train", tf), ImageDataset(root / "val", tf)
    return (train, val) if train.has_labels and val.has_labels else None
