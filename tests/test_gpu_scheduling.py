"""GPU scheduling on one machine: `snakemake --cores N --resources gpu=K` never runs GPU jobs needing
more than K GPUs at once, and each GPU job sees only its own GPUs (CUDA_VISIBLE_DEVICES, set per job by GPU_RUN:
src/quantune/gpus.py). The host's GPUs are faked with QUANTUNE_GPUS; the jobs (tests/gpu_workflow) record what
they saw and when they ran."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time


from conftest import ROOT, snakemake

WORKFLOW = ROOT / "tests" / "gpu_workflow" / "Snakefile"
JOBS = {"a": 1, "b": 1, "c": 1, "d": 2, "e": 0, "f": 1, "g": 2}


def run_fake(tmp_path, host_gpus: str, *args, jobs=JOBS, check=True):
    env = dict(os.environ, QUANTUNE_GPUS=host_gpus, QUANTUNE_GPU_LOCKS=str(tmp_path / "locks"))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(WORKFLOW), "-d", str(tmp_path), "--cores", "4",
           "--config", f"jobs={json.dumps(jobs)}", "sleep=1.5", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"snakemake failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return r, {j: json.loads((tmp_path / "seen" / f"{j}.json").read_text()) for j in jobs
               if (tmp_path / "seen" / f"{j}.json").is_file()}


def gpus_of(s) -> list[str]:
    return [g for g in (s["CUDA_VISIBLE_DEVICES"] or "").split(",") if g]


def check_runs(seen, jobs, pool: set[str], cap: int) -> int:
    """Each job saw exactly its count of distinct GPUs of the pool; overlapping jobs never shared one; at no
    instant were more than `cap` GPUs held. Returns the most GPUs held at once."""
    for j, n in jobs.items():
        g = gpus_of(seen[j])
        assert len(g) == n == len(set(g)) and set(g) <= pool, (j, n, seen[j])
        assert seen[j]["CUDA_VISIBLE_DEVICES"] is not None, j  # gpu=0: set, and empty
    events = sorted([(s["start"], len(gpus_of(s))) for s in seen.values()] +
                    [(s["end"], -len(gpus_of(s))) for s in seen.values()], key=lambda e: (e[0], e[1]))
    held, most = 0, 0
    for _, d in events:
        held += d
        most = max(most, held)
    assert most <= cap, f"{most} GPUs held at once, cap {cap}"
    for a in jobs:
        for b in jobs:
            sa, sb = seen[a], seen[b]
            if a < b and sa["start"] < sb["end"] and sb["start"] < sa["end"]:
                assert not set(gpus_of(sa)) & set(gpus_of(sb)), (a, sa, b, sb)
    return most


def test_resources_gpu_caps_gpu_jobs_in_flight(tmp_path):
    """3 GPUs on the host, --resources gpu=2: never more than 2 in use, each job on its own."""
    _, seen = run_fake(tmp_path, "0,1,2", "--resources", "gpu=2")
    most = check_runs(seen, JOBS, {"0", "1", "2"}, cap=2)
    assert most == 2  # the cap was reached, so it was the cap that held the rest back


def test_local_profile_takes_the_host_gpu_count(tmp_path):
    """profiles/local sets resources gpu to the host's GPUs (here QUANTUNE_GPUS=2, ids 4 and 7)."""
    r, seen = run_fake(tmp_path, "4,7", "--workflow-profile", str(ROOT / "profiles" / "local"), "--cores", "4")
    assert 'Provided resources: gpu=Resource("gpu", 2)' in r.stdout + r.stderr
    check_runs(seen, JOBS, {"4", "7"}, cap=2)


def test_without_a_cap_the_locks_still_give_each_job_its_own_gpus(tmp_path):
    """No --resources gpu: Snakemake starts every job at once, the wrapper's locks make the extra ones wait."""
    r, seen = run_fake(tmp_path, "2", "--cores", "8")
    check_runs(seen, JOBS, {"0", "1"}, cap=2)
    waited = [j for j in JOBS if "waiting for" in (tmp_path / "logs" / f"{j}.log").read_text()]
    assert waited, "with 7 jobs on 2 GPUs and no cap, some job must have waited for a lock"


def test_a_job_asking_more_gpus_than_the_host_has_fails_with_one_line(tmp_path):
    r, _ = run_fake(tmp_path, "1", jobs={"big": 2}, check=False)
    assert r.returncode != 0
    lines = (tmp_path / "logs" / "big.log").read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quantune: error: resources gpu=2:") and "fix:" in lines[0], lines


def test_gpu_locks_are_released_when_the_job_is_killed(tmp_path):
    """A SIGKILLed job leaves no stale lock: its GPU is free at once."""
    env = dict(os.environ, QUANTUNE_GPUS="1", QUANTUNE_GPU_LOCKS=str(tmp_path / "locks"),
               PYTHONPATH=str(ROOT / "src"))
    p = subprocess.Popen([sys.executable, "-m", "quantune.lib.gpus", "run", "--gpus", "1", "--", "sleep", "30"], env=env)
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            out = subprocess.run([sys.executable, "-m", "quantune.lib.gpus", "list"], env=env, capture_output=True,
                                 text=True).stdout
            if "0: held" in out:
                break
            time.sleep(0.2)
        assert "0: held" in out, out
        busy = subprocess.run([sys.executable, "-m", "quantune.lib.gpus", "run", "--gpus", "1", "--wait", "0.5",
                               "--", "true"], env=env, capture_output=True, text=True)
        assert busy.returncode == 2 and "no 1 free GPU(s) of 0 after 0 s" in busy.stderr, busy.stderr
    finally:
        p.kill()
        p.wait()
    free = subprocess.run([sys.executable, "-m", "quantune.lib.gpus", "run", "--gpus", "1", "--wait", "5", "--",
                           "sh", "-c", "echo $CUDA_VISIBLE_DEVICES"], env=env, capture_output=True, text=True)
    assert free.returncode == 0 and free.stdout.strip() == "0", free.stderr


def test_project_gpu_rules_run_their_step_through_the_wrapper():
    """At full scale the evaluate job asks for its GPU and runs its step through GPU_RUN (dry run)."""
    r = snakemake("-n", "-p", "eval_opt67b", "--config", "scale=full")
    out = r.stdout + r.stderr
    assert "exec python -m quantune.lib.gpus run --gpus 1 -- python -m quantune.evaluate" in out, out[-3000:]


def test_host_gpus_come_from_nvidia_smi_when_nothing_says_otherwise(tmp_path):
    """No QUANTUNE_GPUS, no CUDA_VISIBLE_DEVICES: the GPUs are the lines of `nvidia-smi -L` (a stand-in here)."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-b)'\n")
    smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("QUANTUNE_GPUS", "CUDA_VISIBLE_DEVICES")}
    env.update(PATH=f"{tmp_path}:{env['PATH']}", PYTHONPATH=str(ROOT / "src"), QUANTUNE_GPU_LOCKS=str(tmp_path / "l"))
    out = subprocess.run([sys.executable, "-m", "quantune.lib.gpus", "run", "--gpus", "2", "--", "sh", "-c",
                          "echo $CUDA_VISIBLE_DEVICES"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "0,1", out.stderr
    listed = subprocess.run([sys.executable, "-m", "quantune.lib.gpus", "list"], env=env, capture_output=True, text=True)
    assert "GPUs (nvidia-smi -L): 0,1" in listed.stdout, listed.stdout
