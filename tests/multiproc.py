"""Bounded multi-process runs for the tests (gloo ranks, torchrun): every wait has a deadline, a
rank that fails or hangs takes the others down with it (each in its own session, so whatever it
started goes too), and the failure message holds what every process printed."""
import os
import signal
import subprocess
import tempfile
import time


class ProcessesFailed(AssertionError):
    """A process exited non-zero or outlived the deadline; str() has every process's output."""


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the process and everything it started
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # unkillable (D state): report it, do not hang on it
            pass


def run_processes(commands, timeout, **popen_kwargs):
    """Run `commands` (argv lists) at once; returns [(returncode, output)] when all exit 0 within
    `timeout` seconds, else raises ProcessesFailed naming each process's exit code and output."""
    logs = [tempfile.TemporaryFile(mode="w+") for _ in commands]
    procs = []
    try:
        for cmd, log in zip(commands, logs):
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True, **popen_kwargs))
        deadline, why = time.monotonic() + timeout, ""
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                why = "a process failed; the others were killed"  # they would wait for it forever
                break
            if time.monotonic() > deadline:
                why = f"timed out after {timeout} s; killed"
                break
            time.sleep(0.05)
    finally:
        _kill(procs)  # nothing outlives the test, whatever happened
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    codes = [p.returncode for p in procs]
    if why or any(c != 0 for c in codes):
        report = "\n".join(f"--- process {i} (exit {c}): {' '.join(map(str, cmd))[:200]}\n{out[-3000:]}"
                           for i, (c, cmd, out) in enumerate(zip(codes, commands, outputs)))
        raise ProcessesFailed(f"{why or 'a process failed'}\n{report}")
    return list(zip(codes, outputs))
