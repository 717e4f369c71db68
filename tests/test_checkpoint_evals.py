"""Checkpoint evaluation while pretraining runs: every snapshot gets its probes and a short fine-tune
(one evaluation per checkpoint), the plot shows each metric against epochs, the table leaves them out,
and on Slurm a watcher submits each evaluation only once its snapshot exists."""
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")

from slurm import pipeline, registry, submit  # noqa: E402
from slurm.evaluate import CheckpointWatcher  # noqa: E402
from suite import checkpoint_evals, contract  # noqa: E402

TINY_PRETRAIN = ("data.crop=32", "mm.crops=[16]", "data.batch_size=8", "data.num_workers=0", "model.queue=64",
                 "knn.every_epochs=0", "log.progress=false", "log.tensorboard=false", "epochs=2")
TINY_PROBE = ("--epochs", "1", "--batch-size", "16", "--image-size", "32", "--num-workers", "0", "--device", "cpu")
TINY_FINE_TUNE = ("SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "INPUT.MIN_SIZE_TRAIN", "(64,)",
                  "INPUT.MIN_SIZE_TEST", "64", "TEST.PRECISE_BN.ENABLED", "False")
DET = "configs/detection/demo_shapes_voc_R_18_C4.yaml"


@pytest.mark.slow
@pytest.mark.detectron2
def test_every_epoch_evaluated_once_plotted_against_epochs_and_kept_out_of_the_table(corpus, tmp_path):
    from suite.plots import write_figures
    from suite.results import find_runs

    out = tmp_path / "pipe"
    stages = pipeline.build_stages({"demo": ("configs/pretrain/demo.yaml", TINY_PRETRAIN)}, corpus / "imagefolder",
                                   out, eval_every=1, eval_probes=("cifar",), eval_detection=[DET],
                                   eval_transfer_opts=TINY_FINE_TUNE, probe_opts=TINY_PROBE)
    names = [s.name for s in stages]
    assert names == ["pretrain/demo", *(f"eval/demo/epoch000{e}/{x}" for e in (1, 2)
                                        for x in ("cifar", "convert", "demo_shapes_voc_R_18_C4")),
                     "convert/demo", "results"]
    pre = out / "pretrain" / "demo"
    for s in stages[1:7]:  # each needs its snapshot alone, never the pretraining's completion
        assert s.needs == str(pre / contract.snapshot(int(s.name.split("/epoch")[1][:4])))
        assert "pretrain/demo" not in s.after
    assert stages[0].opts[-1] == "checkpoint.save_every_epochs=1"
    pipeline.run_sequential(stages, log=lambda m: None, env={"OMP_NUM_THREADS": "1", "SHAPES_ROOT": str(corpus)})

    snapshots = sorted(p.name for p in pre.glob("checkpoint_*.pth"))
    assert snapshots == ["checkpoint_0001.pth", "checkpoint_0002.pth"]
    probes = sorted(out.glob("checkpoint_evals/demo/epoch*/linear_cifar/linear_metrics.json"))
    fine_tunes = sorted(out.glob("checkpoint_evals/demo/epoch*/transfer/demo/*/seed0/final_metrics.json"))
    assert len(probes) == len(fine_tunes) == len(snapshots)  # one evaluation per checkpoint
    for e, probe in enumerate(probes, 1):  # ... of that checkpoint
        assert Path(json.loads(probe.read_text())["checkpoint"]).name == contract.snapshot(e)

    points = checkpoint_evals.collect([out])
    by_metric = {}
    for p in points:
        assert (p.backbone, p.seed) == ("demo", None)
        by_metric.setdefault(p.metric, []).append(p.epoch)
    assert by_metric == {m: [1, 2] for m in ("kNN top-1", "linear top-1", "demo_shapes_voc_R_18_C4 AP50",
                                               "demo_shapes_voc_R_18_C4 AP", "demo_shapes_voc_R_18_C4 AP75")}
    runs, problems = find_runs([out])  # the table: the pretraining alone, no snapshot's evaluation
    assert [(r.kind, r.backbone) for r in runs] == [("pretrain", "demo")] and not problems
    figures = write_figures(runs, tmp_path / "plots", points)
    axes = figures["checkpoint_evals.png"].axes
    assert sorted(ax.get_title() for ax in axes) == sorted(by_metric)
    assert all([list(line.get_xdata()) for line in ax.lines] == [[1, 2]] for ax in axes)
    assert (tmp_path / "plots" / "checkpoint_evals.png").stat().st_size > 0


def write_done(path):
    """A stage command: fails unless its snapshot exists, then writes its done file."""
    return (sys.executable, "-c", "import pathlib, sys; s, d = map(pathlib.Path, sys.argv[1:]); "
            "assert s.is_file(), s; d.parent.mkdir(parents=True, exist_ok=True); d.write_text(str(s.stat().st_mtime))")


