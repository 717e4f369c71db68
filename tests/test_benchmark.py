"""tools/benchmark.py in its CPU mode at toy sizes: every section yields numbers, ratios are
img/s over the ceiling of the same step composition, and one failing piece stays in its rows."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain import benchmark

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--cpu", "--size", "32", "--batch-size", "4", "--iters", "1", "--warmup", "1",
       "--num-images", "8", "--workers", "0"]



@pytest.fixture(scope="module")
def report(module_tmp):
    out = module_tmp("bench") / "bench.json"
    assert benchmark.main(TOY + ["--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_every_section_measured_without_errors(report):
    rows = report["rows"]
    assert [r for r in rows if "error" in r] == []
    assert {r["section"] for r in rows} == {"ceiling", "step", "data", "e2e"}
    for name in ("mocov2", "sane", "sane_multi"):
        assert any(r["section"] == "step" and r["name"].startswith(name) for r in rows)
        assert any(r["section"] == "e2e" and r["name"].startswith(name) for r in rows)
    assert all(r["img_s"] > 0 for r in rows)
    assert report["device"] == "cpu" and report["args"]["arch"] == "resnet18"


def test_ratio_is_img_s_over_the_step_composition_ceiling(report):
    fb, f = report["ceiling"]["fwd_bwd"], report["ceiling"]["fwd"]
    b = report["args"]["batch_size"]
    # MM crops scale with the crop: 96/224 of 32 px -> 16 (the floor), Multi's five sizes
    assert set(fb) == {"32", "27", "23", "18", "16"} and set(f) == {"32"}
    steps = {r["name"].split()[0]: r for r in report["rows"] if r["section"] == "step"}
    expect = {"mocov2": [], "sane": ["16"], "sane_multi": ["32", "27", "23", "18", "16"]}
    for name, crops in expect.items():
        t = b / fb["32"] + b / f["32"] + sum(b / fb[c] for c in crops)
        r = steps[name]
        assert r["ceiling_eager"] == pytest.approx(b / t)
        assert r["ratio_eager"] == pytest.approx(r["img_s"] / r["ceiling_eager"])
    assert "ceiling_compiled" not in steps["sane"]   # no compile on CPU


def test_compiled_rows_run_last_and_scale_the_ceiling(tmp_path, monkeypatch):
    # torch.compile stands in as the identity: the row logic, not the compiler, is under test
    monkeypatch.setattr(benchmark.torch, "compile", lambda m, **kw: m)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **kw: None)
    out = tmp_path / "c.json"
    benchmark.main(TOY + ["--sections", "ceiling,step", "--compile", "--json", str(out)])
    rep = json.loads(out.read_text())
    names = [r["name"] for r in rep["rows"]]
    assert names[-2:] == ["resnet18 fwd+bwd 32px compiled", "sane (tensors on device) compiled"]
    speedup = rep["ceiling"]["compile_speedup"]
    assert speedup == pytest.approx(rep["rows"][-2]["img_s"] / rep["ceiling"]["fwd_bwd"]["32"])
    for r in rep["rows"]:
        if r["section"] == "step":
            assert r["ceiling_compiled"] == pytest.approx(r["ceiling_eager"] * speedup)
    late = benchmark.main(TOY + ["--sections", "ceiling", "--compile", "--budget-s", "0",
                                 "--json", str(out)])
    assert late == 0
    rows = json.loads(out.read_text())["rows"]
    assert all(r["error"].startswith("skipped") for r in rows)


def test_a_failing_piece_is_reported_and_the_rest_runs(tmp_path, monkeypatch, capsys):
    def broken(cfg):
        raise RuntimeError("nvjpeg exploded")
    monkeypatch.setattr(benchmark.GPUMultiCrop, "from_config", staticmethod(broken))
    out = tmp_path / "b.json"
    benchmark.main(TOY + ["--sections", "data", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    gpu = [r for r in rows if "GPU path" in r["name"]]
    cpu = [r for r in rows if "CPU path" in r["name"] or "JPEGs" in r["name"]]
    assert gpu and all(r["error"] == "error: RuntimeError: nvjpeg exploded" for r in gpu)
    assert cpu and all(r["img_s"] > 0 for r in cpu)
    table = capsys.readouterr().out
    assert "| data | sane GPU path" in table and "error: RuntimeError: nvjpeg exploded" in table


def test_cli_rejects_bad_arguments_with_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--cpu", "--data", str(tmp_path)])
    assert e.value.code == 2 and "train/<class>" in capsys.readouterr().err
    # as the command (the installed suite, or the checkout on PYTHONPATH)
    r = subprocess.run([sys.executable, "tools/benchmark.py", "--cpu", "--sections", "ceilings"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--sections: unknown ['ceilings']" in r.stderr


def test_learning_table_reads_the_device_runs_last_records(tmp_path):
    """tools/device_run.sh's learning table: the last train/kNN records of each run (a torn last
    line skipped), the probe's kNN and linear top-1, and the kNN gain over random init."""
    from suite import learning_table

    for name, knn, lin in (("random_init", 40.0, 55.5), ("mocov2", 52.5, 60.0), ("sane", 61.0, 70.25)):
        probe = tmp_path / f"probe_{name}"
        probe.mkdir()
        (probe / "linear_metrics.json").write_text(json.dumps({"knn_top1": knn, "top1": lin}))
    run = tmp_path / "sane"
    run.mkdir()
    records = [{"type": "train", "epoch": 0, "iter": 31, "loss": 6.9},
               {"type": "label_quality", "epoch": 0, "iter": 31, "slr_on_class_share": 0.1},
               {"type": "knn", "epoch": 1, "iter": 31, "knn_top1": 45.0},
               {"type": "train", "epoch": 9, "iter": 310, "loss": 5.25, "inst_top1": 30.0},
               {"type": "label_quality", "epoch": 9, "iter": 310, "slr_moved_mass": 0.032,
                "slr_on_class_share": 0.35, "other_same_class_key_share": 0.125}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"type": "tr')
    lines = learning_table.table(tmp_path).splitlines()
    assert lines[2].split(" | ")[:7] == ["| random_init", "0", "–", "–", "40.0", "", "55.5"]
    assert lines[3].split(" | ")[4:7] == ["52.5", "+12.5", "60.0"]
    assert lines[4].split(" | ") == ["| sane", "10", "5.250", "30.0", "61.0", "+21.0", "70.2", "0.032", "0.350",
                                     "0.125 |"]
