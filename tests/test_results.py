"""Results table and plots on hand-written run directories (docs/formats.md) with known numbers:
exact mean/sample std, reported rows, incomplete runs listed, PNG content counts."""
import csv
import io
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import matplotlib.colors
import yaml
from matplotlib.container import BarContainer

from suite import plots as plot_results, results as results_table

REPO = Path(__file__).resolve().parents[1]
VOC, COCO = "voc_R_50_C4_24k", "coco_R_50_C4_1x"


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in obj))
    elif path.suffix == ".yaml":
        path.write_text(yaml.safe_dump(obj))
    else:
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def _pretrain(d, seed, done, slr=True, knn=(40.0, 60.0)):
    _write(d / "config.yaml", {"method": "sane", "seed": seed, "data": {"root": "/data/cifar10"}})
    records = [{"type": "train", "epoch": i // 2, "iter": i, "loss": 9.0 - i, "lr": 0.03}
               for i in range(4)]
    records += [{"type": "knn", "epoch": i, "iter": 2 * i + 1, "knn_top1": v} for i, v in enumerate(knn)]
    if slr:
        records += [{"type": "label_quality", "epoch": i, "iter": 2 * i + 1,
                     "slr_same_class_mass": 0.9 + 0.05 * i, "onehot_same_class_mass": 1.0,
                     "slr_other_same_class_mass": 0.05 + 0.1 * i, "slr_moved_mass": 0.2,
                     "slr_on_class_share": 0.25 + 0.5 * i, "other_same_class_key_share": 0.125,
                     "slr_label_error": 1.6 - 0.2 * i, "onehot_label_error": 1.8}
                    for i in range(2)]
    _write(d / "metrics.jsonl", records)
    _write(d / "log.txt", "epoch 0\n")
    if done:
        _write(d / "done.json", {"method": "sane", "arch": "resnet18", "epochs": 2, "iters": 4,
                                 "knn_top1": knn[-1], "checkpoint": "checkpoint.pth"})


def _detection(d, backbone, task, seed, bbox, segm=None):
    _write(d / "config.yaml", {"SEED": seed})
    _write(d / "last_checkpoint", "model_final.pth")
    results = {"bbox": bbox} if segm is None else {"bbox": bbox, "segm": segm}
    _write(d / "final_metrics.json", {"config_file": f"configs/detection/{task}.yaml", "task": task,
                                      "backbone": backbone, "weights": f"w/{backbone}.pkl",
                                      "seed": seed, "iter": 100, "results": results})


@pytest.fixture(scope="module")
def root(module_tmp):
    """ROOT/pretrain/<name>/, ROOT/linear/<name>/, ROOT/transfer/<name>/<task>/seed<k>/."""
    root = module_tmp("runs")
    _pretrain(root / "pretrain" / "sane", 0, done=True, knn=(40.0, 61.0))
    _pretrain(root / "pretrain" / "mocov2", 0, done=False, slr=False)   # unfinished
    _write(root / "linear" / "sane" / "linear_metrics.json",
           {"preset": "cifar", "top1": 70.5, "checkpoint": str(root / "pretrain" / "sane" / "checkpoint.pth")})
    _write(root / "pretrain" / "sane" / "voc07" / "linear_metrics.json",   # found by nesting
           {"preset": "voc07", "mAP": 66.5, "checkpoint": "elsewhere/checkpoint.pth"})
    _write(root / "linear" / "orphan" / "linear_metrics.json",
           {"preset": "cifar", "top1": 1.0, "checkpoint": "/nowhere/checkpoint.pth"})
    for seed, (ap50, ap, ap75) in enumerate([(80.0, 50.0, 55.0), (82.0, 51.0, 56.0), (84.0, 55.0, 60.0)]):
        _detection(root / "transfer" / "sane" / VOC / f"seed{seed}", "sane", VOC, seed,
                   {"AP": ap, "AP50": ap50, "AP75": ap75})
    _detection(root / "transfer" / "mocov2" / VOC / "seed0", "mocov2", VOC, 0,
               {"AP": 52.0, "AP50": 81.0, "AP75": 57.0})
    _detection(root / "transfer" / "mocov2" / VOC / "seed1", "mocov2", VOC, 1,
               {"AP": None, "AP50": None, "AP75": None})   # failed: train_net writes NaN as null
    # mocov2 seed2 never ran: it must be listed as missing
    d = root / "transfer" / "sane" / COCO / "seed0"
    _detection(d, "sane", COCO, 0, {"AP": 40.0, "AP50": 60.0, "AP75": 43.0, "APs": float("nan")},
               {"AP": 35.0})
    crashed = root / "transfer" / "sane" / COCO / "seed1"   # crashed mid-training
    _write(crashed / "config.yaml", {"SEED": 1})
    _write(crashed / "metrics.json", '{"iteration": 19, "total_loss": 1.0}\n')
    _write(crashed / "log.txt", "iter 19\nTraceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory\n")
    (root / "transfer" / "sane" / COCO / "seed2").mkdir()    # created, never written: missing
    _write(root / "transfer" / "sane" / VOC / "seed3" / "final_metrics.json", '{"task": ')  # truncated
    resumed = root / "transfer" / "mocov2" / COCO / "seed0"   # crashed once, resumed, running
    _write(resumed / "config.yaml", {"SEED": 0})
    _write(resumed / "log.txt", "Traceback (most recent call last):\nKeyError: 1\n[11/27 02:37:26 d2]: iter 5\n")
    return root


def _table(root, fmt, *extra):
    sections, incomplete, _ = results_table.collect([str(root)], *extra)
    return results_table.RENDERERS[fmt](sections, incomplete)


def _md_row(text, section, label):
    block = text.split(f"### {section}")[1].split("###")[0]
    return next(ln for ln in block.splitlines() if ln.startswith(f"| {label} |"))


def test_csv_exact_mean_and_sample_std(root):
    rows = list(csv.DictReader(io.StringIO(_table(root, "csv"))))
    cell = {(r["task"], r["backbone"], r["metric"]): r for r in rows if r["source"] == "measured"}
    ap50 = cell[(VOC, "sane", "AP50")]
    assert float(ap50["mean"]) == 82.0 and float(ap50["std"]) == 2.0 and ap50["n"] == "3"  # ddof=1
    ap = cell[(VOC, "sane", "AP")]
    assert math.isclose(float(ap["mean"]), 52.0) and math.isclose(float(ap["std"]), math.sqrt(7.0))
    # the failed seed (NaN) is not averaged in: mocov2 keeps n=1
    assert cell[(VOC, "mocov2", "AP50")]["n"] == "1" and cell[(VOC, "mocov2", "AP50")]["std"] == ""
    assert float(cell[(COCO, "sane", "AP (segm)")]["mean"]) == 35.0
    assert (COCO, "sane", "AP50") not in cell          # COCO shows AP (bbox) / AP (segm) only
    assert float(cell[("pretrain:cifar10", "sane", "kNN top-1")]["mean"]) == 61.0
    assert float(cell[("pretrain:cifar10", "sane", "linear top-1")]["mean"]) == 70.5
    assert float(cell[("pretrain:cifar10", "sane", "VOC07 cls mAP")]["mean"]) == 66.5
    assert not any(k[1] == "mocov2" and k[0].startswith("pretrain") for k in cell)  # unfinished


def test_overlapping_roots_count_each_run_once(root):
    sections, incomplete, runs = results_table.collect([str(root), str(root / "transfer" / "sane")])
    assert len(runs) == 10 and len(incomplete) == 9
    voc = next(rows for _, task, _, rows in sections if task == VOC)
    assert voc[1][:2] == ("sane", "measured") and voc[1][2]["AP50"] == (82.0, 2.0, 3)


def test_markdown_cells_reported_rows_and_incomplete_runs(root):
    md = _table(root, "md")
    assert _md_row(md, VOC, "sane") == "| sane | 82.0 ± 2.0 (n=3) | 52.0 ± 2.6 (n=3) | 57.0 ± 2.6 (n=3) | measured |"
    assert "±" not in _md_row(md, COCO, "sane") and "40.0 (n=1)" in _md_row(md, COCO, "sane")
    assert _md_row(md, COCO, "mocov2") == "| mocov2 | — | — | measured |"   # no complete run yet
    moco = _md_row(md, VOC, "MoCo v2 200ep")
    assert "| 82.4 | 57.0 | 63.6 |" in moco and "reported" in moco
    assert "reported" in _md_row(md, COCO, "SANE-Multi (strong)") and "42.4" in _md_row(md, COCO, "SANE-Multi (strong)")
    assert "92.5" in _md_row(md, "pretrain:cifar10", "MoCo v2")      # CIFAR rows beside a cifar task
    assert "imagenet" not in md.lower()                              # no imagenet task: not shown
    incomplete = md.split("Incomplete runs:")[1]
    assert f"{Path('mocov2') / VOC / 'seed1'} — failed" in incomplete
    assert f"{Path('mocov2') / VOC / 'seed2'} — missing" in incomplete
    assert f"{Path('pretrain') / 'mocov2'} — unfinished: no done.json" in incomplete
    assert "CUDA out of memory" in incomplete and f"{Path(COCO) / 'seed1'} — failed" in incomplete
    assert f"{Path(COCO) / 'seed2'} — missing: seed directory holds no run files" in incomplete
    assert f"{Path(VOC) / 'seed3'} — failed: unreadable run files" in incomplete
    assert f"{Path('linear') / 'orphan'} — orphan linear probe" in incomplete
    assert f"{Path('mocov2') / COCO / 'seed0'} — unfinished: no final_metrics.json (last iter ?" in incomplete
    assert f"{Path('mocov2') / COCO / 'seed1'} — missing: seed 1" in incomplete
    assert len([ln for ln in incomplete.splitlines() if ln.startswith("- ")]) == 9


def test_reported_modes_and_latex(root):
    everything = _table(root, "md", "all")
    assert "### imagenet: reported only (pretrain)" in everything and "76.4" in everything
    none = _table(root, "md", "none")
    assert "reported" not in none.replace("Rows marked 'reported'", "")
    tex = _table(root, "latex")
    assert tex.count(r"\toprule") == tex.count(r"\bottomrule") == 3
    assert r"82.0 $\pm$ 2.0 (n=3)" in tex and r"{voc\_R\_50\_C4\_24k (detection)}" in tex
    assert r"MoCo v2 200ep & 82.4 & 57.0 & 63.6 &" in tex and "—" not in tex.split("Incomplete")[0]


def test_cli_writes_file_and_rejects_missing_dir(root, tmp_path):
    out = tmp_path / "results.md"
    ok = subprocess.run([sys.executable, "tools/results_table.py", str(root), "--out", str(out)],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "82.0 ± 2.0 (n=3)" in out.read_text() and "incomplete:" in ok.stderr
    assert results_table.main([str(tmp_path / "nope")]) == 2
    assert results_table.main([str(tmp_path)]) == 2          # exists but holds no runs


@pytest.mark.parametrize("task,results,failed", [
    (VOC, {"bbox": {"AP": 50.0, "AP50": float("nan"), "AP75": 55.0}}, True),
    (VOC, {}, True),
    (COCO, {"bbox": {"AP": 40.0, "APs": None}}, False),     # NaN/null outside the shown columns
    (COCO, {"segm": {"AP": None}}, True),
])
def test_failed_detection_results(tmp_path, task, results, failed):
    _write(tmp_path / "final_metrics.json", {"task": task, "backbone": "b", "seed": 0, "results": results})
    assert results_table.read_detection_run(tmp_path).problem.startswith("failed") == failed


def test_reported_rows_not_beside_synthetic_tasks(tmp_path):
    task = "demo_shapes_voc_R_18_C4"
    _detection(tmp_path / "b" / task / "seed0", "b", task, 0, {"AP": 1.0, "AP50": 2.0, "AP75": 0.5})
    sections, _, _ = results_table.collect([str(tmp_path)])
    assert [[src for _, src, _ in rows] for *_, rows in sections] == [["measured"]]
    sections, _, _ = results_table.collect([str(tmp_path)], "all")
    assert sum(src.startswith("reported") for *_, rows in sections for _, src, _ in rows) > 20


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_figures_content_and_pngs(root, tmp_path):
    runs, _ = results_table.find_runs([str(root)])
    figures = plot_results.write_figures(runs, tmp_path / "plots")
    curves, bars = figures["pretrain_curves.png"], figures["detection_ap.png"]
    loss, knn, other_mass, share, error = curves.axes
    assert len(loss.lines) == 2 and len(knn.lines) == 2     # sane + mocov2 (unfinished still drawn)
    # label quality: sane's ȳ (solid) + its one-hot y (dashed, same colour); mocov2 logs none
    assert len(other_mass.lines) == 2 and len(error.lines) == 2
    # the share of SLR's moved mass on the class, against the class's share of the keys (chance)
    assert list(share.lines[0].get_ydata()) == pytest.approx([0.25, 0.75])
    assert list(share.lines[1].get_ydata()) == [0.125, 0.125] and share.lines[1].get_linestyle() == "--"
    # pretraining bars: the columns that hold a value (the probes and the SLR columns), mean over seeds
    (metrics_ax,) = figures["pretrain_metrics.png"].axes
    assert [t.get_text() for t in metrics_ax.get_xticklabels()] == [
        "kNN top-1", "linear top-1", "VOC07 cls mAP", "SLR on-class %", "on-class chance %"]
    assert [p.get_height() for p in metrics_ax.patches][-2:] == pytest.approx([75.0, 12.5])
    slr, onehot = other_mass.lines
    assert list(slr.get_ydata()) == pytest.approx([0.05, 0.15]) and list(slr.get_xdata()) == [1, 3]
    assert list(onehot.get_ydata()) == [0.0, 0.0] and onehot.get_linestyle() == "--"
    assert onehot.get_color() == slr.get_color() == knn.lines[1].get_color()
    assert list(error.lines[0].get_ydata()) == pytest.approx([1.6, 1.4])
    assert list(error.lines[1].get_ydata()) == [1.8, 1.8] and error.lines[1].get_linestyle() == "--"
    assert list(knn.lines[1].get_ydata()) == [40.0, 61.0]   # sane is the 2nd backbone (sorted)
    coco_ax, voc_ax = bars.axes
    assert len(voc_ax.patches) == 2 * 3 and len(coco_ax.patches) == 2 * 2   # mocov2: NaN bars
    sane_bars = [c for c in voc_ax.containers if isinstance(c, BarContainer)][1]
    assert [p.get_height() for p in sane_bars.patches] == [82.0, 52.0, 57.0]
    segs = sane_bars.errorbar.lines[2][0].get_segments()   # vertical error bars: mean ± std
    assert math.isclose(segs[0][1][1] - segs[0][0][1], 4.0)
    assert sane_bars.patches[0].get_facecolor()[:3] == matplotlib.colors.to_rgb(knn.lines[1].get_color())
    assert _png_size(tmp_path / "plots" / "pretrain_curves.png") == (2000, 400)
    assert _png_size(tmp_path / "plots" / "detection_ap.png") == (1000, 400)
    pretrain_only = str(root / "pretrain" / "sane")           # the CLI path, on one cheap figure
    assert plot_results.main([pretrain_only, "--out", str(tmp_path / "cli")]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["pretrain_curves.png", "pretrain_metrics.png"]
    (tmp_path / "empty").mkdir()
    assert plot_results.main([str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("tool", ["results_table", "plot_results"])
def test_a_run_dir_that_is_not_a_directory_is_one_error(tool, tmp_path, capsys):
    import importlib

    main = importlib.import_module({"results_table": "suite.results", "plot_results": "suite.plots"}[tool]).main
    argv = [str(tmp_path / "missing")] + (["--out", str(tmp_path / "plots")] if tool == "plot_results" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{tool}: {tmp_path / 'missing'} is not a directory; pass run directories or a root "
                   "that holds them"]
