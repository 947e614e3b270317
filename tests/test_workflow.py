"""The workflow as a user drives it: dry runs of every target at both scales, config errors, and the
tiny world built for real (the session fixture `tiny_world`)."""
import json
import re

import pytest

from conftest import ROOT, snakemake
from quantune.config import load_config, load_recipes
from quantune.tb import read_scalars

FAMILIES = ["opt", "glm", "qwen3", "llama", "mt5", "gpt2"]


def targets(scale):
    names = sorted(load_recipes(load_config(overrides={"scale": scale})))
    return names + (["tiny_world"] if scale == "tiny" else []) + ["all"]


@pytest.mark.parametrize("scale", ["tiny", "full"])
def test_every_target_resolves_in_a_dry_run(scale, tmp_path):
    r = snakemake("-n", *targets(scale), "--config", f"scale={scale}", results=tmp_path)
    out = r.stdout + r.stderr
    assert "This was a dry-run" in out
    for name in targets(scale):
        if name not in ("all", "tiny_world"):
            assert f"{name}/metrics.json" in out, f"{name} does not lead to its metrics.json"
    jobs = re.findall(r"rule (\w+):\n(?:    .*\n)*?    resources: ([^\n]*)", out)
    assert jobs
    for rule, res in jobs:
        if rule == "evaluate":
            gpu = int(re.search(r"gpu=(\d+)", res).group(1))
            assert gpu == (1 if scale == "full" else 0), (rule, res)
    if scale == "full":
        assert "tiny_pretrain" not in out, "full scale must not build the tiny world"


@pytest.mark.parametrize("override,line", [
    ("scale=huge", "key scale: value 'huge' is not allowed; fix: use one of: tiny, full"),
    ("recipes_dir=5", "key recipes_dir: value 5 has the wrong type; fix: give a string"),
])
def test_bad_config_stops_before_any_job_with_one_line(override, line):
    r = snakemake("-n", "all", "--config", override, check=False)
    assert r.returncode != 0
    err = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("quantune: error:")]
    assert len(err) == 1 and line in err[0], r.stderr
    assert "Traceback" not in r.stderr


def test_every_rule_has_log_benchmark_conda_and_resources():
    import ast

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
