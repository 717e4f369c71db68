"""CIFAR as the paper runs it: the CIFAR stem (3x3 stride-1 conv1, no max-pool) in both encoders
and every backbone built from such a checkpoint, torchvision's CIFAR-10/100 python batches
(generated here in the published pickle format) for pretraining, the kNN monitor and the linear
probe, and the converter's refusal to write a CIFAR-stem backbone as Detectron2 weights."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from cifar_files import official_md5, write_cifar10, write_cifar100
from pretrain import linear
from pretrain.__main__ import main as pretrain_main
from pretrain.config import load_config
from pretrain.data import build_eval_datasets, cifar_dataset
from pretrain.engine import train
from pretrain.model import build_backbone, build_model
from pretrain.utils import UserError, seed_all
from pretrain import convert as convert_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY_CIFAR = [  # ResNet-18 with the CIFAR stem on 16-px crops of the 32-px images: ~1 s a step
    "model.stem=cifar", "data.format=cifar10", "model.arch=resnet18", "model.dim=16",
    "model.queue=16", "data.crop=16", "mm.crops=[8]", "data.batch_size=8", "data.num_workers=0",
    "deterministic=true", "device=cpu", "epochs=1", "knn.every_epochs=1", "log.progress=false",
    "log.tensorboard=false",
]


@pytest.fixture(scope="module")
def cifar(module_tmp):
    root = module_tmp("cifar")
    return root, write_cifar10(root)


@pytest.fixture
def accepted(cifar, monkeypatch):
    """The generated files pass torchvision's MD5 check (as the official ones do)."""
    official_md5(monkeypatch, cifar[0])
    return cifar[0]


def feature_sizes(net, x):
    sizes = {}
    hooks = [getattr(net, n).register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, o.shape[-1]))
             for n in ("conv1", "maxpool", "layer4")]
    net.eval()(x)
    for h in hooks:
        h.remove()
    return sizes


