"""Paired comparisons: the results table's seed-matched difference and 95% t-interval equal a hand
computation, a difference within noise is not marked, reported rows are never paired; and
fine-tunes of different backbones with one SEED see the same batches and start from the same heads."""
import csv
import io
import json
import math

import pytest
import yaml

from suite import results, stats

VOC = "voc_R_50_C4_24k"
T_975 = {2: 4.302652729911275, 3: 3.182446305284263}  # Student-t 0.975 quantiles, from a t table


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(obj) if path.suffix == ".yaml" else json.dumps(obj))


def _fine_tune(root, backbone, seed, ap50):
    d = root / "transfer" / backbone / VOC / f"seed{seed}"
    _write(d / "config.yaml", {"SEED": seed})
    _write(d / "final_metrics.json", {"task": VOC, "backbone": backbone, "seed": seed, "iter": 10,
                                      "results": {"bbox": {"AP50": ap50, "AP": ap50 / 2, "AP75": 1.0}}})


def _pretrain(root, backbone, method):
    d = root / "pretrain" / backbone
    _write(d / "config.yaml", {"method": method, "seed": 0, "data": {"root": "/data/imagenet"}})
    _write(d / "done.json", {"method": method, "knn_top1": 50.0})


@pytest.fixture
def root(tmp_path):
    """moco (method mocov2: the default baseline) and two backbones over seeds 0-3 on a real VOC
    task (so the reported rows of MoCo v2 appear beside them); sane also ran a seed 4 alone."""
    _pretrain(tmp_path, "moco", "mocov2")
    _pretrain(tmp_path, "sane", "sane")
    base = [80.0, 81.0, 79.0, 80.5]
    for seed, b in enumerate(base):
        _fine_tune(tmp_path, "moco", seed, b)
        _fine_tune(tmp_path, "sane", seed, b + [2.0, 2.5, 3.0, 2.5][seed])   # consistently better
        _fine_tune(tmp_path, "noisy", seed, b + [1.0, -1.0, 1.0, -1.0][seed])  # within noise
    _fine_tune(tmp_path, "sane", 4, 99.0)  # no moco seed 4: not paired
    return tmp_path


def _csv_rows(root, *extra):
    out = root / "table.csv"
    assert results.main([str(root), "--format", "csv", "--out", str(out), *extra]) == 0
    return [r for r in csv.DictReader(io.StringIO(out.read_text())) if r["source"].startswith("paired")]


def test_paired_interval_equals_hand_computation_and_marks_only_real_differences(root):
    rows = {(r["backbone"], r["metric"]): r for r in _csv_rows(root) if r["task"] == VOC}
    assert {r["source"] for r in rows.values()} == {"paired vs moco"}   # the mocov2 method's row
    sane = rows[("sane", "AP50")]
    # by hand: d = 2, 2.5, 3, 2.5 -> mean 2.5, s = sqrt(0.5 / 3), half = t(0.975, 3) * s / sqrt(4)
    half = T_975[3] * math.sqrt(0.5 / 3) / 2
    assert sane["n"] == "4" and math.isclose(float(sane["mean"]), 2.5)
    assert math.isclose(float(sane["std"]), math.sqrt(0.5 / 3))
    low, high = (float(x) for x in sane["note"].split("[")[1].split("]")[0].split(","))
    assert math.isclose(low, 2.5 - half, rel_tol=1e-9) and math.isclose(high, 2.5 + half, rel_tol=1e-9)
    assert sane["note"].endswith("excludes 0")
    noisy = rows[("noisy", "AP50")]   # d = +1, -1, +1, -1: mean 0, interval around it
    assert float(noisy["mean"]) == 0.0 and "excludes 0" not in noisy["note"]
    # a reported row (the paper's "MoCo v2") is never paired, neither as baseline nor backbone
    assert not any("MoCo" in b for b, _ in rows)

    md = (root / "table.md")
    results.main([str(root), "--out", str(md)])
    text = md.read_text()
    assert stats.NOTE in text and "Paired difference vs moco" in text
    sane_line = next(ln for ln in text.splitlines() if ln.startswith("| sane | +2.5 ["))
    noisy_line = next(ln for ln in text.splitlines() if ln.startswith("| noisy | +0.0 ["))
    assert sane_line.split("|")[2].strip().endswith("*") and "*" not in noisy_line


