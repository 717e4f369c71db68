"""Tests of the probes: the weighted kNN monitor, feature extraction, VOC07 AP and the
linear / VOC07 linear probes on the synthetic corpus."""
import json
import math
import os
import socket
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from multiproc import run_processes
from pretrain import linear
from suite import contract
from pretrain.knn import extract_features, knn_top1
from pretrain.linear import (average_precision, fit_linear, mean_average_precision,
                             read_backbone_state, read_voc_annotation)

ROOT = Path(__file__).resolve().parents[1]


def _unit(angles_deg):
    a = torch.tensor(angles_deg, dtype=torch.float32) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


def test_knn_hand_case_known_answer():
    # two clusters on the circle; each query sits inside one of them
    train = _unit([0, 10, 20, 180, 190, 200])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    test = _unit([5, 185, 15])
    assert knn_top1(train, labels, test, torch.tensor([0, 1, 0]), 2, k=3) == 100.0
    assert knn_top1(train, labels, test, torch.tensor([1, 1, 0]), 2, k=3) == pytest.approx(200 / 3)
    # k is capped at the 6 train samples; all votes tie on counts, the weights still decide
    assert knn_top1(train, labels, test, torch.tensor([0, 1, 0]), 2, k=50) == 100.0


def test_knn_exp_weighting_beats_majority_vote():
    # one class-0 neighbour at cos 0.99, two class-1 neighbours at cos 0.90:
    # exp(0.99/0.05) > 2 exp(0.90/0.05) (e^1.8 > 2), but the majority is class 1
    c0, c1 = math.degrees(math.acos(0.99)), math.degrees(math.acos(0.90))
    train = _unit([c0, c1, -c1])
    labels = torch.tensor([0, 1, 1])
    query, truth = _unit([0]), torch.tensor([0])
    assert knn_top1(train, labels, query, truth, 2, k=3, t=0.05) == 100.0
    assert knn_top1(train, labels, query, truth, 2, k=3, t=1e3) == 0.0   # ~ plain majority


def test_knn_chunking_matches_single_pass():
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(200, 16, generator=g), dim=1)
    test = torch.nn.functional.normalize(torch.randn(37, 16, generator=g), dim=1)
    ltr, lte = torch.randint(0, 5, (200,), generator=g), torch.randint(0, 5, (37,), generator=g)
    full = knn_top1(train, ltr, test, lte, 5, k=10, chunk_size=1000)
    assert knn_top1(train, ltr, test, lte, 5, k=10, chunk_size=4) == full


def test_extract_features_unit_norm_and_ordered():
    torch.manual_seed(0)
    x = torch.randn(10, 6)
    y = torch.arange(10) % 3
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8))
    net.train()
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    feats, labels = extract_features(net, loader, torch.device("cpu"))
    assert feats.shape == (10, 8) and labels.dtype == torch.long
    assert torch.allclose(feats.norm(dim=1), torch.ones(10), atol=1e-5)
    assert torch.equal(labels, y)
    net.eval()
    with torch.no_grad():   # eval-mode features, row i belongs to image i
        expected = torch.nn.functional.normalize(net(x), dim=1)
    assert torch.allclose(feats, expected, atol=1e-5)
    net.train()
    extract_features(net, loader, torch.device("cpu"))
    assert net.training   # the caller's mode is restored


# Each rank extracts an unequal shard; every rank must get all rows in rank order.
_GATHER_RANK = """
import os, sys, torch, torch.distributed as dist
from pretrain.knn import extract_features
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=sys.argv[2], rank=rank, world_size=2)
shards = [torch.arange(6.0).view(3, 2) + 1, -torch.arange(10.0).view(5, 2) - 1]
labels = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5, 6, 7])]
loader = [(shards[rank][:2], labels[rank][:2]), (shards[rank][2:], labels[rank][2:])]
feats, got = extract_features(torch.nn.Identity(), loader, torch.device("cpu"))
assert torch.equal(got, torch.arange(8)), got
assert torch.allclose(feats, torch.nn.functional.normalize(torch.cat(shards), dim=1)), feats
dist.barrier()
print(f"rank {rank} ok", flush=True)
# no destroy_process_group(): on a loaded machine gloo (torch 2.3) has hung there after both ranks
# passed the barrier; the checks are done, so leave without running any teardown
os._exit(0)
"""


def test_extract_features_gathers_unequal_shards_across_ranks(tmp_path):
    # two plain interpreters importing only torch + pretrain.knn (cheaper than mp.spawn,
    # which would re-import this test module and torchvision in every child)
    # a TCP store on loopback, as torchrun uses
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    # bounded: a hung or failed rank kills both, and the error shows what each printed
    results = run_processes([[sys.executable, "-c", _GATHER_RANK, str(r), url] for r in range(2)],
                            timeout=120, env=env)
    assert [out.strip().splitlines()[-1] for _, out in results] == ["rank 0 ok", "rank 1 ok"]