def test_watcher_submits_each_evaluation_once_its_snapshot_exists_and_not_after_pretraining(tmp_path):
    out = tmp_path / "pipe"
    args = submit.parse_args(["pipeline", "--pretrain-config", "configs/pretrain/demo.yaml", "--data-root",
                              str(tmp_path), "--out", str(out), "--cluster", "local", "--gpus-per-node", "0"])
    pre = out / "pretrain" / "demo"
    stages = [pipeline.Stage(f"eval/demo/epoch000{e}/probe", (*write_done(None), str(pre / contract.snapshot(e)),
                                                                str(out / f"e{e}" / "done")),
                             str(out / f"e{e}" / "done"), needs=str(pre / contract.snapshot(e))) for e in (1, 2)]
    # the pretraining is running (its job: this process) and writes a snapshot an epoch
    registry.record(contract.jobs_file(out), {"pretrain/demo": {"job_id": str(os.getpid()), "cluster": "local",
                                                                "folder": str(tmp_path / "jobs")}})

    def pretraining():
        pre.mkdir(parents=True)
        for e in (1, 2):
            time.sleep(0.5)
            contract.write_text(pre / contract.snapshot(e), "weights")

    writer = threading.Thread(target=pretraining)
    writer.start()
    started = time.time()
    submitted = CheckpointWatcher(args, stages, poll_s=0.05)()
    writer.join()
    assert len(submitted) == 2 and time.time() - started >= 1.0  # one job a snapshot, each after it appeared
    assert not contract.done_file("pretrain", pre).exists()  # never waited for the pretraining's end
    for s in stages:
        end = time.time() + 60
        while not Path(s.done_file).exists() and time.time() < end:
            time.sleep(0.1)
        assert float(Path(s.done_file).read_text()) == Path(s.needs).stat().st_mtime
    recorded = json.loads(contract.jobs_file(out).read_text())
    assert {s.name for s in stages} <= set(recorded)  # a requeued watcher submits nothing twice

    # the pretraining ended without the snapshot an evaluation reads: one line naming it
    contract.write_json(contract.done_file("pretrain", pre), {})
    late = pipeline.Stage("eval/demo/epoch0003/probe", ("true",), str(out / "e3"), needs=str(pre / contract.snapshot(3)))
    with pytest.raises(pipeline.PipelineError, match=r"checkpoint_0003.pth, which its pretraining ended without"):
        CheckpointWatcher(args, [late], poll_s=0.05)()


def test_dry_run_submits_a_watcher_beside_the_pretraining_not_after_it(capsys, tmp_path):
    (tmp_path / "img" / "train").mkdir(parents=True)
    assert submit.main(["pipeline", "--dry-run", "--pretrain-config", "configs/pretrain/demo.yaml", "--data-root",
                        str(tmp_path / "img"), "--out", str(tmp_path / "pipe"), "--voc-config", "--coco-config",
                        "--eval-every", "1", "--eval-probe", "cifar", "--cluster", "slurm"]) == 0
    out = capsys.readouterr().out
    jobs = re.findall(r"^# ---- job (\S+)(?: \(after (.*)\))?$", out, flags=re.M)
    assert jobs == [("pretrain/demo", ""), ("watch/demo", ""), ("convert/demo", "pretrain/demo"),
                    ("results", "")]
    assert "checkpoint.save_every_epochs=1" in out.split("# ---- job watch/demo")[0]
    watch = out.split("# ---- job watch/demo")[1].split("# ---- job")[0]
    assert "#SBATCH --cpus-per-task=1" in watch and "--array" not in watch and "--gpus" not in watch
    runs = re.findall(r"^# runs: .*--checkpoint (\S+) .*\(once (\S+) exists\)$", watch, flags=re.M)
    assert [(Path(c).name, Path(n).name) for c, n in runs] == [("checkpoint_0001.pth",) * 2,
                                                                ("checkpoint_0002.pth",) * 2, ("checkpoint_0003.pth",) * 2]
    assert submit.main(["pipeline", "--dry-run", "--pretrain-config", "configs/pretrain/demo.yaml", "--data-root",
                        str(tmp_path / "img"), "--out", str(tmp_path / "p2"), "--eval-every", "1"]) == 2
    assert "what to run on each snapshot" in capsys.readouterr().err


def test_a_snapshots_fine_tune_is_plotted_with_its_recorded_metrics_columns():
    """A keypoint fine-tune (final_metrics.json "metric": keypoints) gives the keypoint columns, as
    the results table reads it, not the COCO box/mask columns of the task-name rule."""
    fm = {"task": "demo_shapes_kp_R_18_FPN", "metric": "keypoints",
          "results": {"keypoints": {"AP": 2.5, "AP50": 6.5, "AP75": 1.0}, "bbox": {"AP": 3.0, "AP50": 9.0}}}
    assert checkpoint_evals.fine_tune_points(fm) == [
        ("demo_shapes_kp_R_18_FPN AP (kp)", 2.5), ("demo_shapes_kp_R_18_FPN AP50 (kp)", 6.5),
        ("demo_shapes_kp_R_18_FPN AP75 (kp)", 1.0), ("demo_shapes_kp_R_18_FPN AP (bbox)", 3.0)]
