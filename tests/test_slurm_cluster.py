"""slurm/submit.py --cluster slurm against a real Slurm started on this machine (slurm/testcluster.py),
nothing mocked: jobs, requeues, afterok chains, reruns while queued, failures, two nodes, kill -9 faults."""
# One cluster for the session: Debian's packages are installed when missing (as root, apt-get); the
# tests skip, with the reason, only where that cannot be done. Faults are seeded: SLURM_FAULT_SEED=<n>
# replays a run of the fault test.
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")

from slurm import registry, tasks, testcluster  # noqa: E402

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = "configs/pretrain/demo.yaml"
VOC_CONFIG = "configs/detection/demo_shapes_voc_R_18_C4.yaml"
EPOCHS = 6  # 16 images, batch 8: 12 steps, a checkpoint after each (a requeue lands mid-run)
# tiny pretraining, bit-exact (one process resumes exactly where it stopped)
PRETRAIN_OPTS = ["data.crop=32", "mm.crops=[16]", "data.batch_size=8", "data.num_workers=0", "model.queue=64",
                 "knn.every_epochs=0", "log.progress=false", "log.tensorboard=false",
                 "checkpoint.every_iters=1", "deterministic=true"]
# two Detectron2 steps at 64 px, evaluated on the 8 test images; no checkpoint before model_final
DETECTION_OPTS = ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "INPUT.MIN_SIZE_TRAIN", "(64,)",
                  "INPUT.MIN_SIZE_TEST", "64", "TEST.PRECISE_BN.NUM_ITER", "1"]
# every job: one CPU, no GPU line, a time limit long enough that Submitit counts a USR2 as a preemption
CLUSTER_ARGS = ["--cluster", "slurm", "--gpus-per-node", "0", "--cpus-per-task", "1", "--timeout-min", "60"]
SUBMITTED = re.compile(r"^submitted (\S+): job (\d+)", re.M)


# ---------------------------------------------------------------- the cluster
@pytest.fixture(scope="session")
def slurm_cluster(request):
    try:
        testcluster.install(log=lambda m: print(m, file=sys.stderr))
    except testcluster.Unavailable as e:
        pytest.skip(str(e))
    root = Path(tempfile.mkdtemp(prefix="slurm-test-"))
    cluster = testcluster.Cluster(root, log=lambda m: print(m, file=sys.stderr))
    try:
        cluster.up()
    except BaseException:
        cluster.down()
        raise
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)  # sbatch/sacct/squeue here, and the jobs
    yield cluster
    cluster.down()
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved
    if request.session.testsfailed:
        print(f"\nSlurm test cluster's logs: {root}/log", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def fresh_queue(request):
    """Each test starts and leaves the shared cluster with no job and its partition up."""
    yield
    if "slurm_cluster" in request.fixturenames:
        cluster = request.getfixturevalue("slurm_cluster")
        cluster.run("scontrol", "update", "PartitionName=debug", "State=UP", check=False)
        cluster.cancel_all()


@pytest.fixture(scope="module")
def tiny_corpus(module_tmp):
    """16 train and 8 test images of 64 px, in the ImageFolder and VOC layouts."""
    from suite.corpus import make_corpus

    return make_corpus(module_tmp("slurm_corpus") / "shapes", seed=0, num_train=16,
                       num_test=8, size=64)


# ---------------------------------------------------------------- helpers
def submit(corpus, *argv, check=True):
    """`python slurm/submit.py ARGV` as a user runs it; (returncode, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), SHAPES_ROOT=str(corpus))
    r = subprocess.run([sys.executable, "slurm/submit.py", *argv], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=180)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def submitted(stdout):
    """{job name: job id} from submit.py's output."""
    return dict(SUBMITTED.findall(stdout))


def queue(cluster):
    """{job id (array tasks as <id>_<k>): state} of the jobs still held by slurmctld."""
    out = cluster.run("squeue", "-h", "-o", "%i %T")
    return dict(line.split() for line in out.splitlines() if line.strip())


def wait_until(predicate, timeout, what, poll=0.2):
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def wait_idle(cluster, timeout, what="the jobs to end"):
    wait_until(lambda: not queue(cluster), timeout, what, poll=0.5)


def sacct(cluster, job_id, *fields, duplicates=False):
    """[{field: value}] of a job's records (array tasks, each requeue with duplicates=True), once
    they are final: slurmctld reports to slurmdbd a moment after squeue forgot the job."""
    fields = ("State",) + tuple(f for f in fields if f != "State") if fields else ("JobID", "State")

    def read(duplicates=False):
        out = cluster.run("sacct", "-X", "-n", "-P", "-j", str(job_id), "-o", ",".join(fields),
                          *(["-D"] if duplicates else []))
        return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]

    end = time.time() + 30  # (the last record of each job: an earlier one of a requeue stays REQUEUED)
    while any(r["State"].split()[0] in registry.ACTIVE for r in read()) and time.time() < end:
        time.sleep(0.5)
    return read(duplicates)


