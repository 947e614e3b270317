"""Per-job GPUs for local runs. Snakemake's `resources: gpu=N` is only a counter: it never sets
CUDA_VISIBLE_DEVICES, so every local GPU job would see, and use, GPU 0. A rule runs its step through

    python -m quantune.lib.gpus run --gpus N -- COMMAND ARGS...

(`GPU_RUN` in rules/common.smk), which takes N free GPUs of this host, exports CUDA_VISIBLE_DEVICES with
exactly those, and replaces itself with COMMAND (exec: same process, signals such as SLURM's SIGTERM reach
the command directly). A GPU is held through an exclusive lock on `<lock dir>/gpu<ID>.lock`; the lock's file
descriptor is inherited by COMMAND, so it is released when the job's process ends, however it ends (exit,
crash, SIGKILL): no stale locks. Jobs of other Snakemake runs on the same host (same user) wait for a free GPU.

- N = 0: CUDA_VISIBLE_DEVICES is set empty, so CPU jobs never touch a GPU a GPU job holds.
- N > 0 inside a SLURM job (SLURM_JOB_ID set): nothing is chosen, SLURM's CUDA_VISIBLE_DEVICES is kept (and
  checked to name at least N GPUs).
- The host's GPUs: $QUANTUNE_GPUS (a count, "4", or ids, "0,1,2,3"), else the CUDA_VISIBLE_DEVICES that
  Snakemake itself was started with, else `nvidia-smi -L`, else none.
- Lock dir: $QUANTUNE_GPU_LOCKS, else <tmp>/quantune-gpu-locks-<uid>. Waiting time: --wait / $QUANTUNE_GPU_WAIT
  seconds (default: wait as long as it takes).

    python -m quantune.lib.gpus list        # the GPUs jobs are given, and which are held now
Keep this module free of heavy imports: it runs in front of every GPU job.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# what a rule's shell command starts with (rules/common.smk); Snakemake fills in {resources.gpu} per job
GPU_RUN = "exec python -m quantune.lib.gpus run --gpus {resources.gpu} -- "


class GpuError(Exception):
    pass


def host_gpus(environ: dict | None = None) -> tuple[list[str], str]:
    """The GPU ids jobs may be given, and where that list came from."""
    env = os.environ if environ is None else environ
    spec = env.get("QUANTUNE_GPUS", "").strip()
    if spec:
        if re.fullmatch(r"\d+", spec):
            return [str(i) for i in range(int(spec))], "QUANTUNE_GPUS"
        ids = [s.strip() for s in spec.split(",") if s.strip()]
        if not ids or len(set(ids)) != len(ids):
            raise GpuError(f"QUANTUNE_GPUS={spec!r}: neither a count nor a list of distinct ids; "
                           "fix: QUANTUNE_GPUS=4 or QUANTUNE_GPUS=0,1,2,3")
        return ids, "QUANTUNE_GPUS"
    cvd = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if cvd and cvd not in ("-1", "NoDevFiles"):
        return [s.strip() for s in cvd.split(",") if s.strip()], "CUDA_VISIBLE_DEVICES"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
        return [str(i) for i in range(n)], "nvidia-smi -L"
    return [], "no nvidia-smi, no QUANTUNE_GPUS"


def lock_dir(environ: dict | None = None) -> Path:
    env = os.environ if environ is None else environ
    d = env.get("QUANTUNE_GPU_LOCKS") or os.path.join(tempfile.gettempdir(), f"quantune-gpu-locks-{os.getuid()}")
    return Path(d)


def _lock_path(d: Path, gpu: str) -> Path:
    return d / f"gpu{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock"


def try_claim(pool: list[str], n: int, d: Path) -> tuple[list[str], list[int]]:
    """Lock n free GPUs of the pool, all or none. Returns (ids, file descriptors holding the locks)."""
    d.mkdir(parents=True, exist_ok=True)
    ids, fds = [], []
    for gpu in pool:
        fd = os.open(_lock_path(d, gpu), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        ids.append(gpu)
        fds.append(fd)
        if len(ids) == n:
            return ids, fds
    for fd in fds:  # not enough free: hold none, so two waiting jobs cannot block each other
        os.close(fd)
    return [], []


def claim(n: int, wait: float | None = None, environ: dict | None = None,
          poll: float = 0.5) -> tuple[list[str], list[int]]:
    pool, source = host_gpus(environ)
    if n > len(pool):
        raise GpuError(f"resources gpu={n}: the job asks for {n} GPU(s), this host has {len(pool)} ({source}); fix: "
                       "lower the rule's gpu resource, set QUANTUNE_GPUS to this host's GPUs, or use a larger host")
    d = lock_dir(environ)
    t0, told = time.monotonic(), False
    while True:
        ids, fds = try_claim(pool, n, d)
        if ids:
            for fd in fds:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            return ids, fds
        if wait is not None and time.monotonic() - t0 >= wait:
            raise GpuError(f"{d}: no {n} free GPU(s) of {','.join(pool)} after {wait:.0f} s; "
                           "fix: wait for the other jobs, or raise --wait / QUANTUNE_GPU_WAIT")
        if not told:
            print(f"quantune.lib.gpus: waiting for {n} free GPU(s) of {','.join(pool)} (locks in {d})",
                  file=sys.stderr, flush=True)
            told = True
        time.sleep(poll)


def held(environ: dict | None = None) -> dict[str, bool]:
    pool, _ = host_gpus(environ)
    d = lock_dir(environ)
    out = {}
    for gpu in pool:
        p = _lock_path(d, gpu)
        if not p.exists():
            out[gpu] = False
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            out[gpu] = False
        except BlockingIOError:
            out[gpu] = True
        finally:
            os.close(fd)
    return out


def _run(a) -> int:
    if a.gpus < 0:
        raise GpuError(f"--gpus {a.gpus}: a GPU count is 0 or more; fix: pass the rule's resources.gpu")
    cmd = list(a.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise GpuError("quantune.lib.gpus run: no command given; fix: python -m quantune.lib.gpus run --gpus N -- COMMAND")
    env = dict(os.environ)
    if a.gpus == 0:  # a CPU job never touches a GPU that a GPU job holds (locally or under SLURM)
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif env.get("SLURM_JOB_ID"):
        # SLURM chose the job's GPUs (--gpus=N): keep its CUDA_VISIBLE_DEVICES; only check the count
        have = [s for s in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if s.strip()]
        if len(have) < a.gpus:
            raise GpuError(f"resources gpu={a.gpus}: SLURM job {env['SLURM_JOB_ID']} holds {len(have)} GPU(s) "
                           f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')!r}), the rule asks for "
                           f"{a.gpus}; fix: submit with --gpus={a.gpus} (resources: gpu={a.gpus})")
    else:
        wait = a.wait if a.wait is not None else (float(env["QUANTUNE_GPU_WAIT"]) if env.get("QUANTUNE_GPU_WAIT") else None)
        ids, fds = claim(a.gpus, wait)
        for fd in fds:
            os.set_inheritable(fd, True)  # the command holds the locks until its process ends
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        raise GpuError(f"{cmd[0]}: cannot run it ({e.strerror}); fix: check the rule's command")
    return 0  # not reached


def _list(a) -> int:
    pool, source = host_gpus()
    state = held()
    print(f"GPUs ({source}): {','.join(pool) or 'none'}; lock dir {lock_dir()}")
    for gpu in pool:
        print(f"  {gpu}: {'held' if state[gpu] else 'free'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantune.lib.gpus", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="take N free GPUs, export CUDA_VISIBLE_DEVICES, exec COMMAND")
    r.add_argument("--gpus", type=int, required=True)
    r.add_argument("--wait", type=float, default=None, help="give up after this many seconds (default: never)")
    r.add_argument("command", nargs=argparse.REMAINDER)
    r.set_defaults(func=_run)
    sub.add_parser("list", help="the host's GPUs and which are held").set_defaults(func=_list)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except GpuError as e:
        print(f"quantune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
