"""OUT/submitit/jobs.json: which job runs each stage, so that running `submit.py` again while its
jobs are still queued or running waits for them instead of submitting the same stages twice."""
import json
import os
import subprocess
from pathlib import Path

import submitit
from submitit.core.utils import JobPaths

from suite import contract

# Slurm states of a job that has not ended (sacct's names); anything else ended or is unknown
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}


class RegistryError(RuntimeError):
    """jobs.json cannot be read: the message names the file and the fix."""


def load(path):
    """{stage name: {"job_id", "cluster", "folder"}}; {} when nothing was submitted yet."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise RegistryError(f"{path}: unreadable job registry ({e}); delete it if none of its jobs still "
                         "runs") from None


def record(path, jobs):
    """Merge {stage name: entry} into the registry (written atomically)."""
    contract.write_json(path, {**load(path), **jobs}, sort_keys=True, mkdir=True)


def entry_of(job, cluster):
    return {"job_id": str(job.job_id), "cluster": cluster, "folder": str(job.paths.folder)}


def state(entry):
    """The job's state now: sacct's on Slurm (through Submitit); RUNNING, FINISHED or INTERRUPTED for
    a job on this machine (its process and its result file)."""
    if entry["cluster"] == "slurm":
        info = submitit.SlurmJob(entry["folder"], entry["job_id"]).get_info(mode="force")  # one sacct call
        if info.get("State"):
            return info["State"].split(" ")[0]  # "CANCELLED by 1"
        return _squeue_state(entry["job_id"])  # no accounting, or sacct failed
    if entry["cluster"] == "local":
        if JobPaths(entry["folder"], job_id=entry["job_id"], task_id=0).result_pickle.exists():
            return "FINISHED"
        try:
            os.kill(int(entry["job_id"]), 0)
        except ProcessLookupError:
            return "INTERRUPTED"
        except PermissionError:
            pass  # exists, another user's
        return "RUNNING"
    return "FINISHED"  # a debug job ran inside the submitting process


def _squeue_state(job_id):
    """The state squeue shows, ENDED for a job the controller no longer holds, UNKNOWN if it fails."""
    try:
        r = subprocess.run(["squeue", "-h", "-o", "%T", "-j", job_id], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "UNKNOWN"
    if r.returncode == 0:
        return (r.stdout.split() or ["ENDED"])[0]
    return "ENDED" if "Invalid job id" in r.stderr else "UNKNOWN"


def in_flight(path, names):
    """{stage name: (job id, state)} for the stages among `names` whose recorded job has not ended."""
    entries = load(path)
    states = {name: (entries[name]["job_id"], state(entries[name])) for name in names if name in entries}
    for name, (job_id, st) in states.items():
        if st == "UNKNOWN":  # submitting again could run it twice; waiting on it could wait forever
            raise RegistryError(f"[{name}] neither sacct nor squeue tells whether its job {job_id} still "
                                f"runs; if it does not, remove its entry from {path} and run this again")
    return {name: js for name, js in states.items() if js[1] in ACTIVE}
