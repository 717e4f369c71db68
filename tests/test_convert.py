"""Exactness of tools/convert_checkpoint.py: converted weights reproduce torchvision's features
in Detectron2's ResNet and in the Faster R-CNN C4 model of the configs; bad inputs are refused."""
import argparse
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from pretrain import convert as cc

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "detection"
FORMATS = ("project", "moco", "torchvision", "backbone")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def random_resnet(arch, seed=0):
    """A torchvision ResNet whose BN layers all have non-trivial affine and running statistics."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    return net.eval()


def save_as(net, fmt, path):
    """Save `net` the way each supported producer does."""
    sd = net.state_dict()
    if fmt == "project":  # pretrain/: encoder_q + projection head under encoder_q.fc, momentum copy
        model = {f"encoder_q.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
        model["encoder_q.fc.0.weight"] = torch.randn(8, net.fc.in_features)
        model["encoder_q.fc.2.weight"] = torch.randn(4, 8)
        model.update({f"encoder_k.{k}": v.clone() for k, v in model.items()})
        obj = {"model": model, "config": {"arch": "x"}, "epoch": 3, "iter": 30,
               "queue": torch.randn(4, 16)}
    elif fmt == "moco":  # facebookresearch/moco main_moco.py
        obj = {"epoch": 200, "arch": "resnet50",
               "state_dict": {f"module.encoder_q.{k}": v for k, v in sd.items()}}
        obj["state_dict"]["module.queue"] = torch.randn(4, 16)
    elif fmt == "torchvision":
        obj = sd
    else:  # plain backbone: no classifier
        obj = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    torch.save(obj, path)
    return path


def torchvision_features(net, x):
    """layer1..layer4 outputs of a torchvision ResNet = Detectron2's res2..res5."""
    out = {}
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        for i in range(1, 5):
            h = getattr(net, f"layer{i}")(h)
            out[f"res{i + 1}"] = h
    return out


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def d2_cfg(config_file, *opts):
    from detectron2.config import get_cfg

    import transfer  # noqa: F401  (registers the ROI head)

    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / config_file))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def load_d2(module, pkl):
    from detectron2.checkpoint import DetectionCheckpointer

    DetectionCheckpointer(module).load(str(pkl))
    return module.eval()


@pytest.fixture(scope="module")
def r50():
    return random_resnet("resnet50")


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(1)
    return torch.rand(1, 3, 64, 96) * 255  # RGB in 0..255, as Detectron2 reads it


@pytest.mark.detectron2
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_torchvision_features_in_d2_resnet(r50, image, fmt, tmp_path):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import build_resnet_backbone

    pkl = tmp_path / "backbone.pkl"
    out = cc.convert(save_as(r50, fmt, tmp_path / "in.pth"), pkl, log=lambda s: None)
    with open(pkl, "rb") as f:
        assert pickle.load(f)["model"].keys() == out["model"].keys()
    assert out["__author__"] == "sane-transfer" and out["matching_heuristics"] is True

    cfg = d2_cfg("Base-RCNN-C4-BN.yaml", "MODEL.RESNETS.OUT_FEATURES",
                 ["res2", "res3", "res4", "res5"])
    backbone = load_d2(build_resnet_backbone(cfg, ShapeSpec(channels=3)), pkl)
    # no missing and no extra tensor: every backbone weight and BN statistic comes from the file
    wanted = {k for k in backbone.state_dict() if not k.endswith("num_batches_tracked")}
    assert wanted == set(out["model"])

    x = (image / 255 - MEAN) / STD
    ref = torchvision_features(r50, x)
    with torch.no_grad():
        got = backbone(x)
    for name in ("res2", "res3", "res4", "res5"):
        assert got[name].shape == ref[name].shape
        assert rel_err(got[name], ref[name]) < 1e-5, name


@pytest.mark.detectron2
def test_faster_rcnn_c4_from_config_reproduces_torchvision(r50, image, tmp_path):
    """The full MoCo-protocol model: pixel normalisation, backbone res2..res4 and the res5 head."""
    from detectron2.modeling import build_model

    pkl = tmp_path / "backbone.pkl"
    out = cc.convert(save_as(r50, "moco", tmp_path / "in.pth"), pkl, log=lambda s: None)
    model = load_d2(build_model(d2_cfg("voc_R_50_C4_24k.yaml")), pkl)
    state = model.state_dict()
    for k, v in out["model"].items():  # each converted tensor landed where it belongs
        target = f"roi_heads.{k}" if k.startswith("res5.") else f"backbone.{k}"
        assert torch.equal(state[target], torch.from_numpy(v)), k
    backbone_keys = [k for k in state if k.startswith("backbone.") or k.startswith("roi_heads.res5.")]
    unloaded = {k for k in backbone_keys if not k.endswith("num_batches_tracked")
                and k.split(".", 1)[1] not in out["model"]}
    assert unloaded == {f"roi_heads.res5.norm.{t}" for t in cc.BN_TENSORS}  # only the extra norm

    ref = torchvision_features(r50, (image / 255 - MEAN) / STD)
    with torch.no_grad():
        x = model.preprocess_image([{"image": image[0]}]).tensor
        c4 = model.backbone(x)["res4"]
        c5 = model.roi_heads.res5[:-1](ref["res4"])  # res5 blocks, before the extra norm
    assert rel_err(c4[..., :64, :96], ref["res4"]) < 1e-5
    assert rel_err(c5, ref["res5"]) < 1e-5


