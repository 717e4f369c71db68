"""Submitit launchers: --dry-run's sbatch lines, the stage list, a local pretraining job requeued
after a simulated timeout (it resumes), and the demo pipeline end to end on the local cluster."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

submitit = pytest.importorskip("submitit")

from slurm import pipeline, registry, submit, tasks  # noqa: E402
from slurm.tasks import StageJob  # noqa: E402

# tiny pretraining: 32-px crops, batch 8, no kNN monitor; a checkpoint after every step
TINY_PRETRAIN = ["data.crop=32", "mm.crops=[16]", "data.batch_size=8", "data.num_workers=0",
                 "model.queue=64", "knn.every_epochs=0", "log.progress=false", "log.tensorboard=false",
                 "checkpoint.every_iters=1"]

ENV_PROBE = textwrap.dedent("""
    import json, os, pathlib, sys, time
    out, rank = pathlib.Path(sys.argv[1]), os.environ["RANK"]
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    (out / f"rank{rank}").write_text(json.dumps({k: os.environ[k] for k in keys}))
    while rank == "0" and not (out / "rank1").exists():  # rank 0 ends last, as after a collective
        time.sleep(0.05)
    if rank == "0":
        (out / "done").write_text("")
""")


def sbatch_lines(text):
    return set(re.findall(r"^#SBATCH .*$", text, flags=re.M))


def dry_run(capsys, *argv):
    assert submit.main([argv[0], "--dry-run", *argv[1:]]) == 0
    return capsys.readouterr().out


@pytest.fixture
def image_root(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    return tmp_path / "images"


def test_dry_run_pretrain_sbatch_lines(capsys, tmp_path, image_root):
    out = dry_run(capsys, "pretrain", "--config", "configs/pretrain/demo.yaml", "--output-dir",
                  str(tmp_path / "run"), "--data-root", str(image_root), "--nodes", "2", "--gpus-per-node",
                  "4", "--partition", "learnfair", "--timeout-min", "90", "--cluster", "slurm",
                  "--", "epochs=3")
    lines = sbatch_lines(out)
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
            "#SBATCH --partition=learnfair", "#SBATCH --time=90", "#SBATCH --signal=USR2@120"} <= lines
    assert "-m pretrain --config" in out and "epochs=3" in out
    assert not (tmp_path / "run").exists()  # nothing submitted, nothing written


def test_dry_run_transfer_array_and_pipeline_dependencies(capsys, tmp_path, image_root):
    weights = tmp_path / "w.pkl"
    weights.write_bytes(b"")
    out = dry_run(capsys, "transfer", "--config-file", "configs/detection/demo_shapes_voc_R_18_C4.yaml",
                  "--weights", str(weights), "--output-root", str(tmp_path / "det"), "--seeds", "3",
                  "--gpus-per-node", "2", "--cpus-per-task", "6", "--account", "acc", "--qos", "high",
                  "--mem-gb", "64", "--signal-delay-s", "300", "--cluster", "slurm")
    lines = sbatch_lines(out)
    assert {"#SBATCH --array=0-2%3", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=2",
            "#SBATCH --cpus-per-task=12", "#SBATCH --account=acc", "#SBATCH --qos=high",
            "#SBATCH --mem=64GB", "#SBATCH --signal=USR2@300"} <= lines
    seeds = re.findall(r"OUTPUT_DIR (\S+) .* SEED (\d+)", out)
    assert [(Path(d).name, s) for d, s in seeds] == [("seed0", "0"), ("seed1", "1"), ("seed2", "2")]

    out = dry_run(capsys, "pipeline", "--pretrain-config", "configs/pretrain/demo.yaml",
                  "--data-root", str(image_root), "--out", str(tmp_path / "pipe"), "--seeds", "2",
                  "--cluster", "slurm")
    jobs = re.findall(r"^# ---- job (\S+)(?: \(after (.*)\))?$", out, flags=re.M)
    assert jobs == [("pretrain/demo", ""), ("convert/demo", "pretrain/demo"),
                    ("transfer/demo", "convert/demo"), ("results", "transfer/demo")]
    assert "#SBATCH --dependency=afterok:convert/demo" in out

    (tmp_path / "pipe/pretrain/demo").mkdir(parents=True)  # pretraining complete: not resubmitted
    (tmp_path / "pipe/pretrain/demo/done.json").write_text("{}")
    out = dry_run(capsys, "pipeline", "--pretrain-config", "configs/pretrain/demo.yaml",
                  "--data-root", str(image_root), "--out", str(tmp_path / "pipe"), "--cluster", "slurm")
    jobs = re.findall(r"^# ---- job (\S+)(?: \(after (.*)\))?$", out, flags=re.M)
    assert jobs[:2] == [("convert/demo", ""), ("transfer/demo", "convert/demo")]


def test_random_init_baseline_and_a_table_that_follows_its_runs(capsys, tmp_path, image_root):
    out = dry_run(capsys, "pipeline", "--pretrain-config", "configs/pretrain/demo.yaml",
                  "--data-root", str(image_root), "--out", str(tmp_path / "pipe"), "--seeds", "2",
                  "--coco-config", "--random-init", "--cluster", "slurm")
    jobs = re.findall(r"^# ---- job (\S+)(?: \(after (.*)\))?$", out, flags=re.M)
    assert jobs == [("pretrain/demo", ""), ("convert/demo", "pretrain/demo"), ("transfer/demo", "convert/demo"),
                    ("transfer/random_init", ""), ("results", "transfer/demo, transfer/random_init")]
    assert len(re.findall(r"MODEL\.WEIGHTS '' .*TRANSFER\.BACKBONE_NAME random_init", out)) == 2

    stages = pipeline.build_stages(pipeline.named_configs(["configs/pretrain/demo.yaml"]), image_root,
                                   tmp_path / "out", voc_configs=["configs/detection/voc_R_50_C4_24k.yaml"],
                                   seeds=2, random_init=True)
    for s in stages:
        Path(s.done_file).parent.mkdir(parents=True, exist_ok=True)
        Path(s.done_file).write_text("{}")
    assert pipeline.pending(stages) == []
    lost = stages[-2]  # a fine-tune to (re)run, e.g. one more seed: the table must follow it
    os.remove(lost.done_file)
    assert [s.name for s in pipeline.pending(stages)] == [lost.name, "results"]
    with pytest.raises(pipeline.PipelineError, match="random_init"):
        pipeline.build_stages({"random_init": ("x.yaml", ())}, image_root, tmp_path, random_init=True)


def test_rerun_waits_for_queued_jobs_instead_of_submitting_twice(capsys, tmp_path, image_root, monkeypatch):
    """jobs.json records each stage's job; sacct, else squeue (here scripts printing fixed states,
    sacct's read by Submitit's own SlurmJob) says which still run: those are waited for."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text(f"#!/bin/sh\ncat {bin_dir}/sacct.out\n")
    (bin_dir / "squeue").write_text(  # as squeue: the states on stdout, or an error on stderr
        f"#!/bin/sh\nrc=$(cat {bin_dir}/squeue.rc)\n"
        f"if [ $rc = 0 ]; then cat {bin_dir}/squeue.out; else cat {bin_dir}/squeue.out >&2; fi\nexit $rc\n")
    for tool in ("sacct", "squeue"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def cluster(sacct, squeue="", squeue_rc=0):
        (bin_dir / "sacct.out").write_text("JobID|State|NodeList\n" + sacct)
        (bin_dir / "squeue.out").write_text(squeue)
        (bin_dir / "squeue.rc").write_text(str(squeue_rc))

    out = tmp_path / "pipe"
    jobs_file = out / "submitit" / "jobs.json"

    def recorded(**ids):
        registry.record(jobs_file, {name.replace("_", "/"): {"job_id": i, "cluster": "slurm",
                                                             "folder": str(out / "submitit" / i)}
                                    for name, i in ids.items()})

    argv = ["pipeline", "--pretrain-config", "configs/pretrain/demo.yaml", "--data-root", str(image_root),
            "--out", str(out), "--coco-config", "--cluster", "slurm"]

    def jobs():
        return re.findall(r"^# ---- job (\S+)(?: \(after (.*)\))?$", dry_run(capsys, *argv), flags=re.M)

    recorded(pretrain_demo="4242", results="4250")
    cluster("4242|RUNNING|node7\n4250|PENDING|\n")
    # pretraining is still running: the conversion waits for its job; the queued table is submitted
    # again, because the fine-tunes it must read are new
    assert jobs() == [("convert/demo", "4242"), ("transfer/demo", "convert/demo"), ("results", "transfer/demo")]
    cluster("4242|CANCELLED by 0|node7\n4250|CANCELLED by 0|\n")  # ended: submitted again
    assert jobs()[0] == ("pretrain/demo", "")

    # no accounting (sacct knows nothing): squeue decides (Submitit caches ended jobs: new ids)
    recorded(pretrain_demo="4260", results="4261")
    cluster("", squeue="PENDING\n")
    assert jobs()[0] == ("convert/demo", "4260")
    recorded(pretrain_demo="4270", results="4271")
    cluster("", squeue="slurm_load_jobs error: Invalid job id specified\n", squeue_rc=1)
    assert jobs()[0] == ("pretrain/demo", "")  # the controller no longer holds it: ended
    recorded(pretrain_demo="4280", results="4281")
    cluster("", squeue="slurm_load_jobs error: Unable to contact slurm controller\n", squeue_rc=1)
    assert submit.main(argv + ["--dry-run"]) == 2  # cannot tell: neither resubmit nor wait
    assert "whether its job 4280 still runs" in capsys.readouterr().err

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a job on this machine runs every stage in one process: a second one is refused
        registry.record(jobs_file, {"pretrain/demo": {"job_id": str(sleeper.pid), "cluster": "local",
                                                      "folder": str(tmp_path)},
                                    "results": {"job_id": str(sleeper.pid), "cluster": "local",
                                                "folder": str(tmp_path)}})
        assert submit.main(argv[:-1] + ["local", "--dry-run"]) == 2
        assert f"still RUNNING in job {sleeper.pid}" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    assert submit.main(argv[:-1] + ["local", "--dry-run"]) == 0  # it ended: go on


def test_stages_layout_resume_flag_and_skip(tmp_path):
    stages = pipeline.build_stages(pipeline.named_configs(["configs/pretrain/demo.yaml"]), tmp_path / "img",
                                   tmp_path / "out",
                                   voc_configs=["configs/detection/demo_shapes_voc_R_18_C4.yaml"],
                                   seeds=2, first_seed=3)
    assert [s.name for s in stages] == ["pretrain/demo", "convert/demo",
                                        "transfer/demo/demo_shapes_voc_R_18_C4/seed3",
                                        "transfer/demo/demo_shapes_voc_R_18_C4/seed4", "results"]
    det = stages[2]
    assert det.done_file == str(tmp_path / "out/transfer/demo/demo_shapes_voc_R_18_C4/seed3/final_metrics.json")
    assert "--resume" not in det.command()
    Path(det.done_file).parent.mkdir(parents=True)  # a previous attempt: Detectron2 must resume
    cmd = det.command(extra=["--num-machines", "2"])
    assert cmd.index("--num-machines") < cmd.index("--resume") < cmd.index("OUTPUT_DIR")
    assert stages[-1].after == tuple(s.name for s in stages[2:4])

    fresh = stages[3]  # a requeued fine-tune resumes with Detectron2's --resume
    requeued = StageJob([fresh]).checkpoint().function
    assert requeued.resume and "--resume" in fresh.command(resume=requeued.resume)

    marker = tmp_path / "ran.txt"
    write = (f"import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.parent.mkdir(exist_ok=True); "
             f"p.write_text('x'); open({str(marker)!r}, 'a').write('.')")
    fake = [pipeline.Stage(f"s{k}", (sys.executable, "-c", write, str(tmp_path / f"s{k}" / "done")),
                           str(tmp_path / f"s{k}" / "done")) for k in range(2)]
    assert pipeline.run_sequential(fake, log=lambda m: None) == ["s0", "s1"]
    assert pipeline.run_sequential(fake, log=lambda m: None) == []  # complete stages are skipped
    assert marker.read_text() == ".."
    lazy = pipeline.Stage("lazy", (sys.executable, "-c", "pass"), str(tmp_path / "never"))
    with pytest.raises(pipeline.PipelineError, match="without writing"):
        pipeline.run_sequential([lazy], log=lambda m: None)


def test_bad_input_exits_2(capsys, tmp_path):
    assert submit.main(["pretrain", "--config", str(tmp_path / "nope.yaml"), "--output-dir",
                        str(tmp_path), "--dry-run"]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err
    weights = tmp_path / "w.pkl"
    weights.write_bytes(b"")
    # 16 images as written over 3 GPUs: refused before anything is submitted
    assert submit.main(["transfer", "--config-file", "configs/detection/voc_R_50_C4_24k.yaml", "--weights",
                        str(weights), "--output-root", str(tmp_path), "--gpus-per-node", "3", "--dry-run",
                        "--", "SOLVER.REFERENCE_WORLD_SIZE", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "on 3 GPU(s) x 1 node(s): SOLVER.IMS_PER_BATCH 16 cannot be split evenly" in err[0]


def test_local_job_sets_the_distributed_env_per_task(tmp_path):
    """Two tasks of one local job: each process sees its own RANK, the same world and master."""
    stage = pipeline.Stage("pretrain/probe", (sys.executable, "-c", ENV_PROBE, str(tmp_path)),
                           str(tmp_path / "done"), kind="pretrain")
    executor = submitit.AutoExecutor(tmp_path / "jobs", cluster="local")
    executor.update_parameters(tasks_per_node=2, timeout_min=2)
    executor.submit(StageJob([stage])).results()
    envs = [json.loads((tmp_path / f"rank{r}").read_text()) for r in (0, 1)]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [("0", "0", "2"), ("1", "1", "2")]
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"] and envs[0]["MASTER_ADDR"] == envs[1]["MASTER_ADDR"]


def test_multi_node_transfer_gets_detectron2_launch_flags():
    node1 = SimpleNamespace(num_nodes=2, node=1, hostnames=["gpu-a", "gpu-b"], job_id="4242")
    flags = tasks.transfer_flags(node1)
    assert flags[:4] == ["--num-machines", "2", "--machine-rank", "1"]
    assert flags[4] == "--dist-url" and flags[5] == f"tcp://gpu-a:{tasks.rendezvous_port('4242')}"
    assert tasks.transfer_flags(SimpleNamespace(num_nodes=1)) == []  # launch() picks a local port


def task_pids(controller_pid):
    """The task processes of a local Submitit job (children of its controller)."""
    path = Path(f"/proc/{controller_pid}/task/{controller_pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def wait_for(predicate, timeout, what):
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the local task process in /proc")
def test_local_pretrain_requeues_and_resumes(corpus, tmp_path):
    out = tmp_path / "pretrain"
    args = submit.parse_args(["pretrain", "--config", "configs/pretrain/demo.yaml", "--output-dir", str(out),
                              "--data-root", str(corpus / "imagefolder"), "--epochs", "1", "--cluster", "local",
                              "--gpus-per-node", "0", "--timeout-min", "10", "--", *TINY_PRETRAIN])
    job, = submit.launch(args, submit.stages_for(args), log=lambda m: None)
    wait_for(lambda: (out / "checkpoint.pth").exists() or job.done(), 120, "the first checkpoint")
    assert not job.done(), job.stderr()
    # Slurm's preemption: SIGTERM to every process of the job (the stage must survive it), then
    # Submitit's USR2, which the local controller also sends its tasks at a timeout (Controller.wait)
    tasks = task_pids(job._process.pid)
    stage_procs = [p for t in tasks for p in task_pids(t)]
    assert tasks and stage_procs
    for pid in tasks + stage_procs:
        os.kill(pid, signal.SIGTERM)
    time.sleep(1)  # Slurm's grace time
    for pid in stage_procs:
        os.kill(pid, 0)  # still running (ProcessLookupError otherwise)
    for pid in tasks:
        os.kill(pid, signal.SIGUSR2)
    job.result()  # raises if the job failed
    stdout = job.stdout()
    assert "Bypassing signal SIGTERM" in job.stderr()
    assert "Requeued job" in stdout and "resume=True" in stdout
    resumed = re.findall(r"resumed from .* at iteration (\d+)", (out / "log.txt").read_text())
    assert resumed and int(resumed[0]) > 0  # from its checkpoint, not from scratch
    ipe = len(list((corpus / "imagefolder" / "train").rglob("*.jpg"))) // 8
    done = json.loads((out / "done.json").read_text())
    assert done["iters"] == ipe  # as many steps as an uninterrupted run
    train_iters = [r["iter"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                   if r["type"] == "train"]
    assert train_iters[-1] == ipe


@pytest.mark.slow
@pytest.mark.detectron2
def test_demo_pipeline_local_end_to_end(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHAPES_ROOT", str(corpus))
    root = tmp_path / "pipe"
    argv = ["pipeline", "--pretrain-config", "configs/pretrain/demo.yaml", "--data-root",
            str(corpus / "imagefolder"), "--epochs", "1", "--voc-config",
            "configs/detection/demo_shapes_voc_R_18_C4.yaml", "--coco-config", "--seeds", "2",
            "--out", str(root), "--cluster", "local", "--gpus-per-node", "0", "--wait",
            "--pretrain-opts", " ".join(TINY_PRETRAIN),
            "--transfer-opts", "SOLVER.MAX_ITER 2 SOLVER.STEPS (1,) INPUT.MIN_SIZE_TRAIN (64,) INPUT.MIN_SIZE_TEST 64"]
    assert submit.main(argv) == 0
    runs = sorted((root / "transfer" / "demo").glob("*/seed*/final_metrics.json"))
    metrics = [json.loads(p.read_text()) for p in runs]
    assert [(m["task"], m["seed"], m["backbone"]) for m in metrics] == [
        ("demo_shapes_voc_R_18_C4", 0, "demo"), ("demo_shapes_voc_R_18_C4", 1, "demo")]
    assert (root / "weights" / "demo.pkl").is_file() and (root / "pretrain" / "demo" / "done.json").is_file()
    assert "demo" in (root / "results.md").read_text()
    recorded = json.loads((root / "submitit" / "jobs.json").read_text())  # one local job ran them all
    assert len(recorded) == 5 and len({e["job_id"] for e in recorded.values()}) == 1
    capsys.readouterr()
    assert submit.main(argv) == 0  # again: every stage is complete, nothing is submitted
    assert "nothing to do" in capsys.readouterr().out


def test_probe_stages_follow_pretraining_and_feed_the_table(capsys, tmp_path, image_root):
    stages = pipeline.build_stages(pipeline.named_configs(["configs/pretrain/demo.yaml"]), image_root,
                                   tmp_path / "out", voc_configs=["configs/detection/demo_shapes_voc_R_18_C4.yaml"],
                                   random_init=True, probe_presets=("cifar", "voc07"),
                                   probe_opts=("--epochs", "5"), probe_voc_root=tmp_path / "voc")
    by_name = {s.name: s for s in stages}
    out = tmp_path / "out"
    probe = by_name["probe/demo/cifar"]
    assert probe.after == ("pretrain/demo",) and probe.kind == "probe"
    assert probe.done_file == str(out / "pretrain/demo/linear_cifar/linear_metrics.json")
    assert probe.command() == [sys.executable, "-m", "pretrain.linear", "--checkpoint",
                               str(out / "pretrain/demo/checkpoint.pth"), "--data", str(image_root), "--preset",
                               "cifar", "--data-format", "imagefolder", "--output-dir",
                               str(out / "pretrain/demo/linear_cifar"), "--epochs", "5"]
    assert by_name["probe/demo/voc07"].argv[by_name["probe/demo/voc07"].argv.index("--data") + 1] == \
        str(tmp_path / "voc")
    rand = by_name["probe/random_init/voc07"]
    assert rand.after == () and rand.done_file == str(out / "pretrain/random_init/linear_voc07/linear_metrics.json")
    assert rand.argv[3:11] == ("--random-init", "--arch", "resnet18", "--stem", "imagenet", "--seed", "0", "--data")
    assert set(by_name["results"].after) >= {"probe/demo/cifar", "probe/demo/voc07", "probe/random_init/cifar",
                                             "probe/random_init/voc07"}
    # a CIFAR-stem backbone is pretrained and probed, never converted to Detectron2 weights
    cifar_root = tmp_path / "cifar"
    (cifar_root / "cifar-10-batches-py").mkdir(parents=True)
    stages = pipeline.build_stages(pipeline.named_configs(["configs/pretrain/sane_r50_cifar.yaml"]), cifar_root,
                                   tmp_path / "c", voc_configs=["configs/detection/voc_R_50_C4_24k.yaml"],
                                   probe_presets=("cifar",))
    assert [s.name for s in stages] == ["pretrain/sane_r50_cifar", "probe/sane_r50_cifar/cifar", "results"]
    assert stages[1].argv[stages[1].argv.index("--data-format") + 1] == "cifar10"
    assert stages[-1].argv[2:] == (str(tmp_path / "c"), "--out", str(tmp_path / "c/results.md"))
    with pytest.raises(pipeline.PipelineError, match="voc07 probe reads VOC2007"):
        pipeline.build_stages({}, image_root, tmp_path, probe_presets=("voc07",))
    with pytest.raises(pipeline.PipelineError, match="they differ"):
        pipeline.build_stages(pipeline.named_configs(["configs/pretrain/demo.yaml",
                                                      "configs/pretrain/sane_r50_cifar.yaml"]),
                              image_root, tmp_path, random_init=True, probe_presets=("cifar",))
    with pytest.raises(pipeline.PipelineError, match="slr.enabled=false contradicts method sane"):
        pipeline.build_stages({"demo": ("configs/pretrain/demo.yaml", ("slr.enabled=false",))}, image_root, tmp_path)

    # submit.py: --probe, --probe-opts; a probe job holds one GPU and waits for its pretraining
    out = dry_run(capsys, "pipeline", "--pretrain-config", "configs/pretrain/demo.yaml", "--data-root",
                  str(image_root), "--out", str(tmp_path / "pipe"), "--coco-config", "--voc-config",
                  "--probe", "cifar", "--probe-opts", "--epochs 3", "--gpus-per-node", "8", "--cluster", "slurm")
    jobs = re.findall(r"^# ---- job (\S+)(?: \(after (.*)\))?$", out, flags=re.M)
    assert jobs == [("pretrain/demo", ""), ("convert/demo", "pretrain/demo"),
                    ("probe/demo/cifar", "pretrain/demo"), ("results", "probe/demo/cifar")]
    probe_job = out.split("# ---- job probe/demo/cifar")[1].split("# ---- job")[0]
    assert "#SBATCH --gpus-per-node=1" in probe_job and "--preset cifar" in probe_job
    assert probe_job.rstrip().endswith("--epochs 3")
    assert pipeline.PROBE_PRESETS == tuple(__import__("pretrain.linear").linear.PRESETS)


@pytest.mark.slow
def test_probes_run_in_the_sequential_pipeline_and_fill_the_table(corpus, tmp_path):
    """pretrain -> probes (cifar, voc07) of the backbone and of random init -> the table's kNN,
    linear top-1 and VOC07 cls mAP for both rows, from the same probe code."""
    out = tmp_path / "pipe"
    opts = (*TINY_PRETRAIN, "epochs=1", "model.arch=resnet18")
    stages = pipeline.build_stages({"demo": ("configs/pretrain/demo.yaml", opts)}, corpus / "imagefolder", out,
                                   random_init=True, probe_presets=("cifar", "voc07"), probe_voc_root=corpus,
                                   probe_opts=("--epochs", "2", "--batch-size", "16", "--image-size", "32",
                                               "--num-workers", "0", "--device", "cpu"))
    assert [s.name for s in stages if not s.name.startswith("probe/")] == ["pretrain/demo", "convert/demo", "results"]
    pipeline.run_sequential(stages, log=lambda m: None, env={"OMP_NUM_THREADS": "1"})
    table = (out / "results.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
            for line in table.splitlines() if line.startswith("| demo") or line.startswith("| random_init")}
    assert set(rows) == {"demo", "random_init"}
    for name, cells in rows.items():
        assert all(re.fullmatch(r"\d+\.\d \(n=1\)", c) for c in cells), (name, cells)   # kNN, linear, VOC07
    probe = json.loads((out / "pretrain/demo/linear_cifar/linear_metrics.json").read_text())
    assert rows["demo"][0] == f"{probe['knn_top1']:.1f} (n=1)"   # the probe's kNN, not the monitor's
    assert "random_init = untrained resnet18 (imagenet stem)" in table
    assert "demo = sane: SLR p+q, MM, in-batch negatives" in table


def test_pretraining_seeds_layout_pairs_each_fine_tune_with_its_backbone_seed(tmp_path, image_root):
    """pretrain_seeds: one pretraining per (backbone, seed) in pretrain/<b>/seed<k>/, its weights,
    probe and one fine-tune with SEED k; random init's probe and fine-tune of seed k beside them."""
    out = tmp_path / "out"
    det = "configs/detection/demo_shapes_voc_R_18_C4.yaml"
    stages = pipeline.build_stages({"demo": ("configs/pretrain/demo.yaml", ("method=mocov2",))}, image_root, out,
                                   voc_configs=[det], seeds=5, first_seed=7, random_init=True,
                                   probe_presets=("cifar",), pretrain_seeds=[0, 1])
    by_name = {s.name: s for s in stages}
    assert set(by_name) == {"pretrain/demo/seed0", "pretrain/demo/seed1", "convert/demo/seed0", "convert/demo/seed1",
                            "probe/demo/seed0/cifar", "probe/demo/seed1/cifar", "probe/random_init/seed0/cifar",
                            "probe/random_init/seed1/cifar", "transfer/demo/demo_shapes_voc_R_18_C4/seed0",
                            "transfer/demo/demo_shapes_voc_R_18_C4/seed1",
                            "transfer/random_init/demo_shapes_voc_R_18_C4/seed0",
                            "transfer/random_init/demo_shapes_voc_R_18_C4/seed1", "results"}
    pre = by_name["pretrain/demo/seed1"]
    assert pre.done_file == str(out / "pretrain/demo/seed1/done.json")
    assert pre.opts[-2:] == ("method=mocov2", "seed=1") and f"output_dir={out}/pretrain/demo/seed1" in pre.opts
    assert by_name["convert/demo/seed1"].done_file == str(out / "weights/demo/seed1.pkl")
    fine_tune = by_name["transfer/demo/demo_shapes_voc_R_18_C4/seed1"]
    assert fine_tune.after == ("convert/demo/seed1",)
    opts = dict(zip(fine_tune.opts[::2], fine_tune.opts[1::2]))
    assert opts["MODEL.WEIGHTS"] == str(out / "weights/demo/seed1.pkl") and opts["SEED"] == "1"
    rand = by_name["probe/random_init/seed1/cifar"]
    assert rand.argv[rand.argv.index("--seed") + 1] == "1"
    assert rand.done_file == str(out / "pretrain/random_init/seed1/linear_cifar/linear_metrics.json")


@pytest.mark.slow
def test_pretraining_seeds_give_rows_over_seeds_for_backbones_and_random_init(corpus, tmp_path):
    out = tmp_path / "pipe"
    opts = (*TINY_PRETRAIN, "epochs=1", "model.arch=resnet18")
    stages = pipeline.build_stages({"demo": ("configs/pretrain/demo.yaml", opts)}, corpus / "imagefolder", out,
                                   random_init=True, probe_presets=("cifar",), pretrain_seeds=[0, 1],
                                   probe_opts=("--epochs", "2", "--batch-size", "16", "--image-size", "32",
                                               "--num-workers", "0", "--device", "cpu"))
    pipeline.run_sequential(stages, log=lambda m: None, env={"OMP_NUM_THREADS": "1"})
    table = (out / "results.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]]
            for line in table.splitlines() if line.startswith("| demo") or line.startswith("| random_init")}
    assert set(rows) == {"demo", "random_init"}, table
    for name, cells in rows.items():   # kNN, linear top-1: mean ± std over the two seeds
        assert all(re.fullmatch(r"\d+\.\d ± \d+\.\d \(n=2\)", c) for c in cells), (name, cells)
    knn = [json.loads((out / f"pretrain/random_init/seed{k}/linear_cifar/linear_metrics.json").read_text())["knn_top1"]
           for k in (0, 1)]
    assert rows["random_init"][0].startswith(f"{sum(knn) / 2:.1f} ±")