def final_states(cluster, job_id):
    return {r["JobID"]: r["State"].split()[0] for r in sacct(cluster, job_id)}


def job_log(out, job_id):
    """Task 0's stdout and stderr of a (non-array) job in OUT/submitit/<id>/."""
    folder = Path(out) / "submitit" / str(job_id)
    return "".join(p.read_text() for p in sorted(folder.glob(f"{job_id}_0_log.*")))


def pretrain_argv(corpus, out, *extra):
    return ["pretrain", "--config", PRETRAIN_CONFIG, "--output-dir", str(out), "--data-root",
            str(corpus / "imagefolder"), "--epochs", str(EPOCHS), *CLUSTER_ARGS, *extra, "--", *PRETRAIN_OPTS]


def pipeline_argv(corpus, out, seeds=2, pretrain_opts=PRETRAIN_OPTS):
    return ["pipeline", "--pretrain-config", PRETRAIN_CONFIG, "--data-root", str(corpus / "imagefolder"),
            "--epochs", str(EPOCHS), "--voc-config", VOC_CONFIG, "--coco-config", "--seeds", str(seeds),
            "--out", str(out), *CLUSTER_ARGS, "--pretrain-opts", " ".join(pretrain_opts),
            "--transfer-opts", " ".join(DETECTION_OPTS)]


