"""profiles/slurm on a real SLURM: a single-node cluster on localhost (tests/slurm_cluster.py:
slurmctld + slurmd + slurmdbd on MariaDB + munge, two GPUs declared without hardware), started once for this
module and stopped at its end, whatever happened.

- fake GPU jobs through the profile: SLURM schedules them against gpu:2, each sees its GPUs in
  CUDA_VISIBLE_DEVICES, sacct says COMPLETED with the asked gres/gpu, partition and account from the environment;
- a real tiny target (eval_opt67b) through the profile: same metrics as a local run;
- the tiny pretraining killed by SLURM's time limit saves a checkpoint on SIGTERM; the rerun resumes from it and,
  killed again, saves a later one. (Not scancel: the plugin 2.8.0 never sees a job that sacct reports as
  "CANCELLED by <uid>" end, and would wait forever; see README.)
"""
from __future__ import annotations

import atexit
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, snakemake
from slurm_cluster import ACCOUNT, GPUS, PARTITION, LocalSlurm, SlurmUnavailable, missing_tools

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local SLURM runs its daemons as root")
    if missing_tools():
        pytest.fail(f"missing {', '.join(missing_tools())}: run scripts/install_slurm.sh")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    atexit.register(cluster.down)  # also if the session dies before the fixture's teardown
    try:
        cluster.up()
    except SlurmUnavailable as e:
        cluster.down()
        pytest.fail(str(e))
    yield cluster
    cluster.down()


def slurm_env(cluster: LocalSlurm) -> dict:
    env = cluster.env
    env.update(SLURM_PARTITION=PARTITION, SLURM_ACCOUNT=ACCOUNT)
    return env


def smk_slurm(cluster, *args, cwd=ROOT, check=True, timeout=600):
    """snakemake through profiles/slurm, polling sacct every 2 s instead of the profile's 40 s."""
    cmd = [sys.executable, "-m", "snakemake", "--workflow-profile", str(ROOT / "profiles" / "slurm"),
           "--slurm-init-seconds-before-status-checks", "2", "--nolock", *args]
    r = subprocess.run(cmd, cwd=cwd, env=slurm_env(cluster), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"snakemake (slurm) failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def sacct(cluster, *job_ids) -> dict[str, dict]:
    fields = ["JobID", "State", "ExitCode", "AllocTRES", "Partition", "Account", "Timelimit", "ReqMem"]
    r = cluster.run_tool("sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", ",".join(fields))
    rows = [dict(zip(fields, line.split("|"))) for line in r.stdout.splitlines() if line.strip()]
    return {row["JobID"]: row for row in rows}


def submitted_ids(output: str) -> list[str]:
    return re.findall(r"has been submitted with SLURM jobid (\d+)", output)


def copy_tiny(tiny_world: Path, dest: Path, parts: list[str]) -> None:
    """Copy the parts of the built tiny world a test needs (mtimes kept, so nothing upstream reruns); the
    shared tiny world itself is never a test's output directory."""
    for part in parts:
        shutil.copytree(tiny_world / part, dest / "tiny_world" / part, copy_function=shutil.copy2)


def results_config(res: Path) -> str:
    return f"results={json.dumps({'tiny': str(res), 'full': str(res / 'full')})}"


def test_gpu_jobs_are_scheduled_by_slurm_against_the_gres(slurm, tmp_path):
    jobs = {"a": 1, "b": 1, "c": 1, "d": 2, "e": 0}
    r = smk_slurm(slurm, "-s", str(ROOT / "tests" / "gpu_workflow" / "Snakefile"), "-d", str(tmp_path),
                  "--slurm-logdir", str(tmp_path / "slurm_logs"), "--config", f"jobs={json.dumps(jobs)}")
    ids = submitted_ids(r.stdout + r.stderr)
    assert len(ids) == len(jobs), r.stderr[-3000:]
    acct = sacct(slurm, *ids)
    seen = {j: json.loads((tmp_path / "seen" / f"{j}.json").read_text()) for j in jobs}
    for j, n in jobs.items():
        s = seen[j]
        row = acct[s["SLURM_JOB_ID"]]  # the job ran under SLURM, as the job id it recorded
        assert row["State"] == "COMPLETED" and row["ExitCode"] == "0:0", row
        assert (row["Partition"], row["Account"]) == (PARTITION, ACCOUNT), row
        assert row["Timelimit"] == "00:05:00" and row["ReqMem"] == "200M", row  # runtime=5, mem_mb=200
        got = dict(kv.split("=") for kv in row["AllocTRES"].split(","))
        assert int(got.get("gres/gpu", 0)) == n, row
        cvd = [g for g in (s["CUDA_VISIBLE_DEVICES"] or "").split(",") if g]
        assert len(cvd) == n and len(set(cvd)) == n, (j, s)
        assert set(cvd) <= {str(i) for i in range(GPUS)}, (j, s)
        assert s["SLURM_NTASKS"] == "1", s  # a multi-GPU job is one task holding all its GPUs
        log = tmp_path / "slurm_logs" / "rule_fake_gpu_job" / j / f"{s['SLURM_JOB_ID']}.log"
        assert log.is_file(), f"no SLURM log {log}"
    # jobs that ran at the same time held different GPUs, never more than the node's two
    for a in jobs:
        for b in jobs:
            sa, sb = seen[a], seen[b]
            if a < b and sa["start"] < sb["end"] and sb["start"] < sa["end"]:
                ga = set(filter(None, (sa["CUDA_VISIBLE_DEVICES"] or "").split(",")))
                gb = set(filter(None, (sb["CUDA_VISIBLE_DEVICES"] or "").split(",")))
                assert not ga & gb, (a, sa, b, sb)


DETERMINISTIC = ("eval_ppl", "eval_nll", "eval_tokens_scored", "eval_context", "eval_stride", "gen_text",
                 "gen_tokens", "params_total", "dtype", "device", "model", "dataset", "split", "scale")


def test_a_tiny_target_through_the_profile_matches_a_local_run(slurm, tiny_world, tmp_path):
    for where in ("slurm", "local"):
        copy_tiny(tiny_world, tmp_path / where, ["models/opt", "tokenizers/bpe", "data/tiny_text"])
    plan = snakemake("-n", "eval_opt67b", results=tmp_path / "slurm")
    planned = set(re.findall(r"^rule (\w+):", plan.stdout, re.M))
    assert planned == {"evaluate", "eval_opt67b"}, f"only the evaluation may run, planned: {planned}"

    r = smk_slurm(slurm, "eval_opt67b", "--slurm-logdir", str(tmp_path / "slurm_logs"),
                  "--config", results_config(tmp_path / "slurm"))
    ids = submitted_ids(r.stdout + r.stderr)
    assert len(ids) == 1, r.stderr[-3000:]  # the named target rule is local; the evaluation is one SLURM job
    row = sacct(slurm, ids[0])[ids[0]]
    assert row["State"] == "COMPLETED" and "gres/gpu" not in row["AllocTRES"], row  # gpu=0 at tiny scale
    assert row["Timelimit"] == "00:20:00" and row["ReqMem"] == "4000M", row  # the rule's tiny runtime, mem_mb
    assert "cpu=2" in row["AllocTRES"], row  # threads: 2 -> --cpus-per-task=2
    assert (tmp_path / "slurm_logs" / "rule_evaluate" / "eval_opt67b" / f"{ids[0]}.log").is_file()

    snakemake("eval_opt67b", results=tmp_path / "local")
    a = json.loads((tmp_path / "slurm" / "eval_opt67b" / "metrics.json").read_text())
    b = json.loads((tmp_path / "local" / "eval_opt67b" / "metrics.json").read_text())
    for key in DETERMINISTIC:
        if isinstance(a[key], float):
            assert math.isclose(a[key], b[key], rel_tol=1e-9), (key, a[key], b[key])
        else:
            assert a[key] == b[key], (key, a[key], b[key])


PRETRAIN = {"steps": 100000, "steps_by_family": {"opt": 100000}, "eval_tokens": 256, "checkpoint_every": 1000000, "batch_size": 8, "seq_len": 64}


def _checkpoint_step(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=False)["step"])