def test_t_interval_three_pairs_by_hand():
    p = stats.t_interval([1.0, 2.0, 3.0])   # mean 2, s 1, half = t(0.975, 2) / sqrt(3)
    half = T_975[2] / math.sqrt(3)
    assert (p.mean, p.std, p.n) == (2.0, 1.0, 3)
    assert math.isclose(p.low, 2 - half) and math.isclose(p.high, 2 + half) and not p.excludes_zero
    one = stats.paired_difference({0: 5.0, 1: 7.0}, {1: 4.0, 2: 0.0})   # one shared seed
    assert (one.mean, one.n, one.low) == (3.0, 1, None) and stats.format_paired(one) == "+3.0 (n=1)"
    assert stats.paired_difference({0: 1.0}, {1: 1.0}) is None


def test_baseline_option_and_a_reported_name_is_not_paired(root, capsys):
    rows = _csv_rows(root, "--baseline", "noisy", "MoCo v2")
    assert {r["source"] for r in rows} == {"paired vs noisy"}
    assert {r["backbone"] for r in rows} == {"moco", "sane"}
    assert "--baseline MoCo v2: no measured row" in capsys.readouterr().err


# ---------------------------------------------------------------- what makes pairs pairs
@pytest.mark.detectron2
def test_same_seed_same_batches_and_head_init_across_backbones(corpus, tmp_path, monkeypatch):
    """Two fine-tunes from different backbone weights (and one from none) with SEED 3 see the same
    first batches (image ids and pixels, flips included) and start from identical heads (RPN, box
    predictor, the extra res5 norm); their backbones differ, as the weights do. SEED 4 changes
    the order and the heads: the check can fail."""
    import torch
    import torchvision

    from pretrain import convert
    from transfer import train_net as tn

    monkeypatch.setenv("SHAPES_ROOT", str(corpus))

    def weights(seed):
        torch.manual_seed(seed)
        net = torchvision.models.resnet18(weights=None)
        ckpt = tmp_path / f"net{seed}" / "checkpoint.pth"
        ckpt.parent.mkdir()
        torch.save({"model": {f"encoder_q.{k}": v for k, v in net.state_dict().items()}}, ckpt)
        convert.convert(ckpt, tmp_path / f"net{seed}.pkl", log=lambda s: None)
        return tmp_path / f"net{seed}.pkl"

    def start(weights_file, seed, name):
        args = tn.argument_parser().parse_args([
            "--config-file", "configs/detection/demo_shapes_voc_R_18_C4.yaml", "OUTPUT_DIR",
            str(tmp_path / name), "MODEL.WEIGHTS", str(weights_file or ""), "SEED", str(seed),
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "SOLVER.IMS_PER_BATCH", "2"])
        cfg = tn.setup(args)            # as main(): seeds every generator from SEED
        trainer = tn.Trainer(cfg)       # as run(): the model (heads drawn), then the weights
        trainer.resume_or_load(resume=False)
        params = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        batches = [next(trainer._trainer._data_loader_iter) for _ in range(3)]
        return params, [[(d["image_id"], d["image"]) for d in b] for b in batches]

    a, b = weights(0), weights(1)
    runs = {"a": start(a, 3, "a"), "b": start(b, 3, "b"), "none": start(None, 3, "none"),
            "other_seed": start(a, 4, "c")}
    heads = [k for k in runs["a"][0] if k.startswith(("proposal_generator.", "roi_heads.box_predictor.",
                                                       "roi_heads.res5.norm."))]
    assert len(heads) >= 6
    backbone = "backbone.stem.conv1.weight"
    assert not torch.equal(runs["a"][0][backbone], runs["b"][0][backbone])  # the weights loaded
    for other in ("b", "none"):
        assert all(torch.equal(runs["a"][0][k], runs[other][0][k]) for k in heads), other
        for batch_a, batch_o in zip(runs["a"][1], runs[other][1]):
            assert [i for i, _ in batch_a] == [i for i, _ in batch_o]
            assert all(torch.equal(x, y) for (_, x), (_, y) in zip(batch_a, batch_o))
    assert not all(torch.equal(runs["a"][0][k], runs["other_seed"][0][k]) for k in heads)
    assert [[i for i, _ in b] for b in runs["a"][1]] != [[i for i, _ in b] for b in runs["other_seed"][1]]
