"""A real two-node SLURM cluster on this one machine, for tests marked ``slurm``.

One ``slurmctld`` and two ``slurmd`` (``-N n1`` / ``-N n2``) run from a private ``slurm.conf`` under a
temporary directory: ``auth/none`` + ``cred/none`` (no munge), ``proctrack/linuxproc`` + ``task/none`` (no
cgroups), ``select/cons_tres``, free ports picked at start, state/spool/pid/log files in the temporary
directory.  Both nodes are ``NodeHostname=localhost NodeAddr=127.0.0.1`` with their own ``Port=``.  Nothing
outside the temporary directory is written, the machine's own SLURM configuration (if any) is never read
(``SLURM_CONF`` points every client at the private file), and teardown stops exactly the daemons started
here (by their ``Popen`` handles, never by name).

Where SLURM is not installed, or the daemons do not come up, the fixture *skips* with the reason and the
tail of the daemon logs - ``pytest -ra`` prints it; it never passes silently.  Set
``DIST_MARSM_SLURM=off`` to skip on purpose.  ``.ci/install_slurm.sh`` installs SLURM (Debian: slurm-wlm).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

NODES = ("n1", "n2")
DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/local/sbin") / name) if p.exists()), None
    )


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """Controller + two node daemons.  ``env`` is what clients (sbatch, scontrol, ...) must run with."""

    def __init__(self, root: Path, cpus_per_node: int = 2):
        self.root = Path(root)
        self.cpus_per_node = cpus_per_node
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.bins = {b: _which(b) for b in DAEMONS + CLIENTS}
        missing = [b for b, p in self.bins.items() if p is None]
        if missing:
            raise SlurmError(
                f"SLURM is not installed here (missing {', '.join(missing)}); "
                f"install it with .ci/install_slurm.sh (Debian/Ubuntu: apt-get install slurm-wlm)"
            )
        self.conf = self.root / "slurm.conf"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
        self.env["SLURM_CONF"] = str(self.conf)

    # -- configuration -------------------------------------------------------------------------
    def write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        user = _current_user()
        r = self.root
        for d in ("state",):
            (r / d).mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=distmarsmtest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmUser={user}",
            "AuthType=auth/none",
            "CredType=cred/none",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "SlurmdParameters=config_overrides",  # nodes are declared, not probed: any host works
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=600",  # finished jobs stay visible to `scontrol show job` (no accounting db)
            "KillWait=5",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "MessageTimeout=20",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for name, port in zip(NODES, node_ports):
            lines.append(
                f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus_per_node} RealMemory=1000 State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    # -- daemons ---------------------------------------------------------------------------------
    def _spawn(self, label: str, argv: list[str]) -> None:
        log = open(self.root / f"{label}.stdout", "wb")
        p = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        self.procs.append((label, p))

    def start(self, timeout: float = 60.0) -> None:
        self.write_conf()
        # -D: foreground, so the Popen handle is the daemon itself; -i/-c: ignore/clear old state.
        self._spawn("slurmctld", [self.bins["slurmctld"], "-D", "-c", "-i", "-f", str(self.conf)])
        for n in NODES:
            self._spawn(f"slurmd-{n}", [self.bins["slurmd"], "-D", "-N", n, "-f", str(self.conf)])
        deadline = time.time() + timeout
        last = ""
        while time.time() < deadline:
            dead = [(lbl, p.returncode) for lbl, p in self.procs if p.poll() is not None]
            if dead:
                raise SlurmError(f"SLURM daemon exited at start-up: {dead}\n{self.logs()}")
            r = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            last = (r.stdout + r.stderr).strip()
            states = dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
            if all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.5)
        raise SlurmError(f"nodes not idle after {timeout:.0f} s (sinfo: {last!r})\n{self.logs()}")

    def logs(self, n: int = 15) -> str:
        out = []
        for label in ["slurmctld"] + [f"slurmd-{x}" for x in NODES]:
            f = self.root / (f"{label}.log")
            out.append(f"--- {f}\n{_tail(f, n)}\n--- {label}.stdout\n{_tail(self.root / f'{label}.stdout', n)}")
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop exactly the daemons started by ``start``."""
        if any(p.poll() is None for lbl, p in self.procs if lbl == "slurmctld"):
            self.run(["scancel", "--full", "--partition=debug"], check=False)
            deadline = time.time() + 30
            while time.time() < deadline:
                r = self.run(["squeue", "-h", "-t", "all", "-o", "%T"], check=False)
                if r.returncode != 0 or not any(s in r.stdout for s in ("RUNNING", "COMPLETING", "PENDING")):
                    break
                time.sleep(0.5)
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            for _, p in reversed(self.procs):
                if p.poll() is None:
                    p.send_signal(sig)
            for _, p in self.procs:
                try:
                    p.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    pass
            if all(p.poll() is not None for _, p in self.procs):
                break
        self.procs = [(lbl, p) for lbl, p in self.procs if p.poll() is None]

    # -- clients ---------------------------------------------------------------------------------
    def run(self, argv: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        argv = [self.bins.get(argv[0]) or argv[0], *argv[1:]]
        env = dict(self.env, **kw.pop("env", {}))
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r

    def sbatch(self, args: list[str], cwd: str | Path, env: dict | None = None) -> int:
        r = self.run(["sbatch", "--parsable", *args], cwd=str(cwd), env=env or {})
        return int(r.stdout.strip().split(";")[0])

    def job(self, jobid: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, NodeList, Restarts, ExitCode, Reason, ...)."""
        r = self.run(["scontrol", "show", "job", "-o", str(jobid)], check=False)
        if r.returncode != 0:
            return {}
        info = {}
        for tok in r.stdout.strip().split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def wait_job(self, jobid: int, until=None, timeout: float = 600, poll: float = 0.5) -> dict[str, str]:
        """Waits until ``until(info)`` (default: the job reached a final state) and returns the job info."""
        final = (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
            "PREEMPTED",
        )
        until = until or (lambda i: i.get("JobState") in final)
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(jobid)
            if info and until(info):
                return info
            time.sleep(poll)
        raise SlurmError(f"job {jobid}: condition not reached in {timeout:.0f} s; last state {info}\n{self.logs()}")


def _current_user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USER", "root")


def _cluster_fixture():
    if os.environ.get("DIST_MARSM_SLURM", "").lower() in ("0", "off", "no", "false"):
        pytest.skip("SLURM tests switched off by DIST_MARSM_SLURM=off")
    root = Path(tempfile.mkdtemp(prefix="dist_marsm_slurm_"))
    cluster = None
    try:
        cluster = SlurmCluster(root)
        cluster.start()
    except (SlurmError, OSError, subprocess.SubprocessError) as e:
        if cluster is not None:
            cluster.stop()
        pytest.skip(f"cannot start a SLURM test cluster: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
        if cluster.procs:
            print(f"slurm_cluster: could not stop {[(lbl, p.pid) for lbl, p in cluster.procs]}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A started two-node SLURM cluster (``SlurmCluster``), or a skip with the reason."""
    yield from _cluster_fixture()