def test_average_precision_hand_case():
    # ranks: + - + -  -> precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1
    # envelope at the recall steps: 1 and 2/3 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    scores, targets = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0])
    assert average_precision(scores, targets) == pytest.approx(5 / 6)
    # order of the rows does not matter, only the scores
    assert average_precision(scores.flip(0), targets.flip(0)) == pytest.approx(5 / 6)
    # a difficult-only row is dropped: + + - -> AP 1
    ignore = torch.tensor([False, True, False, False])
    assert average_precision(scores, targets, ignore) == pytest.approx(1.0)
    # a class with no positive is left out of the mean
    two = torch.stack([scores, scores], 1)
    mAP, aps = mean_average_precision(two, torch.stack([targets, torch.zeros(4)], 1),
                                      torch.zeros(4, 2, dtype=torch.bool))
    assert math.isnan(aps[1]) and mAP == pytest.approx(500 / 6)


def test_voc_annotation_difficult_counts_present_but_ignored(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text("<annotation>"
                   "<object><name>cat</name><difficult>1</difficult></object>"
                   "<object><name>dog</name><difficult>0</difficult></object>"
                   "<object><name>dog</name><difficult>1</difficult></object>"
                   "</annotation>")
    present, ignore = read_voc_annotation(xml, {"cat": 0, "dog": 1, "cow": 2})
    assert present.tolist() == [1, 1, 0]
    assert ignore.tolist() == [True, False, False]


def test_fit_linear_separates_toy_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(400) % 4
    x = centers[y] + torch.randn(400, 16, generator=g) * 0.5
    train, test = slice(0, 300), slice(300, 400)
    torch.manual_seed(0)
    clf = fit_linear(lambda epoch: (x[train], y[train]), 4, epochs=20, lr=0.01, batch_size=256,
                     optimizer="adam")   # the cifar preset's optimiser, fewer epochs
    with torch.no_grad():
        acc = linear.top1(clf(x[test]), y[test])
    assert acc > 90.0   # chance is 25


def test_read_backbone_state_moco_format(tmp_path):
    net = torchvision.models.resnet18()
    state = {"module.encoder_q." + k: v for k, v in net.state_dict().items()}
    state.update({"module.encoder_k.conv1.weight": net.conv1.weight, "module.queue": torch.zeros(3)})
    path = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": state, "arch": "resnet18", "epoch": 200}, path)
    got, arch = read_backbone_state(path)
    assert arch == "resnet18"
    assert set(got) == {k for k in net.state_dict() if not k.startswith("fc.")}
    assert torch.equal(got["conv1.weight"], net.conv1.weight)


def test_read_backbone_state_pretrain_format_gives_arch(tmp_path):
    net = torchvision.models.resnet18()
    model = {"encoder_q." + k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    model.update({"encoder_q.fc.0.weight": torch.zeros(4, 512), "encoder_k.conv1.weight": net.conv1.weight})
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model, "epoch": 3, "config": {"model": {"arch": "resnet18"}}}, path)
    got, arch = read_backbone_state(path)
    assert arch == "resnet18"
    assert set(got) == {k for k in net.state_dict() if not k.startswith("fc.")}
    backbone, arch = linear.build_frozen_backbone(path)   # no --arch: the config's is used
    assert arch == "resnet18" and not any(p.requires_grad for p in backbone.parameters())


@pytest.fixture(scope="module")
def resnet18_ckpt(module_tmp):
    torch.manual_seed(0)
    path = module_tmp("ckpt") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def _probe_args(ckpt, data, out, *extra):
    return ["--checkpoint", str(ckpt), "--data", str(data), "--output-dir", str(out), "--arch",
            "resnet18", "--image-size", "32", "--batch-size", "16", "--num-workers", "0",
            "--device", "cpu", *extra]


def test_linear_probe_on_corpus(corpus, resnet18_ckpt, tmp_path):
    out = tmp_path / "lin"
    # the imagenet preset re-extracts augmented train features every epoch
    linear.main(_probe_args(resnet18_ckpt, corpus / "imagefolder", out, "--preset", "imagenet",
                            "--epochs", "2"))
    result = json.loads((out / "linear_metrics.json").read_text())
    assert result["preset"] == "imagenet" and result["checkpoint"] == str(resnet18_ckpt)
    assert 0.0 <= result["top1"] <= 100.0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["type"] == "linear" for r in rows)
    assert rows[-1]["top1"] == result["top1"]
    config = json.loads((out / "linear_config.json").read_text())
    assert config["epochs"] == 2 and config["lr"] == 10.0 and config["augment"] is True