def test_cifar_stem_keeps_the_resolution_and_the_state_dict_names():
    cifar, imagenet = build_backbone("resnet18", "cifar"), build_backbone("resnet18")
    conv = cifar.conv1
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(cifar.maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    assert feature_sizes(cifar, x) == {"conv1": 32, "maxpool": 32, "layer4": 4}
    assert feature_sizes(imagenet, x) == {"conv1": 16, "maxpool": 8, "layer4": 1}
    assert cifar.state_dict().keys() == imagenet.state_dict().keys()
    model = build_model(load_config(None, ["model.stem=cifar", "model.arch=resnet18"]))
    for enc in (model.encoder_q, model.encoder_k):
        assert enc.conv1.kernel_size == (3, 3) and isinstance(enc.maxpool, nn.Identity)
    with pytest.raises(UserError, match="model.stem must be imagenet or cifar"):
        load_config(None, ["model.stem=tiny"])


@pytest.mark.parametrize("fmt", ["cifar10", "cifar100"])
def test_reader_reads_the_python_batches(fmt, cifar, tmp_path, monkeypatch):
    if fmt == "cifar10":
        root, (train_ref, test_ref) = cifar[0], (cifar[1]["train"], cifar[1]["test"])
    else:
        root = tmp_path
        write_cifar100(root, n=16)
    official_md5(monkeypatch, root)
    train_set = cifar_dataset(root, fmt, True, None)
    test_set = cifar_dataset(root, fmt, False, None)
    if fmt == "cifar10":
        assert (len(train_set), len(test_set)) == (40, 8)
        assert train_set.classes[:2] == ["airplane", "automobile"]
        for ds, (images, labels) in ((train_set, train_ref), (test_set, test_ref)):
            img, label = ds[5]   # file order, RGB planes -> HWC
            assert (torch.as_tensor(list(img.getdata())).view(32, 32, 3).numpy() == images[5]).all()
            assert label == labels[5]
    else:
        assert (len(train_set), len(test_set), len(train_set.classes)) == (16, 16, 100)


def test_missing_or_foreign_batches_are_one_clear_error(cifar, tmp_path, capsys):
    root = tmp_path / "partial"
    write_cifar10(root)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match="data_batch_3 not found.*cifar-10-batches-py/"):
        cifar_dataset(root, "cifar10", True, None)
    args = ["--config", "configs/pretrain/sane_r50_cifar.yaml", f"output_dir={tmp_path / 'o'}",
            "log.progress=false"]
    assert pretrain_main(args + [f"data.root={root}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "data_batch_3 not found" in err and len(err.splitlines()) == 1
    # files other than the published ones: torchvision's MD5 check refuses to unpickle them
    assert pretrain_main(args + [f"data.root={cifar[0]}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "differs from the official cifar-10-python.tar.gz" in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="data.pipeline=gpu decodes JPEG"):
        load_config("configs/pretrain/sane_r50_cifar.yaml", ["data.pipeline=gpu"])


@pytest.fixture(scope="module")
def pretrained(cifar, module_tmp):
    """One epoch (5 steps) of SANE with the CIFAR stem on the generated CIFAR-10, kNN on test."""
    root = cifar[0]
    with pytest.MonkeyPatch.context() as mp:
        official_md5(mp, root)
        out = module_tmp("cifar_run")
        cfg = load_config("configs/pretrain/sane_r50_cifar.yaml", TINY_CIFAR + [f"data.root={root}",
                                                                             f"output_dir={out}"])
        train(cfg)
    return out


def test_pretraining_reads_cifar_and_records_the_stem(pretrained):
    done = json.loads((pretrained / "done.json").read_text())
    assert done["iters"] == 5 and done["stem"] == "cifar" and 0 <= done["knn_top1"] <= 100
    knn = [json.loads(r) for r in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in knn if r["type"] == "knn"] == [1]   # the monitor ran on test_batch
    ckpt = torch.load(pretrained / "checkpoint.pth", weights_only=True)
    assert ckpt["config"]["model"]["stem"] == "cifar" and ckpt["config"]["data"]["format"] == "cifar10"
    assert ckpt["model"]["encoder_q.conv1.weight"].shape[-2:] == (3, 3)


def test_probe_takes_stem_and_format_from_the_checkpoint_and_repeats_the_monitors_knn(
        pretrained, accepted, tmp_path):
    out = tmp_path / "lin"
    result = linear.main(["--checkpoint", str(pretrained / "checkpoint.pth"), "--data", str(accepted),
                          "--preset", "cifar", "--epochs", "2", "--image-size", "16", "--batch-size", "16",
                          "--num-workers", "0", "--device", "cpu", "--output-dir", str(out)])
    assert (result["stem"], result["data_format"], result["arch"]) == ("cifar", "cifar10", "resnet18")
    assert 0 <= result["top1"] <= 100 and result["random_init"] is False
    # the same frozen features, the monitor's transform (16 px) and k, t: the monitor's number
    done = json.loads((pretrained / "done.json").read_text())
    assert result["knn_top1"] == pytest.approx(done["knn_top1"])
    assert (result["knn_k"], result["knn_t"]) == (50, 0.05)


def test_random_init_probe_is_seeded_and_writes_the_same_record(accepted, tmp_path):
    def weights(seed):
        seed_all(seed)
        backbone, info = linear.probe_backbone(None, "resnet18", "cifar")
        assert info == {"arch": "resnet18", "stem": "cifar", "data_format": None}
        return backbone.state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["conv1.weight"], c["conv1.weight"])
    assert a["conv1.weight"].shape[-2:] == (3, 3)
    out = tmp_path / "random_init" / "linear_cifar"
    result = linear.main(["--random-init", "--arch", "resnet18", "--stem", "cifar", "--data", str(accepted),
                          "--data-format", "cifar10", "--preset", "cifar", "--epochs", "1", "--batch-size", "16",
                          "--num-workers", "0", "--device", "cpu", "--output-dir", str(out)])
    assert result == json.loads((out / "linear_metrics.json").read_text())
    assert result["random_init"] is True and result["checkpoint"] is None and result["seed"] == 0
    assert {"top1", "knn_top1"} <= set(result) and result["stem"] == "cifar"
    with pytest.raises(SystemExit) as exc:   # nowhere to write without a checkpoint folder
        linear.main(["--random-init", "--data", str(accepted), "--data-format", "cifar10"])
    assert exc.value.code == 2


def test_converter_refuses_a_cifar_stem_for_detectron2(pretrained, tmp_path):
    ckpt = pretrained / "checkpoint.pth"
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", str(ckpt), str(tmp_path / "w.pkl")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and not (tmp_path / "w.pkl").exists()
    assert "CIFAR-stem" in proc.stderr and "model.stem=cifar" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # torchvision format is written (the stem is the reader's to build)
    convert_checkpoint.convert(str(ckpt), str(tmp_path / "tv.pth"), "torchvision", log=lambda m: None)
    state = torch.load(tmp_path / "tv.pth", weights_only=True)
    net = build_backbone("resnet18", "cifar")
    net.load_state_dict(state)
    # a bare state dict without a config: the 3x3 conv1 says it
    torch.save(state, tmp_path / "bare.pth")
    with pytest.raises(convert_checkpoint.ConversionError, match=r"conv1 is 3x3"):
        convert_checkpoint.convert(str(tmp_path / "bare.pth"), str(tmp_path / "bare.pkl"))


def test_eval_datasets_of_the_monitor_are_train_and_test(accepted):
    cfg = load_config("configs/pretrain/sane_r50_cifar.yaml", [f"data.root={accepted}"])
    train_set, val = build_eval_datasets(cfg)
    assert (len(train_set), len(val)) == (40, 8) and val[0][0].shape == (3, 32, 32)