@pytest.mark.detectron2
def test_resnet18_basic_blocks_load_whole_into_demo_c4(tmp_path, image):
    from detectron2.modeling import build_model

    net = random_resnet("resnet18", seed=2)
    pkl = tmp_path / "r18.pkl"
    out = cc.convert(save_as(net, "project", tmp_path / "in.pth"), pkl, log=lambda s: None)
    model = load_d2(build_model(d2_cfg("voc_R_50_C4_24k.yaml", "MODEL.RESNETS.DEPTH", 18,
                                       "MODEL.RESNETS.RES2_OUT_CHANNELS", 64)), pkl)
    state = model.state_dict()
    for k, v in out["model"].items():
        target = f"roi_heads.{k}" if k.startswith("res5.") else f"backbone.{k}"
        assert torch.equal(state[target], torch.from_numpy(v)), k
    ref = torchvision_features(net, (image / 255 - MEAN) / STD)
    with torch.no_grad():
        c5 = model.roi_heads.res5[:-1](ref["res4"])
    assert rel_err(c5, ref["res5"]) < 1e-5


def test_torchvision_output_loads_into_torchvision(tmp_path):
    net = random_resnet("resnet18", seed=3)
    dst = tmp_path / "out.pth"
    cc.convert(save_as(net, "moco", tmp_path / "in.pth"), dst, fmt="torchvision",
               log=lambda s: None)
    fresh = torchvision.models.resnet18(weights=None).eval()
    missing, unexpected = fresh.load_state_dict(torch.load(dst, weights_only=True), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(torchvision_features(fresh, x)["res5"], torchvision_features(net, x)["res5"]) < 1e-6


def test_cli_prints_mapped_and_skipped(tmp_path, capsys):
    src = save_as(random_resnet("resnet18"), "project", tmp_path / "in.pth")
    assert cc.main([str(src), str(tmp_path / "o.pkl")]) == 0
    log = capsys.readouterr().out
    assert "ResNet-18" in log and "mapped 100 tensors" in log
    assert "encoder_q.fc" in log and "encoder_k" in log and "skipped" in log


def bad_inputs(tmp_path):
    net = random_resnet("resnet18")
    good = save_as(net, "backbone", tmp_path / "good.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    partial = net.state_dict()
    del partial["layer4.1.bn2.running_var"]
    torch.save(partial, tmp_path / "partial.pth")
    torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "unknown.pth")
    torch.save({"model": {"encoder.0.weight": torch.zeros(3)}}, tmp_path / "notresnet.pth")
    (tmp_path / "model_final.pkl").write_bytes(b"not read")
    torch.save({"state_dict": partial, "args": argparse.Namespace(arch="resnet18")},
               tmp_path / "objects.pth")
    return {"truncated": ("truncated", truncated),
            "already": ("Detectron2's format already", tmp_path / "model_final.pkl"),
            "objects": ("weights_only", tmp_path / "objects.pth"),
            "partial": ("layer4.1.bn2.running_var", tmp_path / "partial.pth"),
            "unknown": ("unknown checkpoint format", tmp_path / "unknown.pth"),
            "notresnet": ("unknown checkpoint format", tmp_path / "notresnet.pth")}


def test_bad_inputs_are_refused_without_output(tmp_path, capsys):
    for name, (needle, src) in bad_inputs(tmp_path).items():
        dst = tmp_path / f"{name}.pkl"
        assert cc.main([str(src), str(dst)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(src) in err and needle in err, err
        assert not dst.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_script_exit_code_on_truncated_file(tmp_path):
    _, src = bad_inputs(tmp_path)["truncated"]
    r = subprocess.run([sys.executable, "tools/convert_checkpoint.py", str(src), str(tmp_path / "o.pkl")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(src) in r.stderr


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    src = save_as(random_resnet("resnet18"), "torchvision", tmp_path / "in.pth")

    def disk_full(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(cc.pickle, "dump", disk_full)
    with pytest.raises(cc.ConversionError, match="No space left"):  # one line, exit code 2
        cc.convert(src, tmp_path / "out.pkl", log=lambda s: None)
    assert sorted(os.listdir(tmp_path)) == ["in.pth"]


def test_rename_table_matches_moco_names():
    names = {"conv1.weight": "stem.conv1.weight",
             "bn1.running_var": "stem.conv1.norm.running_var",
             "layer1.0.bn3.bias": "res2.0.conv3.norm.bias",
             "layer4.2.conv2.weight": "res5.2.conv2.weight",
             "layer3.0.downsample.0.weight": "res4.0.shortcut.weight",
             "layer2.0.downsample.1.running_mean": "res3.0.shortcut.norm.running_mean"}
    assert {k: cc.to_detectron2_name(k) for k in names} == names
