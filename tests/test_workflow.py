"""The workflow as a user drives it: dry runs of every target at both scales, config errors, and the
tiny world built for real (the session fixture `tiny_world`)."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, snakemake
from quantune.lib.config import load_config, load_recipes
from quantune.lib.tb import read_scalars

FAMILIES = ["opt", "glm", "qwen3", "llama", "mt5", "gpt2"]


def targets(scale):
    names = sorted(load_recipes(load_config(overrides={"scale": scale})))
    return names + (["tiny_world"] if scale == "tiny" else []) + ["all"]


@pytest.mark.parametrize("scale", ["tiny", "shape", "full"])
def test_every_target_resolves_in_a_dry_run(scale, tmp_path):
    r = snakemake("-n", "-p", *targets(scale), "--config", f"scale={scale}", results=tmp_path)
    out = r.stdout + r.stderr
    assert "This was a dry-run" in out
    # every command a job would run names a stage module there is, with a subcommand and options its parser knows
    options: dict[tuple[str, str], set[str]] = {}
    for m in re.finditer(r"python -m (quantune\.\w+) ([^>\n]*)", out):
        words = m.group(2).split()
        sub = words[0] if words and not words[0].startswith("-") else ""
        options.setdefault((m.group(1), sub), set()).update(w.split("=")[0] for w in words if w.startswith("--"))
    assert len({module for module, _ in options}) >= 10, options
    for (module, sub), opts in options.items():
        h = subprocess.run([sys.executable, "-m", module, *([sub] if sub else []), "--help"], cwd=ROOT,
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        assert h.returncode == 0, f"{module} {sub}: {(h.stderr or h.stdout)[-500:]}"
        assert all(o in h.stdout for o in opts), (module, sub, sorted(o for o in opts if o not in h.stdout))
    for name in targets(scale):
        if name not in ("all", "tiny_world"):
            assert f"{name}/metrics.json" in out, f"{name} does not lead to its metrics.json"
    jobs = re.findall(r"rule (\w+):\n(?:    .*\n)*?    resources: ([^\n]*)", out)
    assert jobs
    for rule, res in jobs:
        if rule == "evaluate":
            gpu = int(re.search(r"gpu=(\d+)", res).group(1))
            assert gpu == (0 if scale == "tiny" else 1), (rule, res)
    if scale != "tiny":
        assert "tiny_pretrain" not in out, f"scale {scale} must not build the tiny world's models"
    if scale == "shape":  # every logical model a recipe names is built from its hub config, on the GPU
        for model in ("opt-6.7b", "chatglm3-6b", "qwen3-0.6b", "qwen2.5-1.5b", "mt0-large", "distilgpt2"):
            assert f"shape_world/models/{model}" in out, model


@pytest.mark.parametrize("override,line", [
    ("scale=huge", "key scale: value 'huge' is not allowed; fix: use one of: tiny, shape, full"),
    ("recipes_dir=5", "key recipes_dir: value 5 has the wrong type; fix: give a string"),
])
def test_bad_config_stops_before_any_job_with_one_line(override, line):
    r = snakemake("-n", "all", "--config", override, check=False)
    assert r.returncode != 0
    err = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("quantune: error:")]
    assert len(err) == 1 and line in err[0], r.stderr
    assert "Traceback" not in r.stderr


def planned_jobs(results, *args) -> dict[tuple[str, str], tuple[str, str]]:
    """(rule, wildcards) -> (input, shell command) of every job of a dry run of `all`: what Snakemake's input
    and params rerun triggers compare."""
    out = snakemake("-n", "-p", "all", *args, results=results).stdout
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", out):
        rule = re.match(r"(?:local)?rule (\w+):\n", block)
        if not rule:
            continue
        field = lambda k: (re.search(rf"^    {k}: (.*)$", block, re.M) or [None, ""])[1]  # noqa: E731
        cmd = (re.search(r"^Shell command: (.*)$", block, re.M) or [None, ""])[1]
        jobs[(rule.group(1), field("wildcards") or field("output"))] = (field("input"), cmd)
    return jobs


def test_a_job_is_planned_anew_only_when_what_it_reads_changes(tmp_path):
    """A rule's params hold its job's part of the config (config.job_config), not the whole config: a local path
    for one model changes the jobs of the recipes that use it, and no other job."""
    import shutil

    import yaml

    rdir = tmp_path / "recipes"
    shutil.copytree(ROOT / "recipes", rdir)
    results = tmp_path / "results"
    base = planned_jobs(results, "--config", f"recipes_dir={rdir}")
    assert len(base) > 40 and any(rule == "lora_sft" and "--job-json" in cmd for (rule, _), (_, cmd) in base.items())
    model_dir = tmp_path / "my-distilgpt2"
    model_dir.mkdir()
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"models": {"distilgpt2": {"path": str(model_dir)}}}))
    moved = planned_jobs(results, "--config", f"recipes_dir={rdir}", "--configfile", str(override))
    users = {n for n, r in load_recipes(load_config(overrides={"recipes_dir": str(rdir)}), rdir).items()
             if "distilgpt2" in (r.get("model"), r.get("base_model"), r.get("tokenizer_model"))}
    assert users and set(moved) == set(base)
    changed = {wc for key, wc in ((k, k[1]) for k in base) if base[key] != moved[key]}
    assert {re.sub(r"^name=(\w+).*", r"\1", wc) for wc in changed} == users, sorted(changed)
    # one recipe edited: its file is its job's input (mtime trigger); no job's params or inputs change
    (rdir / "gptq_opt67b.yaml").write_text((rdir / "gptq_opt67b.yaml").read_text().replace("bits: 4", "bits: 3"))
    assert planned_jobs(results, "--config", f"recipes_dir={rdir}") == base


def test_every_rule_has_log_benchmark_conda_and_resources():

    for smk in sorted((ROOT / "rules").glob("*.smk")):
        text = smk.read_text()
        for m in re.finditer(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)+)", text, re.M):
            name, body = m.group(1), m.group(2)
            if "shell:" not in body and "run:" not in body and "script:" not in body:
                continue  # target-only rules
            for key in ("log:", "benchmark:", "conda:", "resources:", "mem_mb=", "runtime="):
                assert key in body, f"{smk.name}: rule {name} lacks {key}"


@pytest.mark.slow
def test_tiny_world_is_built_for_real_and_has_structure(tiny_world):
    m = json.loads((tiny_world / "metrics.json").read_text())
    for fam in FAMILIES:
        trained, untrained = m[f"{fam}_ppl_heldout"], m[f"{fam}_ppl_heldout_untrained"]
        # far below the untrained model's: at least 5x lower held-out perplexity
        assert trained < untrained / 5, f"{fam}: held-out ppl {trained:.1f} vs untrained {untrained:.1f}"
        model_dir = tiny_world / "models" / fam
        assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.json").is_file()
        tags = read_scalars(model_dir / "tb")
        assert {"train/loss", "train/lr", "train/grad_norm", "system/tokens_per_s", "system/peak_mem_mb",
                "system/wall_s", "eval/ppl", "final/ppl_heldout"} <= set(tags), fam
        losses = [v for _, v in sorted(tags["train/loss"])]
        assert losses[-1] < losses[0] - 1.0, f"{fam}: loss {losses[0]:.2f} -> {losses[-1]:.2f}"
    assert (tiny_world / "tokenizers" / "spm" / "tokenizer.model").is_file()
    for kind, fields in [("advertisegen", {"content", "summary"}), ("alpaca", {"instruction", "input", "output"}),
                         ("summary_pref", {"prompt", "chosen", "rejected"})]:
        row = json.loads((tiny_world / "data" / kind / "train.jsonl").read_text().splitlines()[0])
        assert set(row) == fields
    assert m["version_torch"].startswith("2.13") and m["git_commit"]


@pytest.mark.slow
def test_evaluate_targets_build_on_the_tiny_world(tiny_world, results_root):
    snakemake("eval_opt67b", "eval_opt27b", results=results_root)
    pre = json.loads((tiny_world / "models" / "opt" / "metrics.json").read_text())
    for name, stride in [("eval_opt67b", 128), ("eval_opt27b", 64)]:
        m = json.loads((results_root / name / "metrics.json").read_text())
        assert m["eval_context"] == 128 and m["eval_stride"] == stride and m["scale"] == "tiny"
        assert m["eval_ppl"] < pre["ppl_heldout_untrained"] / 5
        assert m["gen_tokens"] == 32 and m["gen_tokens_per_s"] > 0
        assert {"eval/ppl", "final/eval_ppl"} <= set(read_scalars(results_root / name / "tb"))
    # a rerun has nothing to do: outputs are up to date
    r = snakemake("-n", "eval_opt67b", results=results_root)
    assert "Nothing to be done" in r.stdout + r.stderr
    # Snakemake's own report: the jobs and the results marked with report() (each target's metrics.json)
    page = results_root / "snakemake_report.html"
    snakemake("--report", str(page), "eval_opt67b", "eval_opt27b", results=results_root)
    html = page.read_text(encoding="utf-8", errors="replace")
    assert "eval_opt67b" in html and "metrics.json" in html and "evaluate" in html


@pytest.mark.slow
def test_every_built_metrics_json_matches_its_stage_declaration(tiny_world, results_root, tmp_path):
    """config/schemas/metrics/<stage>.schema.yaml declares each stage's metrics.json; every file built in this
    test session (this module runs last) is checked, and an undeclared key is one line naming file and key."""
    from quantune.lib.common import QuantuneError
    from quantune.lib.metrics import check_metrics

    files = sorted(results_root.rglob("metrics.json"))
    stages = {check_metrics(f)["stage"] for f in files}
    assert {"tiny_world", "pretrain"} <= stages, stages
    m = json.loads((tiny_world / "metrics.json").read_text())
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps({**m, "w_bits": 4}))
    with pytest.raises(QuantuneError, match=rf"^{re.escape(str(bad))}: key w_bits: undeclared key; fix: declare it"):
        check_metrics(bad)


def test_shape_summary_rows_and_a_partial_run_keeps_earlier_rows(tmp_path):
    """scripts/shape_summary.py over a results/shape layout: a finished target's row has its metrics' cost figures
    and Snakemake's wall time, a failed one its log's error line, and a target this run did not start keeps the
    row an earlier summary in --out has for it (a run of part of a group), else it is reported as not started."""
    res, out = tmp_path / "shape", tmp_path / "out"
    (res / "benchmarks").mkdir(parents=True)
    (res / "logs").mkdir()
    (res / "rtn_opt67b").mkdir()
    (res / "rtn_opt67b" / "metrics.json").write_text(json.dumps(
        {"stage": "quantize", "quant_seconds": 4.5, "quant_peak_gpu_mb": 2048.0, "ppl_quant": 9.0,
         "version_torch": "2.11.0"}))
    (res / "benchmarks" / "rtn_opt67b.tsv").write_text("s\th:m:s\n12.34\t0:00:12\n")
    (res / "logs" / "gptq_opt67b.log").write_text("loading\nRuntimeError: CUDA error: out of memory\nexiting\n")
    out.mkdir()
    earlier = {"target": "eval_opt67b", "gpu": "NVIDIA H200", "wall_s": 19.6, "status": "ok", "peak_gib": 14.03,
               "speed": {"gen_seconds": 4.5}, "versions": {"torch": "2.10.0"}}
    (out / "shape_quantize.json").write_text(json.dumps([earlier]))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "shape_summary.py"), "quantize", "--results", str(res),
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr  # not every row is ok
    rows = {x["target"]: x for x in json.loads((out / "shape_quantize.json").read_text())}
    assert rows["rtn_opt67b"]["status"] == "ok" and rows["rtn_opt67b"]["wall_s"] == 12.3
    assert rows["rtn_opt67b"]["peak_gib"] == 2.0 and rows["rtn_opt67b"]["speed"] == {
        "quant_peak_gpu_mb": 2048.0, "quant_seconds": 4.5}  # cost figures only, no quality numbers
    assert rows["gptq_opt67b"]["status"] == "failed"
    assert rows["gptq_opt67b"]["error"] == "RuntimeError: CUDA error: out of memory"
    assert rows["eval_opt67b"] == {**earlier, "kept": True}
    assert rows["awq_opt67b"]["status"] == "failed" and "did not start" in rows["awq_opt67b"]["error"]
    md = (out / "shape_quantize.md").read_text()
    assert "| eval_opt67b | ok (an earlier run's) | 19.6 | 14.03 | gen_seconds 4.5 | NVIDIA H200 |" in md
    assert "Versions: torch 2.11.0" in md  # this run's, not the kept row's
    (out / "shape_quantize.json").write_text("[{\"target\": ")  # an earlier summary cut short: kept as it is
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "shape_summary.py"), "quantize", "--results", str(res),
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"shape_summary: {out / 'shape_quantize.json'}: not a list of summary rows (JSONDecodeError: Expecting value: "
        "line 1 column 13 (char 12)); fix: repair it or move it aside"]
    assert (out / "shape_quantize.json").read_text() == "[{\"target\": "
    assert (out / "shape_quantize.md").read_text() == md


@pytest.mark.slow
def test_a_shape_scale_target_runs_for_real_at_the_models_real_size(tmp_path):
    """lora_distilgpt2_quick at scale shape on the CPU: DistilGPT2 built from its hub config.json with random
    weights (the real parameter count), the real recipe (batch 1, 256 + 256 tokens, r 8 on c_attn / c_proj), a
    few steps (caps lowered further here for CI), and the full recipe's projected time in metrics.json."""
    from quantune.lib.metrics import check_metrics

    caps = tmp_path / "shape_ci.yaml"
    caps.write_text(f"results: {{shape: {tmp_path / 'shape'}}}\n"
                    "shape_world:\n  caps: {max_steps: 3, max_eval_samples: 8}\n"
                    "  data:\n    zh_instructions_raw: {format: alpaca, rows: {train: 1300},"
                    " lengths: {prompt: [8, 40], input: [5, 50], answer: [20, 250]}}\n")
    snakemake("lora_distilgpt2_quick", "--configfile", str(caps), "--set-resources", "shape_model:gpu=0",
              "lora_sft:gpu=0", "--config", "scale=shape", results=tmp_path)
    out = tmp_path / "shape" / "lora_distilgpt2_quick"
    m = check_metrics(out / "metrics.json")
    assert m["scale"] == "shape" and m["model_source"].endswith("shape_world/models/distilgpt2")
    assert m["params_total"] == 82_318_080 and m["params_trainable"] == 405_504  # DistilGPT2 + r 8, as counted
    assert (m["global_step"], m["full_recipe_steps"], m["batch_size"]) == (3, 50, 1)
    assert m["max_input_length"] == 256 and m["projected_full_seconds"] == pytest.approx(50 * m["seconds_per_step"])
    built = json.loads((tmp_path / "shape" / "shape_world" / "models" / "distilgpt2" / "shape_model.json").read_text())
    assert built["vocab_size"] == 50257 and built["hub_config"].endswith("config/hub_configs/distilgpt2.json")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
