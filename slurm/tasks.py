"""The callable a Submitit job runs (dino/mae's run_with_submitit pattern): stages in order, with the
distributed set-up from submitit.JobEnvironment(); on timeout or preemption it requeues and resumes."""
import dataclasses
import os
import signal
import zlib

import submitit

from slurm.pipeline import StageKilled, run_sequential, run_stage

KILLED_RESTARTS = 3  # per stage and job: a stage killed by a signal more often fails its job


def rendezvous_port(job_id):
    """A port every node of a job derives alike; distinct jobs (array tasks too) rarely collide."""
    return 20000 + zlib.crc32(str(job_id).encode()) % 20000


def pretrain_env(job):
    """torch.distributed's env:// variables for `python -m pretrain`: one process per GPU."""
    return {"RANK": str(job.global_rank), "WORLD_SIZE": str(job.num_tasks), "LOCAL_RANK": str(job.local_rank),
            "MASTER_ADDR": job.hostnames[0], "MASTER_PORT": str(rendezvous_port(job.job_id))}


def transfer_flags(job):
    """Detectron2's launch() spawns the per-GPU processes of a node itself (one task per node)."""
    if job.num_nodes == 1:
        return []  # dist_url "auto": launch() picks a free local port
    return ["--num-machines", str(job.num_nodes), "--machine-rank", str(job.node),
            "--dist-url", f"tcp://{job.hostnames[0]}:{rendezvous_port(job.job_id)}"]


def with_torchrun(stage, nproc):
    """One task holding several GPUs (a local job): torchrun starts one pretrain process each."""
    python, *rest = stage.argv
    return dataclasses.replace(stage, argv=(python, "-m", "torch.distributed.run", "--standalone",
                                            f"--nproc-per-node={nproc}", *rest))


def preemption_signal():
    """The signal on which Submitit checkpoints and requeues a job (--signal in its sbatch script):
    USR2 unless $SUBMITIT_PREEMPT_SIGNAL names another. Submitit's JobEnvironment.USR_SIG holds its
    name (a public attribute, read here alone); tests/test_slurm_cluster.py fails if it changes."""
    return signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]


def visible_gpus():
    return len([d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()])


class StageJob:
    """Runs `stages` (slurm.pipeline.Stage) in order in each task of a Submitit job, skipping the
    complete ones. Submitit calls checkpoint() on timeout/preemption and requeues what it returns."""

    def __init__(self, stages, env=None, resume=False):
        self.stages = list(stages)
        self.env = dict(env or {})
        self.resume = resume

    def __call__(self):
        job = submitit.JobEnvironment()
        log = (lambda msg: print(msg, flush=True)) if job.global_rank == 0 else (lambda msg: None)
        log(f"{job}: {len(self.stages)} stage(s), resume={self.resume}")
        ran = []
        for stage in self.stages:
            if stage.kind == "pretrain" and job.num_tasks == 1 and visible_gpus() > 1:
                stage = with_torchrun(stage, visible_gpus())
            env = {**self.env, **(pretrain_env(job) if stage.kind == "pretrain" else {})}
            flags = transfer_flags(job) if stage.kind == "transfer" else []
            for restart in range(KILLED_RESTARTS + 1):
                try:
                    ran += self.run(stage, log, env, flags, self.resume or restart > 0, job.global_rank == 0)
                    break
                except StageKilled as e:
                    # a killed process (OOM killer, kill -9) resumes from its checkpoint; in a job of
                    # several tasks the others cannot wait for it: the job fails
                    if job.num_tasks > 1 or restart == KILLED_RESTARTS:
                        raise
                    log(f"{e}; restarting it ({restart + 1}/{KILLED_RESTARTS})")
        return ran

    def run(self, stage, log, env, flags, resume, check_done):
        """The stage, skipped if complete; but a `refresh` stage (the table) was submitted because a
        run it reads runs again: it runs even though its file exists from an earlier pipeline."""
        if stage.refresh:
            run_stage(stage, flags, resume, env, log, check_done, self.job_signals())
            return [stage.name]
        return run_sequential([stage], log, env, lambda s: flags, resume, check_done, self.job_signals())

    @staticmethod
    def job_signals():
        """Slurm's preemption SIGTERM and Submitit's requeue signal (USR2) reach every process of a
        job step; as in dino's in-process pattern only this task reacts (checkpoint, requeue, then
        it kills the stage); a stage dying first would fail the job instead of requeueing it."""
        return (signal.SIGTERM, preemption_signal())

    def checkpoint(self, *args, **kwargs):
        # pretrain resumes from its output_dir by itself; transfer stages get Detectron2's --resume
        return submitit.helpers.DelayedSubmission(type(self)(self.stages, self.env, resume=True))
