"""A real single-node SLURM on localhost, for tests and for trying profiles/slurm by hand.

Debian's slurmctld + slurmd + slurmdbd (22.05), munge, and MariaDB for the accounting database, so that
`sacct` works (Snakemake's SLURM executor reads job states through it). GPUs are declared without hardware:
GresTypes=gpu, the node has Gres=gpu:2, gres.conf has AutoDetect=off and two device files (/dev/null,
/dev/zero), so SLURM schedules GPU jobs against a count of 2 and sets CUDA_VISIBLE_DEVICES in them.

Everything lives in one directory (configs, state, logs, sockets, the database), on free loopback ports;
nothing system-wide is started or changed. Needs root (the daemons run as root) and
`scripts/install_slurm.sh`.

    python tests/slurm_cluster.py up DIR      # start; prints `export SLURM_CONF=...` for sbatch/sacct/snakemake
    python tests/slurm_cluster.py down DIR    # stop every daemon started in DIR
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from quantune.lib.common import free_port  # noqa: E402

DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
REQUIRED = ("munged", "mungekey", "mariadbd", "mariadb-install-db", "mariadb", "slurmdbd", "slurmctld",
            "slurmd", "sbatch", "sacct", "sacctmgr", "sinfo", "scontrol")
CLIENTS = ("srun", "sbatch", "salloc", "scancel", "squeue", "sacct", "sinfo", "scontrol", "sacctmgr", "sstat")
PARTITION = "gpu"
ACCOUNT = "quantune"
GPUS = 2


class SlurmUnavailable(RuntimeError):
    pass


def missing_tools() -> list[str]:
    return [t for t in REQUIRED if shutil.which(t) is None]


class LocalSlurm:
    """Start with `up()`, stop with `down()` (idempotent; kills only the daemons it started)."""

    def __init__(self, root: str | Path, cpus: int | None = None, real_memory_mb: int = 8000):
        self.root = Path(root).resolve()
        self.etc, self.log, self.run = self.root / "etc", self.root / "log", self.root / "run"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.conf = self.etc / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or (os.cpu_count() or 2)
        self.real_memory_mb = real_memory_mb
        self.procs: dict[str, int] = {}  # daemon -> pid

    # ------------------------------------------------------------------ environment for clients
    @property
    def env(self) -> dict[str, str]:
        """The environment that sbatch / sacct / snakemake --executor slurm need to find this cluster."""
        e = dict(os.environ)
        e["SLURM_CONF"] = str(self.conf)
        e["PATH"] = f"{self.root / 'bin'}{os.pathsep}{e.get('PATH', '')}"
        for k in list(e):  # a surrounding allocation's settings must not leak into submissions
            if k.startswith(("SLURM_JOB", "SLURM_STEP", "SBATCH_", "SRUN_")):
                del e[k]
        return e

    def run_tool(self, *cmd: str, check: bool = True, timeout: int = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        return r

    # ------------------------------------------------------------------ set-up
    def _write_configs(self) -> None:
        for d in (self.etc, self.log, self.run, self.root / "state", self.root / "spool", self.root / "munge"):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o711 if d.name == "munge" else 0o700)  # munged wants its socket's directory traversable
        self.dbd_port, self.ctld_port, self.slurmd_port, self.db_port = (free_port() for _ in range(4))
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
        (self.etc / "slurm.conf").write_text(
            f"ClusterName=quantune\n"
            f"SlurmctldHost={self.host}(127.0.0.1)\n"
            f"SlurmctldPort={self.ctld_port}\nSlurmdPort={self.slurmd_port}\n"
            f"SlurmUser=root\nSlurmdUser=root\n{auth}CredType=cred/munge\n"
            f"StateSaveLocation={self.root / 'state'}\nSlurmdSpoolDir={self.root / 'spool'}\n"
            f"SlurmctldPidFile={self.run / 'slurmctld.pid'}\nSlurmdPidFile={self.run / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={self.log / 'slurmctld.log'}\nSlurmdLogFile={self.log / 'slurmd.log'}\n"
            "SlurmctldDebug=info\nSlurmdDebug=info\n"
            # no cgroups in this VM: track processes by parent pid; pin each task to its allocated CPUs (affinity)
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/affinity\nJobAcctGatherType=jobacct_gather/linux\n"
            "JobAcctGatherFrequency=5\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core_Memory\n"
            "SchedulerType=sched/backfill\nSchedulerParameters=sched_interval=2,bf_interval=2\n"
            "MpiDefault=none\nReturnToService=2\nSwitchType=switch/none\n"
            "GresTypes=gpu\n"
            f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
            f"AccountingStoragePort={self.dbd_port}\nAccountingStorageTRES=gres/gpu\n"
            # for slurmdbd connections the munge socket is named here, not by AuthInfo
            f"AccountingStoragePass={self.munge_socket}\n"
            "JobCompType=jobcomp/none\n"
            # SIGTERM, then SIGKILL 15 s later (KillWait): time for the trainer to save its checkpoint
            "KillWait=15\nOverTimeLimit=0\nMinJobAge=30\nInactiveLimit=0\n"
            "SlurmctldTimeout=30\nSlurmdTimeout=30\nMessageTimeout=20\n"
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.real_memory_mb}"
            f" Gres=gpu:{GPUS} State=UNKNOWN\n"
            f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        )
        (self.etc / "gres.conf").write_text("AutoDetect=off\nName=gpu File=/dev/null\nName=gpu File=/dev/zero\n")
        dbd = self.etc / "slurmdbd.conf"
        dbd.write_text(
            f"{auth}DbdHost={self.host}\nDbdAddr=127.0.0.1\nDbdPort={self.dbd_port}\nSlurmUser=root\n"
            f"LogFile={self.log / 'slurmdbd.log'}\nPidFile={self.run / 'slurmdbd.pid'}\nDebugLevel=info\n"
            f"StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\nStoragePort={self.db_port}\n"
            "StorageUser=slurm\nStoragePass=quantune-test\nStorageLoc=slurm_acct_db\n"
        )
        dbd.chmod(0o600)  # slurmdbd refuses a readable config (it holds the database password)
        # Inside a job, Snakemake's jobstep executor drops SLURM_* variables (SLURM_CONF too) before it calls srun;
        # a real cluster's clients find /etc/slurm/slurm.conf. These shims, first on PATH, name this cluster's
        # config instead, without touching /etc.
        shims = self.root / "bin"
        shims.mkdir(exist_ok=True)
        for tool in CLIENTS:
            real = shutil.which(tool, path=os.defpath + ":/usr/bin:/usr/sbin")
            (shims / tool).write_text(f'#!/bin/sh\nSLURM_CONF={self.conf} exec {real} "$@"\n')
            (shims / tool).chmod(0o755)

    def _spawn(self, name: str, cmd: list[str], log: Path) -> None:
        with open(log, "ab") as out:
            p = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = p.pid
        (self.run / f"{name}.daemonpid").write_text(str(p.pid))
        self._children = getattr(self, "_children", []) + [p]

    def _wait(self, what: str, ok, timeout: float, daemon: str | None = None) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if ok():
                return
            if daemon and self._exited(daemon):
                break
            time.sleep(0.5)
        logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(self.log.glob("*")))
        raise SlurmUnavailable(f"{what} did not come up in {timeout:.0f} s\n{logs}")

    def _exited(self, daemon: str) -> bool:
        for p in getattr(self, "_children", []):
            if p.pid == self.procs.get(daemon):
                return p.poll() is not None
        return False

    def up(self, timeout: float = 90) -> "LocalSlurm":
        if os.geteuid() != 0:
            raise SlurmUnavailable("the local SLURM runs its daemons as root; run as root")
        if missing_tools():
            raise SlurmUnavailable(f"missing {', '.join(missing_tools())}; run scripts/install_slurm.sh")
        self._write_configs()
        # munge: its own key and socket
        key = self.root / "munge" / "munge.key"
        subprocess.run(["mungekey", "-c", "-f", "-k", str(key)], check=True, capture_output=True)
        key.chmod(0o600)
        self._spawn("munged", ["munged", "-F", "-f", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={self.run / 'munged.pid'}", f"--log-file={self.log / 'munged.log'}",
                               f"--seed-file={self.root / 'munge' / 'seed'}"], self.log / "munged.out")
        self._wait("munged", lambda: self.munge_socket.exists(), 20, "munged")
        # MariaDB: a private data directory, loopback TCP only
        db = self.root / "db"
        sock = self.run / "mysql.sock"
        r = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={db}", "--user=root",
                            "--auth-root-authentication-method=socket", "--skip-test-db"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SlurmUnavailable(f"mariadb-install-db failed: {r.stderr[-1500:]}")
        self._spawn("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={db}", f"--socket={sock}",
                                 f"--port={self.db_port}", "--bind-address=127.0.0.1", "--skip-name-resolve",
                                 "--user=root", f"--pid-file={self.run / 'mariadb.pid'}",
                                 f"--log-error={self.log / 'mariadb.log'}", "--innodb-buffer-pool-size=64M",
                                 "--innodb-lock-wait-timeout=900", "--innodb-log-file-size=16M"],
                    self.log / "mariadbd.out")
        sql = ["mariadb", "--no-defaults", f"--socket={sock}", "-u", "root"]
        self._wait("mariadbd", lambda: subprocess.run([*sql, "-e", "SELECT 1"], capture_output=True).returncode == 0,
                   60, "mariadbd")
        subprocess.run([*sql, "-e", "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'quantune-test'; "
                        "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"], check=True, capture_output=True)
        # slurmdbd, then the cluster and an account, then the controller and the node
        self._spawn("slurmdbd", ["slurmdbd", "-D"], self.log / "slurmdbd.out")
        self._wait("slurmdbd", lambda: self.run_tool("sacctmgr", "-n", "list", "cluster", check=False,
                                                     timeout=20).returncode == 0, 60, "slurmdbd")
        self.run_tool("sacctmgr", "-i", "add", "cluster", "quantune")
        self.run_tool("sacctmgr", "-i", "add", "account", ACCOUNT, "Cluster=quantune", "Description=tests",
                      "Organization=quantune")
        self.run_tool("sacctmgr", "-i", "add", "user", "root", f"DefaultAccount={ACCOUNT}", f"Account={ACCOUNT}")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"], self.log / "slurmctld.out")
        self._wait("slurmctld", lambda: self.run_tool("scontrol", "ping", check=False, timeout=10).stdout.count("UP") > 0,
                   60, "slurmctld")
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.host], self.log / "slurmd.out")
        self._wait("the node", self._node_idle, timeout, "slurmd")
        return self

    def _node_idle(self) -> bool:
        r = self.run_tool("sinfo", "-h", "-N", "-o", "%t", check=False, timeout=10)
        return r.returncode == 0 and r.stdout.strip() in ("idle", "mix", "alloc")

    # ------------------------------------------------------------------ tear-down
    def down(self) -> None:
        """Stop the daemons in reverse order: SIGTERM, then SIGKILL after a grace period."""
        pids = dict(self.procs)
        if not pids and self.run.is_dir():  # `down` from another process: read what `up` recorded
            for f in self.run.glob("*.daemonpid"):
                pids[f.name.split(".")[0]] = int(f.read_text())
        for name in reversed(DAEMONS):
            pid = pids.get(name)
            if pid is None:
                continue
            if _is(pid, name):  # never signal a process that merely reuses a recorded pid
                _terminate(pid, grace=15)
            (self.run / f"{name}.daemonpid").unlink(missing_ok=True)
        self.procs.clear()


def _is(pid: int, name: str) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == name[:15]
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone once reaped
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "X"


def _terminate(pid: int, grace: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    t0 = time.time()
    while time.time() - t0 < grace and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        t0 = time.time()
        while time.time() - t0 < 5 and _alive(pid):
            time.sleep(0.1)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("up", "down"):
        print(__doc__.strip().splitlines()[-2:][0], file=sys.stderr)
        raise SystemExit(2)
    cluster = LocalSlurm(sys.argv[2])
    if sys.argv[1] == "up":
        try:
            cluster.up()
        except SlurmUnavailable as e:
            cluster.down()
            print(f"slurm_cluster: error: {e}", file=sys.stderr)
            raise SystemExit(1)
        print(f"export SLURM_CONF={cluster.conf} PATH={cluster.root / 'bin'}:$PATH"
              f"  # partition {PARTITION}, account {ACCOUNT}, gpu:{GPUS}")
    else:
        cluster.down()
