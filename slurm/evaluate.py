"""Checkpoint evaluation while pretraining runs (VISSL's benchmark suite scheduler): one CPU job per
pretraining waits for each snapshot its evaluation stages need and submits them as it appears, so
that no evaluation waits for, or holds up, the pretraining's job."""
import dataclasses
import os
import time
from pathlib import Path

import submitit

from slurm import pipeline, registry
from suite import contract


class CheckpointWatcher:
    """Submitted by slurm/submit.py for the `needs` stages of one pretraining (pipeline.watcher_of).
    For each snapshot in order: wait until the file exists, then launch its stages (submit.launch:
    complete ones skipped, queued ones waited for). Fails (one line) when the pretraining ended
    without writing a snapshot. Requeued on timeout, it submits nothing twice (jobs.json)."""

    def __init__(self, args, stages, poll_s=60.0):
        self.args, self.stages, self.poll_s = args, list(stages), poll_s

    def __call__(self):
        from slurm import submit  # (submit imports this module)

        groups = {}
        for s in self.stages:
            groups.setdefault(s.needs, []).append(dataclasses.replace(s, needs=""))
        submitted = []
        for snapshot, group in groups.items():
            self.wait_for(Path(snapshot), group[0].name)
            conf = os.environ.get("SLURM_CONF")  # where sbatch finds the cluster: not the job's own setting
            with submitit.helpers.clean_env():  # a job submitted from a job must not inherit its SLURM_* settings
                if conf:
                    os.environ["SLURM_CONF"] = conf
                submitted += [str(j.job_id) for j in submit.launch(self.args, group)]
        return submitted

    def wait_for(self, snapshot, stage):
        while not snapshot.is_file():
            if self.pretraining_ended(snapshot.parent) and not snapshot.is_file():
                raise pipeline.PipelineError(
                    f"[{stage}] reads {snapshot}, which its pretraining ended without writing (it keeps a "
                    "snapshot every checkpoint.save_every_epochs epochs)")
            time.sleep(self.poll_s)

    def pretraining_ended(self, pretrain_dir):
        """Its done.json exists, or no job recorded in jobs.json still runs it."""
        if contract.done_file("pretrain", pretrain_dir).is_file():
            return True
        from slurm import submit

        where = contract.pretrain_run(pretrain_dir)
        name = f"pretrain/{contract.unit(where.backbone, where.seed)}"
        return not registry.in_flight(contract.jobs_file(submit.output_of(self.args)), [name])

    def checkpoint(self, *args, **kwargs):
        return submitit.helpers.DelayedSubmission(type(self)(self.args, self.stages, self.poll_s))
