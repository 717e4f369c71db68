"""A real Slurm cluster on this machine, for the tests and by hand (`python -m slurm.testcluster up`,
then `... down DIR`): installs Debian's packages when missing, stops only the daemons it started."""
# Each daemon runs in the foreground under one fresh state directory: munged (its own key), MariaDB +
# slurmdbd (accounting on, so `sacct` answers), slurmctld and two slurmd that emulate two nodes of
# this host (`slurmd -N <name>`: this host's name, then `localhost`). Jobs run as root; nothing needs
# systemd or cgroups (proctrack/linuxproc, task/none). Standard library only: it runs before
# anything else is installed.
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "slurmdbd", "munge", "mariadb-server")
PROGRAMS = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "munged", "mariadbd")  # one per package
CLUSTER = "testcluster"
SECOND_NODE = "localhost"  # resolves everywhere; the first node is this host's own name
HOSTS = Path("/etc/hosts")


class Unavailable(RuntimeError):
    """Slurm cannot be installed here (not root, no apt-get): the one-line reason to skip."""


class ClusterError(RuntimeError):
    """A daemon did not come up: the message names it and its log."""


def missing_programs():
    return [p for p in PROGRAMS if not shutil.which(p, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]


def install(log=print):
    """apt-get install the packages when a program is missing; Unavailable where that cannot be done."""
    missing = missing_programs()
    if not missing:
        return False
    if os.geteuid() != 0:
        raise Unavailable(f"Slurm not installed ({', '.join(missing)} missing) and not root: "
                          f"apt-get install {' '.join(PACKAGES)}")
    if not shutil.which("apt-get"):
        raise Unavailable(f"Slurm not installed ({', '.join(missing)} missing) and no apt-get")
    log(f"testcluster: installing {' '.join(PACKAGES)} (missing: {', '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # without this, Debian's maintainer scripts start munge and MariaDB as system services
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:
        policy.write_text("#!/bin/sh\n# testcluster: no service starts during apt-get install\nexit 101\n")
        policy.chmod(0o755)
    try:
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:  # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        if added_policy:
            policy.unlink()
    if r.returncode != 0 or missing_programs():
        tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {' | '.join(tail)}")
    return True


def free_ports(n, start):
    """n TCP ports free on every interface, from `start` up (Slurm's defaults where they are free)."""
    ports, port = [], start
    while len(ports) < n:
        with socket.socket() as s:
            try:
                s.bind(("", port))
                ports.append(port)
            except OSError:
                pass
        port += 1
    return ports


def resolves(name):
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


class Cluster:
    """One cluster under `root` (a fresh directory). `up()` starts it, `down()` stops what it started;
    `env` is the environment for clients (SLURM_CONF)."""

    def __init__(self, root, cpus_per_node=4, log=print):
        self.root = Path(root).resolve()
        self.log = log
        self.host = socket.gethostname().split(".")[0]
        self.nodes = [self.host, SECOND_NODE]
        self.cpus = cpus_per_node
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.procs = {}  # name -> Popen (this process's children, reaped on stop)

    # ------------------------------------------------------------------ files
    @property
    def env(self):
        return dict(os.environ, SLURM_CONF=str(self.conf))

    @property
    def pid_file(self):
        return self.root / "pids.json"

    def _write_config(self, accounting=True):
        p = self.ports
        d = self.root
        conf = [
            f"ClusterName={CLUSTER}",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={p['slurmctld']}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            # a requeued job restarts once its node's credential expired (default 120 s)
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"StateSaveLocation={d}/state/ctld",
            f"SlurmdSpoolDir={d}/state/%n",
            f"SlurmctldPidFile={d}/run/slurmctld.pid", f"SlurmdPidFile={d}/run/slurmd.%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log", f"SlurmdLogFile={d}/log/slurmd.%n.log",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=1,bf_interval=1",
            "SlurmdParameters=config_overrides",  # the CPUs below, whatever this machine has
            "ReturnToService=2", "KillWait=3", "MinJobAge=60", "InactiveLimit=0",
            "SlurmctldTimeout=30", "SlurmdTimeout=60", "MessageTimeout=20",
        ]
        if accounting:
            conf += ["AccountingStorageType=accounting_storage/slurmdbd",
                     "AccountingStorageHost=127.0.0.1", f"AccountingStoragePort={p['slurmdbd']}",
                     f"AccountingStoragePass={self.munge_socket}"]  # else slurmctld fails to authenticate
        else:
            conf += ["AccountingStorageType=accounting_storage/none"]
        conf += [f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={p['slurmd' + str(i)]} "
                 f"CPUs={self.cpus} State=UNKNOWN" for i, n in enumerate(self.nodes)]
        conf += ["PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"]
        self.conf.write_text("\n".join(conf) + "\n")
        dbd = self.conf.with_name("slurmdbd.conf")
        dbd.write_text("\n".join([
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}",
            "DbdHost=localhost", "DbdAddr=127.0.0.1", f"DbdPort={p['slurmdbd']}", "SlurmUser=root",
            f"PidFile={d}/run/slurmdbd.pid", f"LogFile={d}/log/slurmdbd.log", "DebugLevel=info",
            "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1",
            f"StoragePort={p['mariadb']}", "StorageUser=root", f"StorageLoc={CLUSTER}_acct_db",
        ]) + "\n")
        dbd.chmod(0o600)  # slurmdbd refuses a readable one (it may hold a password)

    # ------------------------------------------------------------------ processes
    def _start(self, name, argv):
        out = open(self.root / "log" / f"{name}.out", "ab")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.env, cwd=self.root, start_new_session=True)
        out.close()
        self.procs[name] = proc
        pids = self._pids()
        pids[name] = proc.pid
        self.pid_file.write_text(json.dumps(pids, indent=1))
        return proc

    def _pids(self):
        try:
            return json.loads(self.pid_file.read_text())
        except (OSError, ValueError):
            return {}

    def _wait(self, what, ready, timeout, name=None):
        end = time.time() + timeout
        while not ready():
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise ClusterError(f"{name} exited with code {proc.returncode} while starting: "
                                   f"see {self.root}/log/")
            if time.time() > end:
                raise ClusterError(f"{what}: not ready after {timeout} s: see {self.root}/log/")
            time.sleep(0.1)

    @staticmethod
    def _listening(port):
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def run(self, *argv, check=True, timeout=60):
        """A Slurm client command against this cluster; its stdout."""
        r = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise ClusterError(f"{' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def node_states(self):
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True,
                           text=True, timeout=30)
        return dict(line.split() for line in r.stdout.splitlines() if line.strip())

    def _resolve_nodes(self):
        """Node names must resolve (a job's first node is MASTER_ADDR / Detectron2's --dist-url):
        append the missing ones to /etc/hosts as 127.0.0.1, marked to be removed by down()."""
        missing = [n for n in self.nodes if not resolves(n)]
        if missing:
            with HOSTS.open("a") as f:
                f.write(f"127.0.0.1 {' '.join(missing)}  {self._hosts_mark}\n")
            self.log(f"testcluster: added 127.0.0.1 {' '.join(missing)} to {HOSTS}")

    @property
    def _hosts_mark(self):
        return f"# slurm testcluster {self.root}"

    def _unresolve_nodes(self):
        try:
            lines = HOSTS.read_text().splitlines(keepends=True)
        except OSError:
            return
        kept = [ln for ln in lines if not ln.rstrip().endswith(self._hosts_mark)]
        if kept != lines:
            HOSTS.write_text("".join(kept))

    def up(self, timeout=90):
        t0 = time.time()
        self._resolve_nodes()
        for sub in ("etc", "munge", "log", "run", "state/ctld", "db", *(f"state/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket below a directory that is not searchable by all (mkdtemp: 0700)
        self.root.chmod(0o755)
        self.ports = dict(zip(("slurmctld", "slurmd0", "slurmd1", "slurmdbd"), free_ports(4, 6817)))
        self.ports["mariadb"] = free_ports(1, 3307)[0]
        (self.root / "ports.json").write_text(json.dumps(self.ports))
        self._write_config(accounting=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        d = self.root
        self._start("munged", ["munged", "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={d}/run/munged.pid", f"--log-file={d}/log/munged.log",
                               f"--seed-file={d}/munge/munged.seed"])
        # MariaDB for slurmdbd: a throw-away database (no grant tables, no durability needed)
        self._start("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={d}/db", "--user=root",
                                 f"--socket={d}/run/mariadb.sock", f"--port={self.ports['mariadb']}",
                                 "--bind-address=127.0.0.1", f"--pid-file={d}/run/mariadb.pid",
                                 f"--log-error={d}/log/mariadb.log", "--skip-grant-tables",
                                 "--skip-name-resolve", "--skip-log-bin", "--innodb-buffer-pool-size=64M",
                                 "--innodb-flush-log-at-trx-commit=0", "--innodb-doublewrite=0"])
        self._wait("munged", self.munge_socket.exists, 20, "munged")
        self._wait("MariaDB", lambda: self._listening(self.ports["mariadb"]), 60, "mariadbd")
        self._start("slurmdbd", ["slurmdbd", "-D"])
        self._wait("slurmdbd", lambda: self._listening(self.ports["slurmdbd"]), 60, "slurmdbd")
        self._start_controller()
        for i, node in enumerate(self.nodes):
            self._start(f"slurmd.{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait("the nodes (sinfo: idle)", lambda: set(self.node_states().values()) == {"idle"}
                   and len(self.node_states()) == len(self.nodes), timeout)
        self.log(f"testcluster: up in {time.time() - t0:.1f} s ({', '.join(self.nodes)}; SLURM_CONF={self.conf})")

    def _start_controller(self):
        self._start("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._wait("slurmctld", lambda: "UP" in subprocess.run(
            ["scontrol", "ping"], env=self.env, capture_output=True, text=True, timeout=30).stdout, 60, "slurmctld")

    def restart_controller(self, accounting):
        """slurmctld again with accounting on or off (slurm.conf rewritten); jobs keep their state."""
        self._stop("slurmctld")
        self._write_config(accounting)
        self._start_controller()

    def cancel_all(self, timeout=60):
        """scancel every job and wait until none is left: stopping slurmd does not end its jobs."""
        ids = self.run("squeue", "-h", "-o", "%A", check=False).split()
        if ids:
            self.run("scancel", *ids, check=False)
        end = time.time() + timeout
        while self.run("squeue", "-h", "-o", "%A", check=False).split() and time.time() < end:
            time.sleep(0.5)

    def _stop(self, name, timeout=20):
        pid = self._pids().get(name)
        if pid is None or not _ours(pid, self.root):
            return
        with_kill = False
        try:
            os.kill(pid, signal.SIGTERM)
            end = time.time() + timeout
            while _alive(pid, self.procs.get(name)):
                if time.time() > end and not with_kill:
                    os.kill(pid, signal.SIGKILL)
                    with_kill = True
                time.sleep(0.1)
        except ProcessLookupError:
            pass
        if name in self.procs:
            self.procs.pop(name).wait()
        pids = self._pids()
        pids.pop(name, None)
        self.pid_file.write_text(json.dumps(pids, indent=1))

    def down(self):
        """Cancel the jobs, then stop the daemons this cluster started (by their recorded PIDs)."""
        pids = self._pids()
        if "slurmctld" in pids and _ours(pids["slurmctld"], self.root):
            try:
                self.cancel_all()
            except (OSError, subprocess.SubprocessError):
                pass
        order = [n for n in pids if n.startswith("slurmd.")] + ["slurmctld", "slurmdbd", "mariadbd", "munged"]
        for name in order:
            self._stop(name)
        self._unresolve_nodes()


def _alive(pid, proc=None):
    if proc is not None:
        return proc.poll() is None
    try:  # not our child (started by `up` in another process): gone, or a zombie of init
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _ours(pid, root):
    """The process still runs one of this cluster's daemons (its command line or cwd names root)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return str(root) in cmdline or cwd == str(root)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m slurm.testcluster", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="install if needed, start; prints the SLURM_CONF to export")
    u.add_argument("dir", nargs="?", help="state directory (default: a new one under /tmp)")
    d = sub.add_parser("down", help="cancel the jobs and stop the daemons `up` started")
    d.add_argument("dir")
    args = p.parse_args(argv)
    if args.cmd == "up":
        try:
            install(lambda m: print(m, file=sys.stderr))
        except Unavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="slurm-testcluster-"))
        cluster = Cluster(root, log=lambda m: print(m, file=sys.stderr))
        try:
            cluster.up()
        except ClusterError as e:
            print(f"error: {e}", file=sys.stderr)
            cluster.down()
            return 1
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    if not (Path(args.dir) / "pids.json").is_file():
        print(f"error: {args.dir}: no pids.json (not a state directory of `up`)", file=sys.stderr)
        return 2
    Cluster(args.dir).down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
