"""seeds 002 and 003: lora_mt0_large (PEFT's parameter line for mt0-large, counted from the config
without weights), lora_distilgpt2_quick (seed 002's 50-step check) and lora_rank_sweep (one job per {rank}, one
table and plot)."""
import csv
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, snakemake

TRIGGERS = ("--rerun-triggers", "mtime", "params", "input")  # as the tiny_world fixture: never rebuild it


def step(module, *args, cfg: dict | None = None):
    cmd = [sys.executable, "-m", f"quantune.{module}", *args]
    if cfg is not None:
        cmd += ["--config-json", json.dumps(cfg)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "2"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def tiny_cfg(results_root):
    from quantune.lib.config import load_config

    return load_config(overrides={"results": {"tiny": str(results_root), "full": str(results_root / "full")}})


# ---------------------------------------------------------------- counting parameters from the config

def test_full_scale_mt0_large_count_is_peft_readme_line():
    """Seed 003 / PEFT's README: r 8 on q, v of bigscience/mt0-large, from config/hub_configs/ (no download)."""
    r = step("lora_sft", "count", "--recipe", "recipes/lora_mt0_large.yaml", "--set", "scale=full")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915" in r.stdout.splitlines()
    assert "config config/hub_configs/mt0-large.json" in r.stdout

    from quantune.lib.config import load_config, load_recipe
    from quantune.lora_sft import count_lora

    cfg = load_config(overrides={"scale": "full"})
    c = count_lora(cfg, load_recipe(ROOT / "recipes" / "lora_mt0_large.yaml", cfg), "lora_mt0_large")
    # the checkpoint's lm_head is its own 250112 x 1024 matrix: base 973,466,624 + 256,114,688
    assert c["tie_word_embeddings_serialized"] is False
    assert c["params_base"] == 1_229_581_312 and c["params_trainable"] == 2_359_296


def test_full_scale_distilgpt2_count_follows_from_its_config():
    """r 8 on c_attn and both c_proj of every layer; GPT-2's lm_head is tied to wte (counted once)."""
    conf = json.loads((ROOT / "config" / "hub_configs" / "distilgpt2.json").read_text())
    d, n, v, p = conf["n_embd"], conf["n_layer"], conf["vocab_size"], conf["n_positions"]
    per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d
    base = v * d + p * d + n * per_layer + 2 * d
    lora = n * 8 * ((d + 3 * d) + (d + d) + (4 * d + d))
    r = step("lora_sft", "count", "--recipe", "recipes/lora_distilgpt2_quick.yaml", "--set", "scale=full")
    assert r.returncode == 0, r.stdout + r.stderr
    line = f"trainable params: {lora:,} || all params: {base + lora:,} || trainable%: {100 * lora / (base + lora):.4f}"
    assert line in r.stdout.splitlines(), (line, r.stdout)
    assert lora != 81_920  # seed 002's printed count does not follow from its settings (recipe comment)
    sweep = step("lora_sft", "count", "--recipe", "recipes/lora_rank_sweep.yaml", "--set", "scale=full")
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    counts = [int(m.replace(",", "")) for m in re.findall(r"trainable params: ([\d,]+) \|\|", sweep.stdout)]
    assert counts == [lora * k // 8 for k in (4, 8, 16, 32)], counts


def test_untied_mt5_checkpoint_loads_untied_and_the_config_count_agrees(tmp_path):
    """What the full-scale count relies on: transformers' MT5Config ties the embeddings whatever config.json
    says, yet from_pretrained keeps a checkpoint's different lm_head.weight apart from shared.weight."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForSeq2SeqLM, MT5Config, MT5ForConditionalGeneration

    from quantune.lib.models import meta_model_from_config

    d = {"model_type": "mt5", "architectures": ["MT5ForConditionalGeneration"], "vocab_size": 64, "d_model": 16,
         "d_kv": 4, "d_ff": 32, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2,
         "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True, "decoder_start_token_id": 0,
         "pad_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False}
    torch.manual_seed(0)
    sd = {k: v.detach().clone().contiguous() for k, v in MT5ForConditionalGeneration(MT5Config(**d)).state_dict().items()}
    sd["lm_head.weight"] = torch.randn_like(sd["shared.weight"])
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(d))

    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is not loaded.shared.weight
    assert torch.equal(loaded.lm_head.weight, sd["lm_head.weight"]) and torch.equal(loaded.shared.weight, sd["shared.weight"])
    n_loaded = sum(p.numel() for p in loaded.parameters())
    meta = meta_model_from_config(d)
    assert meta.lm_head.weight.device.type == "meta"
    assert sum(p.numel() for p in meta.parameters()) == n_loaded
    # a config that ties (GPT-2 style) keeps one matrix
    tied = meta_model_from_config({**d, "tie_word_embeddings": True})
    assert sum(p.numel() for p in tied.parameters()) == n_loaded - 64 * 16


def test_count_without_an_offline_config_is_one_line(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    del cfg["models"]["mt0-large"]["hub_config"]
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = step("lora_sft", "count", "--recipe", "recipes/lora_mt0_large.yaml", "--config", str(p), "--set", "scale=full")
    assert r.returncode == 2 and "no hub_config" in r.stderr and "fix: add hub_config" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    cfg["models"]["mt0-large"]["hub_config"] = "config/hub_configs/nope.json"
    p.write_text(yaml.safe_dump(cfg))
    r = step("lora_sft", "count", "--recipe", "recipes/lora_mt0_large.yaml", "--config", str(p))
    assert r.returncode == 2 and "models.mt0-large.hub_config: config/hub_configs/nope.json does not exist" in r.stderr


# ---------------------------------------------------------------- recipes and data

def test_sweep_runs_are_lora_sft_recipes_and_bad_ranks_are_named(cfg, tmp_path):
    from quantune.lib.common import QuantuneError
    from quantune.lib.config import load_recipe, sweep_run_recipe

    sw = load_recipe(ROOT / "recipes" / "lora_rank_sweep.yaml", cfg)
    runs = [sweep_run_recipe(sw, k, "x") for k in sw["ranks"]]
    assert [(r["stage"], r["lora_r"], r["lora_alpha"]) for r in runs] == [("lora_sft", k, 2 * k) for k in (4, 8, 16, 32)]
    assert all("ranks" not in r and "num_prompts" not in r for r in runs)
    with pytest.raises(QuantuneError, match=r"rank 64 is not in the sweep \[4, 8, 16, 32\]"):
        sweep_run_recipe(sw, 64, "x")
    raw = yaml.safe_load((ROOT / "recipes" / "lora_rank_sweep.yaml").read_text())
    p = tmp_path / "lora_rank_sweep.yaml"
    p.write_text(yaml.safe_dump({**raw, "lora_r": 8}))
    with pytest.raises(QuantuneError, match="key lora_r: unknown key 'lora_r'"):
        load_recipe(p, cfg)
    p.write_text(yaml.safe_dump({**raw, "ranks": [4, 4]}))
    with pytest.raises(QuantuneError, match="key ranks"):
        load_recipe(p, cfg)


def test_sliced_splits_of_a_local_data_set(tiny_world, results_root):
    from quantune.lib.config import resolve_dataset
    from quantune.lib.data import load_split

    ds = resolve_dataset(tiny_cfg(results_root), "alpaca")
    rows = load_split(ds, "train")
    assert load_split(ds, "train[:5]") == rows[:5] and load_split(ds, "train[-3:]") == rows[-3:]
    assert load_split(ds, "train[10:20]", 4) == rows[10:14]


# ---------------------------------------------------------------- the targets, through Snakemake

@pytest.mark.slow
def test_lora_mt0_large_tiny_loss_falls_and_counts_match(tiny_world, results_root):
    snakemake("lora_mt0_large", *TRIGGERS, results=results_root, timeout=1200)
    m = json.loads((results_root / "lora_mt0_large" / "metrics.json").read_text())
    assert m["task_type"] == "SEQ_2_SEQ_LM" and m["lora_r"] == 8 and m["lora_alpha"] == 32 and m["target_modules"] == "q,v"
    hist = [json.loads(x) for x in (results_root / "lora_mt0_large" / "trainer_log.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in hist if "loss" in h]
    n = len(losses) // 3
    assert sum(losses[-n:]) / n < sum(losses[:n]) / n - 0.1, losses  # the loss falls, not just one noisy point
    assert m["eval_loss"] < m["eval_loss_before"] - 0.2, (m["eval_loss_before"], m["eval_loss"])
    # the tiny counts: what training loaded is what the config count says, in PEFT's own words
    r = step("lora_sft", "count", "--recipe", "recipes/lora_mt0_large.yaml", cfg=tiny_cfg(results_root))
    assert r.returncode == 0, r.stdout + r.stderr
    assert m["peft_trainable_line"] in r.stdout.splitlines(), (m["peft_trainable_line"], r.stdout)
    assert m["peft_trainable_line"] == (f"trainable params: {m['params_trainable']:,} || all params: "
                                        f"{m['params_total']:,} || trainable%: {m['params_trainable_pct']:.4f}")
    conf = json.loads((tiny_world / "models" / "mt5" / "config.json").read_text())
    # q and v of every attention block: encoder self, decoder self and cross attention
    blocks = conf["num_layers"] + 2 * conf["num_decoder_layers"]
    inner = conf["num_heads"] * conf["d_kv"]
    assert m["params_trainable"] == blocks * 2 * 8 * (conf["d_model"] + inner)


@pytest.mark.slow
def test_distilgpt2_quick_check_records_the_seed_table(tiny_world, results_root):
    snakemake("lora_distilgpt2_quick", *TRIGGERS, results=results_root, timeout=1200)
    out = results_root / "lora_distilgpt2_quick"
    m = json.loads((out / "metrics.json").read_text())
    assert m["global_step"] == 50 and m["batch_size"] == 1 and m["lr_scheduler_type"] == "constant"
    logged = {h["step"]: h for h in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if "loss" in h}
    for st in (10, 20, 30, 40, 50):
        assert m[f"loss_step{st}"] == pytest.approx(logged[st]["loss"]) and m[f"lr_step{st}"] == pytest.approx(2e-4)
    elapsed = [m[f"elapsed_s_step{st}"] for st in (10, 20, 30, 40, 50)]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0 and elapsed[-1] <= m["train_runtime"] * 1.01
    # the optimizer steps' own seconds after the first (warm-up) step
    assert m["timed_steps"] == 49 and m["seconds_per_step"] == pytest.approx(m["step_seconds"] / 49)
    assert 0 < m["step_seconds"] < m["train_runtime"] and m["warmup_step_seconds"] > 0
    assert m["peak_mem_mb"] > 0 and m["peak_mem_kind"] == "max_rss"
    conf = json.loads((tiny_world / "models" / "gpt2" / "config.json").read_text())
    d = conf["n_embd"]
    lora = conf["n_layer"] * 8 * ((d + 3 * d) + (d + d) + (4 * d + d))
    assert m["params_trainable"] == lora
    assert m["params_trainable_pct"] == pytest.approx(100 * lora / m["params_total"])
    assert m["eval_loss"] < m["eval_loss_before"], (m["eval_loss_before"], m["eval_loss"])


@pytest.mark.slow
def test_rank_sweep_one_job_per_rank_one_table_one_plot(tiny_world, results_root):
    from quantune.lib.textmetrics import corpus_scores

    snakemake("lora_rank_sweep", *TRIGGERS, results=results_root, timeout=1800)
    out = results_root / "lora_rank_sweep"
    runs = {k: json.loads((out / f"r{k}" / "metrics.json").read_text()) for k in (4, 8, 16, 32)}
    for k, m in runs.items():
        assert m["lora_r"] == k and m["lora_alpha"] == 2 * k and m["stage"] == "lora_sft"
        assert m["params_trainable"] == runs[4]["params_trainable"] * k // 4  # LoRA's size is linear in r
        gens = [json.loads(x) for x in (out / f"r{k}" / "generations.jsonl").read_text().splitlines()]
        assert len(gens) == m["gen_prompts"] == 24
        sc = corpus_scores([g["prediction"] for g in gens], [g["reference"] for g in gens])
        assert m["bleu4"] == pytest.approx(sc["bleu-4"]) and m["rougeL"] == pytest.approx(sc["rouge-l"])
        assert (out / f"r{k}" / "adapter" / "adapter_config.json").is_file()
    agg = json.loads((out / "metrics.json").read_text())
    assert agg["stage"] == "lora_sweep" and agg["ranks"] == "4,8,16,32"
    rows = list(csv.DictReader((out / "lora_rank_sweep.csv").open()))
    assert [int(r["rank"]) for r in rows] == [4, 8, 16, 32]
    for r in rows:
        k, m = int(r["rank"]), runs[int(r["rank"])]
        for key in ("params_trainable", "train_runtime", "train_loss_last", "bleu4", "rougeL", "peak_mem_mb"):
            assert float(r[key]) == pytest.approx(m[key]) and agg["runs"][str(k)][key] == pytest.approx(m[key])
    md = (out / "lora_rank_sweep.md").read_text()
    assert sum(1 for line in md.splitlines() if re.match(r"^\| (4|8|16|32) \|", line)) == 4
    assert (out / "lora_rank_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one rule with a {rank} wildcard: a run is addressed by its path
    r = snakemake("-n", str(out / "r8" / "metrics.json"), "-f", *TRIGGERS, results=results_root)
    assert re.search(r"rule lora_sweep_run:.*?wildcards: name=lora_rank_sweep, rank=8", r.stdout, re.S), r.stdout[-2000:]
    bad = step("lora_sweep", "--rank", "64", "--recipe", "recipes/lora_rank_sweep.yaml", "--out", str(out / "r64"),
               cfg=tiny_cfg(results_root))
    assert bad.returncode == 2 and "rank 64 is not in the sweep [4, 8, 16, 32]" in bad.stderr, bad.stderr
    assert not (out / "r64").exists()