def test_killed_probe_resumes_after_its_last_epoch_to_an_unbroken_runs_numbers(corpus, resnet18_ckpt, tmp_path,
                                                                               monkeypatch, capsys):
    from pretrain.utils import MetricLogger

    args = lambda out: _probe_args(resnet18_ckpt, corpus / "imagefolder", out, "--preset", "imagenet",  # noqa: E731
                                   "--epochs", "4")  # augmented views drawn anew every epoch
    unbroken = linear.main(args(tmp_path / "a"))

    class KilledAtEpoch3(MetricLogger):  # killed after epoch 3's record, before its state
        def log(self, record):
            super().log(record)
            if record["epoch"] == 3:
                raise KeyboardInterrupt

    monkeypatch.setattr(linear, "MetricLogger", KilledAtEpoch3)
    with pytest.raises(KeyboardInterrupt):
        linear.main(args(tmp_path / "b"))
    assert (tmp_path / "b" / contract.TRAIN_STATE).is_file()
    monkeypatch.setattr(linear, "MetricLogger", MetricLogger)
    capsys.readouterr()
    resumed = linear.main(args(tmp_path / "b"))
    assert "epoch 2, iteration 6" in capsys.readouterr().out
    rows = lambda run: [json.loads(r) for r in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["epoch"] for r in rows("b")] == [1, 2, 3, 4] and rows("b") == rows("a")
    assert resumed["top1"] == unbroken["top1"] and resumed["knn_top1"] == unbroken["knn_top1"]
    assert not (tmp_path / "b" / contract.TRAIN_STATE).exists()  # done: the state goes


def test_voc07_probe_on_corpus(corpus, resnet18_ckpt, tmp_path):
    out = tmp_path / "voc"
    result = linear.main(_probe_args(resnet18_ckpt, corpus, out, "--preset", "voc07",
                                     "--epochs", "3", "--classes", "synthetic"))
    assert result == json.loads((out / "linear_metrics.json").read_text())
    assert result["preset"] == "voc07" and 0.0 < result["mAP"] <= 100.0


@pytest.mark.parametrize("case", ["no_train_val", "no_voc", "arch_mismatch"])
def test_bad_inputs_exit_2(case, corpus, resnet18_ckpt, tmp_path, capsys):
    args, needle = {
        "no_train_val": (_probe_args(resnet18_ckpt, corpus, tmp_path), "no train/ and val/"),
        "no_voc": (_probe_args(resnet18_ckpt, corpus / "imagefolder", tmp_path, "--preset", "voc07"),
                   "VOC2007"),
        "arch_mismatch": (_probe_args(resnet18_ckpt, corpus / "imagefolder", tmp_path, "--arch",
                                      "resnet50"), "does not match arch resnet50"),
    }[case]
    with pytest.raises(SystemExit) as exc:
        linear.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_cli_missing_checkpoint_exits_2(tmp_path, monkeypatch, capsys):
    # `python -m pretrain.linear ...` run in-process (runpy), sparing a second torch import
    missing = tmp_path / "nope.pth"
    monkeypatch.setattr(sys, "argv", ["linear", "--checkpoint", str(missing), "--data", str(tmp_path)])
    monkeypatch.delitem(sys.modules, "pretrain.linear")   # as a fresh `-m` run: no runpy warning
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("pretrain.linear", run_name="__main__")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert str(missing) in err and "not found" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_probe_on_an_image_folder_repeats_the_monitors_knn(corpus, tmp_path):
    """Any preset on an ImageFolder views the images as the monitor does (resize, center crop):
    the probe's kNN of a checkpoint is the kNN its run logged (the bench's table uses the probe)."""
    from pretrain.config import load_config
    from pretrain.engine import train

    run = tmp_path / "run"
    cfg = load_config("configs/pretrain/demo.yaml", [
        f"data.root={corpus / 'imagefolder'}", f"output_dir={run}", "data.crop=32", "mm.crops=[16]",
        "data.batch_size=8", "data.num_workers=0", "model.queue=64", "epochs=1", "knn.every_epochs=1",
        "log.progress=false", "log.tensorboard=false", "deterministic=true"])
    train(cfg)
    result = linear.main(["--checkpoint", str(run / "checkpoint.pth"), "--data", str(corpus / "imagefolder"),
                          "--preset", "cifar", "--epochs", "1", "--image-size", "32", "--batch-size", "16",
                          "--num-workers", "0", "--device", "cpu", "--output-dir", str(tmp_path / "lin")])
    done = json.loads((run / "done.json").read_text())
    assert result["knn_top1"] == pytest.approx(done["knn_top1"])