def weights_of(checkpoint):
    import torch

    return torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b):
    import torch

    wa, wb = weights_of(a), weights_of(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"


# ---------------------------------------------------------------- pretraining
@pytest.fixture(scope="module")
def reference_pretrain(slurm_cluster, tiny_corpus, module_tmp):
    """One uninterrupted pretraining job (and its --dry-run first)."""
    out = module_tmp("pretrain") / "run"
    dry = submit(tiny_corpus, *pretrain_argv(tiny_corpus, out, "--dry-run")).stdout
    assert not out.exists() and not queue(slurm_cluster)  # the dry run submitted nothing
    r = submit(tiny_corpus, *pretrain_argv(tiny_corpus, out))
    (job_id,) = submitted(r.stdout).values()
    wait_idle(slurm_cluster, 120, "the pretraining job")
    return out, job_id, dry


def test_pretrain_job_runs_the_dry_run_script(slurm_cluster, reference_pretrain, tiny_corpus):
    out, job_id, dry = reference_pretrain
    assert final_states(slurm_cluster, job_id) == {job_id: "COMPLETED"}, job_log(out, job_id)
    done = json.loads((out / "done.json").read_text())
    assert done["iters"] == EPOCHS * 16 // 8 and done["checkpoint"] == "checkpoint.pth"
    assert weights_of(out / "checkpoint.pth")
    # the script --dry-run printed is the one sbatch received (Submitit's %j stands for the job id)
    script = dry.split("# ---- job pretrain/demo\n", 1)[1].split("\n# runs: ", 1)[0]
    sent = (out / "submitit" / job_id / f"{job_id}_submission.sh").read_text()
    assert script.strip() == sent.strip()
    # the signal the stage must survive is the one Submitit asks Slurm to send (tasks.preemption_signal)
    assert f"#SBATCH --signal={tasks.preemption_signal().name[3:]}@120" in sent
    assert "Caught signal" not in job_log(out, job_id)


def test_preempted_pretraining_resumes_to_the_same_weights(slurm_cluster, reference_pretrain, tiny_corpus,
                                                           tmp_path):
    """Slurm's pre-timeout signal (USR2 to the job's tasks, as --signal=USR2@120 sends it) to the
    running job: Submitit checkpoints and requeues it, it resumes from its checkpoint, bit for bit.
    (With `scontrol requeue` instead the stage runs on for ~5 s before Slurm kills it, so a tiny
    run may finish first: the fault test below requeues that way.)"""
    reference, _, _ = reference_pretrain
    out = tmp_path / "run"
    (job_id,) = submitted(submit(tiny_corpus, *pretrain_argv(tiny_corpus, out)).stdout).values()
    wait_until((out / "checkpoint.pth").exists, 90, "the first checkpoint")
    slurm_cluster.run("scancel", f"--signal={tasks.preemption_signal().name[3:]}", job_id)
    wait_idle(slurm_cluster, 150, "the requeued job")
    log = job_log(out, job_id)
    records = [r["State"].split()[0] for r in sacct(slurm_cluster, job_id, duplicates=True)]
    assert records == ["REQUEUED", "COMPLETED"], log
    assert "this job is preempted" in log and "Requeued job" in log and "resume=True" in log
    resumed = [int(i) for i in re.findall(r"resumed from .* at iteration (\d+)", (out / "log.txt").read_text())]
    total = EPOCHS * 16 // 8
    assert len(resumed) == 1 and 0 < resumed[0] < total, log  # from its checkpoint, not from scratch
    assert json.loads((out / "done.json").read_text())["iters"] == total
    assert_same_weights(out / "checkpoint.pth", reference / "checkpoint.pth")


# ---------------------------------------------------------------- fine-tunes
@pytest.fixture(scope="module")
def weights(reference_pretrain, module_tmp):
    out = module_tmp("weights") / "demo.pkl"
    subprocess.run([sys.executable, "tools/convert_checkpoint.py", str(reference_pretrain[0] / "checkpoint.pth"),
                    str(out)], cwd=REPO, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return out


@pytest.mark.detectron2
def test_transfer_seeds_are_one_job_array(slurm_cluster, tiny_corpus, weights, tmp_path):
    root = tmp_path / "det"
    r = submit(tiny_corpus, "transfer", "--config-file", VOC_CONFIG, "--weights", str(weights), "--backbone",
               "demo", "--output-root", str(root), "--seeds", "2", *CLUSTER_ARGS, "--", *DETECTION_OPTS)
    assert "(2 array tasks)" in r.stdout
    (job_id,) = submitted(r.stdout).values()
    wait_idle(slurm_cluster, 240, "the fine-tunes")
    assert final_states(slurm_cluster, job_id) == {f"{job_id}_0": "COMPLETED", f"{job_id}_1": "COMPLETED"}
    metrics = [json.loads((root / "demo" / Path(VOC_CONFIG).stem / f"seed{s}" / "final_metrics.json").read_text())
               for s in (0, 1)]
    assert [(m["seed"], m["backbone"], m["iter"]) for m in metrics] == [(0, "demo", 2), (1, "demo", 2)]
    assert all(m["results"]["bbox"] for m in metrics)


# ---------------------------------------------------------------- the pipeline
def pipeline_jobs(cluster):
    """{job name: (job id, dependency)} of the jobs queued now (squeue's %E)."""
    out = cluster.run("squeue", "-h", "-r", "-o", "%F|%j|%E")
    return {name: (jid, dep) for jid, name, dep in (ln.split("|") for ln in out.splitlines() if ln.strip())}


@pytest.fixture(scope="module")
def undisturbed_pipeline(slurm_cluster, tiny_corpus, module_tmp):
    """The pipeline submitted while the partition is down (its jobs stay queued), submitted again
    (nothing twice), then run to the end. Returns the folder, both outputs and the queued jobs."""
    out = module_tmp("pipeline") / "out"
    slurm_cluster.run("scontrol", "update", "PartitionName=debug", "State=DOWN")
    try:
        first = submit(tiny_corpus, *pipeline_argv(tiny_corpus, out))
        queued = pipeline_jobs(slurm_cluster)
        again = submit(tiny_corpus, *pipeline_argv(tiny_corpus, out))
        queued_again = pipeline_jobs(slurm_cluster)
    finally:
        slurm_cluster.run("scontrol", "update", "PartitionName=debug", "State=UP")
    wait_idle(slurm_cluster, 300, "the pipeline")
    return out, first.stdout, again.stdout, queued, queued_again


@pytest.mark.detectron2
def test_pipeline_is_an_afterok_chain_and_a_rerun_submits_nothing_twice(slurm_cluster, undisturbed_pipeline,
                                                                         tiny_corpus):
    out, first, again, queued, queued_again = undisturbed_pipeline
    ids = submitted(first)
    assert list(ids) == ["pretrain/demo", "convert/demo", "transfer/demo", "results"]
    assert {name: dep.split("(")[0] for name, (_, dep) in queued.items()} == {
        "pretrain_demo": "", "convert_demo": f"afterok:{ids['pretrain/demo']}",
        "transfer_demo": f"afterok:{ids['convert/demo']}", "results": f"afterany:{ids['transfer/demo']}_*"}
    # the same command while they are queued (sacct says PENDING): waited for, nothing submitted
    assert submitted(again) == {} and "nothing to submit" in again
    assert again.count("waited for, not submitted again") == 5
    assert queued_again == queued
    # every job ran once, each after the one it waits for
    for name, job_id in ids.items():
        assert set(final_states(slurm_cluster, job_id).values()) == {"COMPLETED"}, name
    spans = {name: sacct(slurm_cluster, jid, "JobID", "Start", "End") for name, jid in ids.items()}
    order = list(ids)
    for before, after in zip(order, order[1:]):
        assert max(r["End"] for r in spans[before]) <= min(r["Start"] for r in spans[after])
    assert (out / "weights" / "demo.pkl").is_file()
    runs = sorted((out / "transfer" / "demo").glob("*/seed*/final_metrics.json"))
    assert [json.loads(p.read_text())["seed"] for p in runs] == [0, 1]
    table = (out / "results.md").read_text()
    assert "| demo |" in table and "(n=2)" in table and "Incomplete runs: none" in table
    # again once everything is complete: nothing to do
    assert "nothing to do" in submit(tiny_corpus, *pipeline_argv(tiny_corpus, out)).stdout


def test_rerun_while_queued_without_accounting_asks_squeue(slurm_cluster, tiny_corpus, tmp_path):
    """slurmctld without slurmdbd: sacct knows nothing, the launcher asks squeue."""
    out = tmp_path / "run"
    slurm_cluster.restart_controller(accounting=False)
    try:
        r = subprocess.run(["sacct", "-X", "-n"], env=slurm_cluster.env, capture_output=True, text=True)
        assert r.returncode != 0 and "accounting storage is disabled" in r.stderr.lower()
        slurm_cluster.run("scontrol", "update", "PartitionName=debug", "State=DOWN")
        (job_id,) = submitted(submit(tiny_corpus, *pretrain_argv(tiny_corpus, out)).stdout).values()
        assert registry.state({"cluster": "slurm", "job_id": job_id, "folder": str(out / "submitit" / job_id)}) \
            == "PENDING"
        again = submit(tiny_corpus, *pretrain_argv(tiny_corpus, out)).stdout
        assert submitted(again) == {} and f"PENDING in job {job_id}: waited for" in again
        assert list(queue(slurm_cluster)) == [job_id]
        slurm_cluster.run("scancel", job_id)
        wait_idle(slurm_cluster, 30)
        # squeue still shows it CANCELLED (or has forgotten it): it ended, so it is submitted again
        (new_id,) = submitted(submit(tiny_corpus, *pretrain_argv(tiny_corpus, out)).stdout).values()
        assert new_id != job_id and list(queue(slurm_cluster)) == [new_id]
    finally:
        slurm_cluster.cancel_all()
        slurm_cluster.run("scontrol", "update", "PartitionName=debug", "State=UP", check=False)
        slurm_cluster.restart_controller(accounting=True)


@pytest.mark.detectron2
def test_failed_stage_cancels_its_dependants_the_table_lists_it_and_a_fixed_rerun_completes(
        slurm_cluster, tiny_corpus, tmp_path):
    out = tmp_path / "out"
    diverging = [*PRETRAIN_OPTS, "optim.lr=inf", "log.every_iters=1"]  # non-finite loss at step 2
    ids = submitted(submit(tiny_corpus, *pipeline_argv(tiny_corpus, out, seeds=1, pretrain_opts=diverging)).stdout)
    wait_idle(slurm_cluster, 120, "the failing pipeline")
    states = {name: set(final_states(slurm_cluster, jid).values()) for name, jid in ids.items()}
    assert states == {"pretrain/demo": {"FAILED"}, "convert/demo": {"CANCELLED"},
                      "transfer/demo": {"CANCELLED"}, "results": {"COMPLETED"}}
    assert "nan" in job_log(out, ids["pretrain/demo"]).lower()  # the loss, or the checkpoint it refuses
    for name in ("convert/demo", "transfer/demo"):  # never started
        assert sacct(slurm_cluster, ids[name], "Start")[0]["Start"] in ("None", "Unknown")
    assert not (out / "weights").exists() and not (out / "transfer").exists()
    table = (out / "results.md").read_text()
    incomplete = table.split("Incomplete runs", 1)[1]
    assert str(out / "pretrain" / "demo") in incomplete  # the failed pretraining, listed

    # the fix: a finite learning rate, and the diverged run (its checkpoint is NaN) started over
    shutil.rmtree(out / "pretrain" / "demo")
    ids = submitted(submit(tiny_corpus, *pipeline_argv(tiny_corpus, out, seeds=1)).stdout)
    assert list(ids) == ["pretrain/demo", "convert/demo", "transfer/demo", "results"]
    wait_idle(slurm_cluster, 240, "the fixed pipeline")
    assert all(set(final_states(slurm_cluster, jid).values()) == {"COMPLETED"} for jid in ids.values())
    table = (out / "results.md").read_text()
    assert "| demo |" in table and "Incomplete runs: none" in table


# ---------------------------------------------------------------- two nodes
def test_two_node_pretraining_resumes_after_the_time_limit_signal(slurm_cluster, tiny_corpus, tmp_path):
    """2 nodes x 1 task: DDP at world size 2 over gloo; rank 0 writes; Slurm's pre-timeout signal
    (USR2 to every task, as --signal=USR2@120 sends it) checkpoints, requeues and resumes."""
    out = tmp_path / "run"
    argv = pretrain_argv(tiny_corpus, out, "--nodes", "2")
    (job_id,) = submitted(submit(tiny_corpus, *argv).stdout).values()
    wait_until((out / "checkpoint.pth").exists, 120, "the first checkpoint")
    slurm_cluster.run("scancel", f"--signal={tasks.preemption_signal().name[3:]}", job_id)
    wait_idle(slurm_cluster, 180, "the requeued job")
    log = job_log(out, job_id)
    assert final_states(slurm_cluster, job_id) == {job_id: "COMPLETED"}, log
    assert "Requeued job" in log and "resume=True" in log  # Submitit's checkpoint(), then the requeue
    assert set(sacct(slurm_cluster, job_id, "NodeList")[0]["NodeList"].split(",")) == set(slurm_cluster.nodes)
    text = (out / "log.txt").read_text()
    assert text.count("batch 8 on 2 x cpu") == 2  # world size 2, in both attempts
    resumed = [int(i) for i in re.findall(r"resumed from .* at iteration (\d+)", text)]
    total = EPOCHS * 16 // 8
    assert len(resumed) == 1 and 0 < resumed[0] < total
    assert json.loads((out / "done.json").read_text())["iters"] == total
    # only rank 0 writes: one record per logged step of each attempt, not one per rank
    steps = [r["iter"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "train"]
    after = [s for s in steps if s > resumed[0]]
    assert after == sorted(set(after)) and after[-1] == total
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("log")) == ["log.txt"]


@pytest.mark.detectron2
def test_two_machine_detectron2_fine_tune(slurm_cluster, tiny_corpus, weights, tmp_path):
    root = tmp_path / "det"
    r = submit(tiny_corpus, "transfer", "--config-file", VOC_CONFIG, "--weights", str(weights), "--backbone",
               "demo", "--output-root", str(root), "--seeds", "1", "--nodes", "2", *CLUSTER_ARGS,
               "--", *DETECTION_OPTS)
    (job_id,) = submitted(r.stdout).values()
    wait_idle(slurm_cluster, 240, "the 2-machine fine-tune")
    log = job_log(root, job_id)
    assert final_states(slurm_cluster, job_id) == {job_id: "COMPLETED"}, log
    flags = re.search(r"--num-machines 2 --machine-rank 0 --dist-url tcp://(\S+):(\d+)", log)
    assert flags and flags.group(1) in (slurm_cluster.nodes) and int(flags.group(2)) == tasks.rendezvous_port(job_id)
    run = root / "demo" / Path(VOC_CONFIG).stem / "seed0"
    assert "World size: 2" in (run / "log.txt").read_text()
    assert (run / "log.txt.rank1").is_file()  # the second machine's process, rank 1
    assert json.loads((run / "final_metrics.json").read_text())["iter"] == 2


# ---------------------------------------------------------------- faults
FAULT_SEED = int(os.environ.get("SLURM_FAULT_SEED", "15"))
# the stage kinds a fault may hit, in the pipeline's order, and how far into such a stage's run it
# may land, in s (each runs longer); not the table's 0.3 s at the very end, which polling misses
ORDER = ("pretrain", "convert", "transfer", "results")
INTO = (4.0, 0.5, 4.0)


def stage_of(argv):
    """The pipeline stage a command line runs (None: not a stage's process)."""
    if "pretrain" in argv and "-m" in argv:
        return "pretrain/demo"
    if any(a.endswith("convert_checkpoint.py") for a in argv):
        return "convert/demo"
    if any(a.endswith("train_net.py") for a in argv):
        return f"transfer/demo/{Path(VOC_CONFIG).stem}/seed{argv[argv.index('SEED') + 1]}"
    if any(a.endswith("results_table.py") for a in argv):
        return "results"
    return None


def running_stages(out):
    """{stage: ([pids], Slurm job id)} of the stage processes running for the pipeline under `out`
    (not Submitit's own task process, which survives a killed stage)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
            environ = dict(kv.decode(errors="replace").partition("=")[::2]
                           for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if kv)
        except OSError:
            continue
        stage = stage_of(argv) if argv and str(out) in " ".join(argv) else None
        if stage is None or "submitit.core._submit" in argv:
            continue
        job = (f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
               if "SLURM_ARRAY_JOB_ID" in environ else environ.get("SLURM_JOB_ID"))
        found.setdefault(stage, ([], job))[0].append(int(pid))
    return found


def done_files(out):
    files = [out / "pretrain/demo/done.json", out / "weights/demo.pkl", out / "results.md"]
    files += [out / f"transfer/demo/{Path(VOC_CONFIG).stem}/seed{s}/final_metrics.json" for s in (0, 1)]
    return files


@pytest.mark.detectron2
def test_pipeline_survives_kills_and_a_requeue_with_the_undisturbed_table(slurm_cluster, tiny_corpus,
                                                                           undisturbed_pipeline, tmp_path):
    """Three kill -9 of the running stage's processes and one `scontrol requeue` of a running job,
    at random moments (a random stage, a random time into its run; seed SLURM_FAULT_SEED): the
    pipeline finishes, no finished stage runs again, and the table is the undisturbed run's, digit
    for digit."""
    rng = random.Random(FAULT_SEED)
    replay = f"replay with SLURM_FAULT_SEED={FAULT_SEED}"
    out = tmp_path / "out"
    faults = ["kill", "kill", "kill", "requeue"]
    rng.shuffle(faults)
    written = {}  # done file -> (inode, mtime) when first seen: a stage run again would replace it

    def watch():
        for f in done_files(out):
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            written.setdefault(f, (st.st_ino, st.st_mtime_ns))

    def running_from(target):  # the running stages of the target's kind or a later one
        return {s: v for s, v in running_stages(out).items() if ORDER.index(s.split("/")[0]) >= target}

    ids = submitted(submit(tiny_corpus, *pipeline_argv(tiny_corpus, out)).stdout)
    hits = []  # (fault, stage, job)
    # each fault: a stage kind drawn at random (in pipeline order), then a random moment into its run
    for fault, target in zip(faults, sorted(rng.choices(range(len(INTO)), k=len(faults)))):
        moment = rng.uniform(0.0, INTO[target])
        while True:
            while not (running := running_from(target)) and queue(slurm_cluster):
                watch()
                time.sleep(0.05)
            end = time.time() + moment
            while time.time() < end:
                watch()
                time.sleep(0.05)
            if (running := running_from(target)) or not queue(slurm_cluster):
                break  # else it ended meanwhile: the next stage's run
        if not running:
            break
        stage = rng.choice(sorted(running))
        pids, job = running[stage]
        if fault == "kill":
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        else:
            slurm_cluster.run("scontrol", "requeue", job)
        hits.append((fault, stage, job))
    end = time.time() + 400
    while queue(slurm_cluster):
        assert time.time() < end, f"the pipeline did not finish; faults {hits}; {replay}"
        watch()
        time.sleep(0.2)
    watch()
    print(f"faults (SLURM_FAULT_SEED={FAULT_SEED}): {hits}")
    assert len(hits) == 4, f"the pipeline ended before every fault: {hits}; {replay}"
    for name, job_id in ids.items():
        assert set(final_states(slurm_cluster, job_id).values()) == {"COMPLETED"}, f"{name}; {hits}; {replay}"
    # nothing that had finished ran again: each done file is the one first written
    for f, first in written.items():
        st = f.stat()
        assert (st.st_ino, st.st_mtime_ns) == first, f"{f} was written again; {hits}; {replay}"
    # each stage started once, plus once per fault that hit it while it ran
    logs = "".join(p.read_text() for p in (out / "submitit").glob("*/*_0_log.out"))
    for f in done_files(out):
        assert f.exists(), f"{f}; {hits}; {replay}"
    launches = {}
    for name, cmd in re.findall(r"^\[(\S+)\] (\S*python\S* .*)$", logs, flags=re.M):
        launches[name] = launches.get(name, 0) + 1
    for name, n in launches.items():
        assert n <= 1 + sum(s == name for _, s, _ in hits), f"{name} started {n} times; {hits}; {replay}"
    assert set(launches) == {"pretrain/demo", "convert/demo", "results",
                             *(f"transfer/demo/{Path(VOC_CONFIG).stem}/seed{s}" for s in (0, 1))}
    assert any(r["State"].startswith("REQUEUED") for jid in ids.values()
               for r in sacct(slurm_cluster, jid.split("_")[0], duplicates=True)), f"{hits}; {replay}"
    # deterministic mode: the same table as the undisturbed pipeline's
    reference = undisturbed_pipeline[0]
    assert (out / "results.md").read_text() == (reference / "results.md").read_text(), f"{hits}; {replay}"


def test_checkpoint_evaluations_are_submitted_while_the_pretraining_runs(slurm_cluster, tiny_corpus, tmp_path):
    """--eval-every: the watcher job submits each snapshot's probe from inside its own job (sbatch in
    a job) as soon as the snapshot exists, before the pretraining ends; one evaluation per snapshot."""
    out = tmp_path / "pipe"
    r = submit(tiny_corpus, "pipeline", "--pretrain-config", PRETRAIN_CONFIG, "--data-root",
               str(tiny_corpus / "imagefolder"), "--epochs", str(EPOCHS), "--voc-config", "--coco-config",
               "--out", str(out), *CLUSTER_ARGS, "--pretrain-opts", " ".join(PRETRAIN_OPTS),
               "--eval-every", "3", "--eval-probe", "cifar", "--eval-poll-s", "0.5",
               "--probe-opts", "--epochs 1 --batch-size 8 --image-size 32 --num-workers 0 --device cpu")
    ids = submitted(r.stdout)
    wait_idle(slurm_cluster, 300, "the pretraining, its watcher and the evaluations")
    jobs = json.loads((out / "submitit" / "jobs.json").read_text())
    evals = sorted(name for name in jobs if name.startswith("eval/"))
    assert evals == ["eval/demo/epoch0003/cifar", "eval/demo/epoch0006/cifar"]
    times = {name: sacct(slurm_cluster, jobs[name]["job_id"], "Submit", "End")[0] for name in [*evals, "pretrain/demo"]}
    assert all(t["State"] == "COMPLETED" for t in times.values()), times
    assert final_states(slurm_cluster, ids["watch/demo"]) == {ids["watch/demo"]: "COMPLETED"}
    # epoch 3's probe was submitted while the pretraining still ran (ISO times compare as strings)
    assert times["eval/demo/epoch0003/cifar"]["Submit"] < times["pretrain/demo"]["End"], times
    probes = sorted(out.glob("checkpoint_evals/demo/epoch*/linear_cifar/linear_metrics.json"))
    assert [json.loads(p.read_text())["checkpoint"].rsplit("/", 1)[1] for p in probes] == [
        "checkpoint_0003.pth", "checkpoint_0006.pth"]
