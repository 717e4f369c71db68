"""A tiny CIFAR-10 / CIFAR-100 in torchvision's python format, written as the published
archives are: Python 2 pickles (protocol 2, byte strings as BINSTRING) of dicts whose keys read
back as b"data" with encoding="bytes" and as "data" with encoding="latin1" (torchvision), holding
`data` uint8 [N, 3072] (R, G, B planes of 32x32 images, row-major) and the labels.

torchvision checks each file's MD5 against the official archive's before unpickling; the
`official_md5` context manager makes it accept these files for a test (monkeypatch).
"""
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
from torchvision import datasets

CIFAR10_CLASSES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
                   b"ship", b"truck"]


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 as CPython 2's cPickle wrote it: a byte string is (SHORT_)BINSTRING."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256
                   else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _dump(obj, path):
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _images(rng, n, labels):
    """[N, 3072] uint8: a class-coloured square on noise, so a class is learnable."""
    imgs = rng.integers(0, 64, (n, 3, 32, 32), dtype=np.uint8)
    for i, c in enumerate(labels):
        colour = np.array([(c * 97) % 256, (c * 53) % 256, (c * 29) % 256], dtype=np.uint8)
        imgs[i, :, 8:24, 8:24] = colour[:, None, None]
    return imgs.reshape(n, 3072)


def write_cifar10(root, per_batch=8, seed=0):
    """root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}; returns the
    (train, test) arrays [N, 32, 32, 3] and labels, in file order."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": ([], []), "test": ([], [])}
    for name, split, tag in [(f"data_batch_{i}", "train", f"training batch {i} of 5") for i in range(1, 6)] + \
            [("test_batch", "test", "testing batch 1 of 1")]:
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        data = _images(rng, per_batch, labels)
        _dump({b"batch_label": tag.encode(), b"labels": labels, b"data": data,
               b"filenames": [f"img_{name}_{i}.png".encode() for i in range(per_batch)]}, folder / name)
        splits[split][0].append(data)
        splits[split][1].extend(labels)
    _dump({b"num_cases_per_batch": per_batch, b"label_names": CIFAR10_CLASSES, b"num_vis": 3072},
          folder / "batches.meta")
    return {k: (np.concatenate(d).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y)
            for k, (d, y) in splits.items()}


def write_cifar100(root, n=16, seed=0):
    """root/cifar-100-python/{train, test, meta} with fine and coarse labels."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train", "test"):
        fine = [int(x) for x in rng.integers(0, 100, n)]
        _dump({b"filenames": [b"x.png"] * n, b"batch_label": name.encode(), b"fine_labels": fine,
               b"coarse_labels": [c // 5 for c in fine], b"data": _images(rng, n, fine)}, folder / name)
    _dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
           b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}, folder / "meta")


def official_md5(monkeypatch, root):
    """Let torchvision's integrity check accept the files under `root` (test only)."""
    def md5(path):
        return hashlib.md5(Path(path).read_bytes()).hexdigest()

    for cls in (datasets.CIFAR10, datasets.CIFAR100):
        folder = Path(root) / cls.base_folder
        if not folder.is_dir():
            continue
        monkeypatch.setattr(cls, "train_list", [[n, md5(folder / n)] for n, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[n, md5(folder / n)] for n, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / cls.meta["filename"])})
