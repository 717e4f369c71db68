"""Provenance: a demo-like run (pretraining -> probe -> conversion -> fine-tune, in the pipeline's
layout) leaves one provenance.json per run holding every field, with hashes of the very files it
read and the batch / lr / schedule its saved config ran with; the table prints them and its exports
carry the commit."""
import csv
import hashlib
import io
import json
import subprocess
from pathlib import Path

import pytest

from suite import contract, provenance, results

pytestmark = pytest.mark.detectron2

ROOT = Path(__file__).resolve().parents[1]


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo_run(corpus, module_tmp):
    """OUT/pretrain/sane (1 epoch, 3 iterations), its cifar probe, OUT/weights/sane.pkl, one fine-tune."""
    from pretrain import convert, linear
    from pretrain.config import load_config
    from pretrain.engine import train
    from transfer import train_net as tn

    layout = contract.Layout(module_tmp("out"))
    run = layout.pretrain_dir("sane")
    train(load_config("configs/pretrain/demo.yaml", [
        "model.arch=resnet18", "model.dim=16", "model.queue=64", "data.crop=32", "data.batch_size=16",
        "data.num_workers=0", "mm.crops=[16]", "epochs=1", "knn.every_epochs=0", "log.progress=false",
        "log.tensorboard=false", "device=cpu", f"data.root={corpus / 'imagefolder'}", f"output_dir={run}"]))
    linear.main(["--checkpoint", str(run / contract.CHECKPOINT), "--data", str(corpus / "imagefolder"),
                 "--output-dir", str(layout.probe_dir("sane", "cifar")), "--preset", "cifar", "--epochs", "1",
                 "--image-size", "32", "--batch-size", "16", "--num-workers", "0", "--device", "cpu"])
    layout.weights("sane").parent.mkdir(parents=True)
    convert.convert(run / contract.CHECKPOINT, layout.weights("sane"), log=lambda s: None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHAPES_ROOT", str(corpus))
        fine_tune = layout.transfer_dir("sane", "demo_shapes_voc_R_18_C4", 0)
        tn.main(tn.argument_parser().parse_args([
            "--config-file", str(ROOT / "configs/detection/demo_shapes_voc_R_18_C4.yaml"),
            "OUTPUT_DIR", str(fine_tune), "MODEL.WEIGHTS", str(layout.weights("sane")), "SEED", "0",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.BASE_LR", "0.005", "SOLVER.MAX_ITER", "2", "TEST.PRECISE_BN.NUM_ITER", "1",
            "TRANSFER.BACKBONE_NAME", "sane"]))
    return layout, run, layout.probe_dir("sane", "cifar"), fine_tune


def test_every_run_records_every_field(demo_run):
    import torch
    import torchvision

    layout, run, probe, fine_tune = demo_run
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    records = {kind: json.loads((d / contract.PROVENANCE).read_text())
               for kind, d in (("pretrain", run), ("probe", probe), ("fine-tune", fine_tune))}
    config_sha = _sha(run / contract.CONFIG)
    for kind, rec in records.items():
        assert set(provenance.FIELDS) <= set(rec), (kind, set(provenance.FIELDS) - set(rec))
        assert rec["kind"] == kind and rec["seed"] == 0
        # the named preset of the run's config: pretraining `numerics`, Detectron2 TRANSFER.NUMERICS;
        # the probe has none
        assert rec["numerics"] == {"pretrain": "fast", "probe": "default", "fine-tune": "fast"}[kind]
        assert rec["suite_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
        assert isinstance(rec["suite_dirty"], bool) or rec["suite_commit"] is None
        assert rec["versions"]["torch"] == torch.__version__
        assert rec["versions"]["torchvision"] == torchvision.__version__
        assert (rec["gpu_count"], rec["gpu_model"]) == (0, None)   # CPU runs
        assert rec["pretrain_config_sha256"] == config_sha          # the one pretraining config
        assert rec["wall_time_s"] > 0 and rec["resumed"] is False
    pre, pro, ft = records["pretrain"], records["probe"], records["fine-tune"]
    # what each run read or wrote, byte for byte
    assert pre["weights_sha256"] == pro["weights_sha256"] == _sha(run / contract.CHECKPOINT)
    assert ft["weights_sha256"] == _sha(layout.weights("sane"))
    # batch, lr and schedule as each run's saved config has them
    assert (pre["batch_size"], pre["schedule"]["epochs"]) == (16, 1)
    assert pre["lr"] == pytest.approx(pre["schedule"]["lr_per_256"] * 16 / 256)
    assert (pro["batch_size"], pro["schedule"]["epochs"]) == (16, 1)
    assert (ft["batch_size"], ft["lr"], ft["schedule"]["max_iter"]) == (2, 0.005, 2)
    assert ft["versions"]["detectron2"] and ft["amp"] is False and pre["amp"] == "bf16"


def test_table_prints_provenance_and_exports_carry_the_commit(demo_run):
    layout, run, probe, fine_tune = demo_run
    commit = json.loads((run / contract.PROVENANCE).read_text())["suite_commit"]
    out = layout.root / "table.md"
    assert results.main([str(layout.root), "--provenance", "--out", str(out)]) == 0
    text = out.read_text()
    table = text.split("### Provenance")[1]
    assert all(str(d) in table for d in (run, probe, fine_tune))
    assert provenance.short(_sha(layout.weights("sane"))) in table
    footnote = next(ln for ln in text.splitlines() if ln.startswith("Provenance: "))
    assert provenance.short(commit) in footnote and "3 records" in footnote
    # results.jsonl beside the table: each run with its records (the probe's on its pretraining)
    records = [json.loads(ln) for ln in (layout.root / contract.RESULTS_RECORDS).read_text().splitlines()]
    kinds = {r["kind"]: sorted(p["kind"] for p in r["provenance"]) for r in records}
    assert kinds == {"pretrain": ["pretrain", "probe"], "detection": ["fine-tune"]}
    for fmt, last in (("csv", None), ("latex", r"\footnotesize")):
        assert results.main([str(layout.root), "--format", fmt, "--out", str(layout.root / f"t.{fmt}")]) == 0
        exported = (layout.root / f"t.{fmt}").read_text()
        assert provenance.short(commit) in exported
        if fmt == "csv":
            rows = list(csv.DictReader(io.StringIO(exported)))
            assert rows[-1]["source"] == "footnote" and provenance.short(commit) in rows[-1]["note"]
        else:
            assert last in exported.splitlines()[-1]


def test_a_weights_file_finds_its_pretraining_config_through_the_layout(tmp_path):
    layout = contract.Layout(tmp_path)
    for seed in (None, 2):
        config = layout.pretrain_dir("b", seed) / contract.CONFIG
        config.parent.mkdir(parents=True)
        config.write_text("seed: 0\n")
        assert contract.pretrain_config_of_weights(layout.weights("b", seed)) == config.resolve()
        assert contract.pretrain_config_of_weights(config.parent / contract.CHECKPOINT) == config.resolve()
    assert contract.pretrain_config_of_weights(layout.weights("other")) is None   # no such run
    assert contract.pretrain_config_of_weights(tmp_path / "moco_v2_800ep.pkl") is None  # from elsewhere
    assert contract.pretrain_config_of_weights("") is None                      # random init