def test_time_limit_kill_checkpoints_and_the_rerun_resumes(slurm, tiny_world, tmp_path):
    """100000 steps cannot finish in SLURM's 1-minute limit, and with checkpoint_every = 10^6 the only
    checkpoint there can be is the one the SIGTERM handler writes."""
    res = tmp_path / "res"
    copy_tiny(tiny_world, res, ["tokenizers/bpe", "data/tiny_text"])
    target = str(res / "tiny_world" / "models" / "opt")
    overrides = tmp_path / "overrides.yaml"  # nested values: a config file keeps their types
    overrides.write_text(json.dumps({"results": {"tiny": str(res), "full": str(res / "full")},
                                     "tiny_world": {"pretrain": PRETRAIN}}))
    cfg = ["--configfile", str(overrides)]
    common = ["--slurm-logdir", str(tmp_path / "slurm_logs"), "--set-threads", "tiny_pretrain=1", *cfg]
    log = res / "tiny_world" / "logs" / "tiny_pretrain_opt.log"
    ckpt = res / "tiny_world" / "models" / ".checkpoints" / "opt.pt"

    # 1. SLURM's time limit (runtime=1 minute): SIGTERM, the trainer saves and exits
    r = smk_slurm(slurm, target, "--set-resources", "tiny_pretrain:runtime=1", *common, check=False)
    assert r.returncode != 0
    ids = submitted_ids(r.stdout + r.stderr)
    assert len(ids) == 1, r.stderr[-3000:]
    row = sacct(slurm, ids[0])[ids[0]]
    assert row["State"] == "TIMEOUT" and row["Timelimit"] == "00:01:00", row
    text = log.read_text()
    m = re.search(r"SIGTERM at step (\d+)/100000: checkpoint \S+ holds step (\d+)", text)
    assert m, f"no checkpoint on SIGTERM in {log}:\n{text[-2000:]}"
    k = int(m.group(2))
    assert k > 0 and _checkpoint_step(ckpt) == k
    assert not Path(target).exists()

    # 2. the rerun resumes from step k and, stopped by the time limit again, saves a later step
    r = smk_slurm(slurm, target, "--set-resources", "tiny_pretrain:runtime=1", *common, check=False)
    assert r.returncode != 0
    ids2 = submitted_ids(r.stdout + r.stderr)
    assert len(ids2) == 1 and ids2 != ids, r.stderr[-3000:]
    assert sacct(slurm, ids2[0])[ids2[0]]["State"] == "TIMEOUT"
    text = log.read_text()
    assert f"resuming opt from step {k}" in text, f"the rerun did not resume from step {k}:\n{text[-2000:]}"
    m2 = re.search(r"SIGTERM at step (\d+)/100000: checkpoint \S+ holds step (\d+)", text)
    assert m2, f"no checkpoint on the second SIGTERM:\n{text[-2000:]}"
    assert int(m2.group(2)) > k and _checkpoint_step(ckpt) == int(m2.group(2))
