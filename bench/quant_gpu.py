"""The quantize stage's CUDA path on an OPT-6.7B-shaped model: wall time and peak GPU memory of llm-compressor's
round-to-nearest (the data-free baseline), GPTQ and AWQ, through the project's own code (quantune.quantize)
and the real recipes (recipes/{rtn,gptq,awq}_opt67b.yaml at full scale: W4A16, group 128).

The model is built from OPTConfig (facebook/opt-6.7b's shape: hidden 4096, 32 layers, 32 heads, ffn 16384,
vocab 50272) with random bf16 weights directly on the GPU, and calibrated on random tokens: no download.
Random weights make time and memory real and perplexity meaningless, so none is reported.
Timings are reported as ratios against the RTN baseline measured in the same process.

    python bench/quant_gpu.py --out $OUT/quant_gpu.json                      # a CUDA machine
    python bench/quant_gpu.py --out /tmp/q.json --tiny                       # the same code path, tiny shape, CPU

Each method's numbers are written as soon as it finishes (a run cut short keeps what it measured).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

OPT_6_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384, vocab_size=50272,
                word_embed_proj_dim=4096, max_position_embeddings=2048, do_layer_norm_before=True,
                enable_bias=True, activation_function="relu", pad_token_id=1, bos_token_id=2, eos_token_id=2)
TINY = dict(OPT_6_7B, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, ffn_dim=1024, vocab_size=4096,
            word_embed_proj_dim=256, max_position_embeddings=512)


def build(shape: dict, device: str, dtype, cfg_dir: str):
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(**shape)
    cfg.save_pretrained(cfg_dir)  # llm-compressor re-reads the config from model.config._name_or_path
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = OPTForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.config._name_or_path = cfg_dir
    model.eval()
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="tiny OPT shape on CPU: checks the code path here")
    p.add_argument("--methods", default="rtn,gptq,awq")
    p.add_argument("--gptq-samples", type=int, default=128)
    p.add_argument("--gptq-seq", type=int, default=2048)
    p.add_argument("--awq-samples", type=int, default=128)
    p.add_argument("--awq-seq", type=int, default=512)
    a = p.parse_args(argv)

    import torch

    from quantune.lib.config import load_config, load_recipe
    from quantune.lib.measure import PeakMemory
    from quantune.lib.quant_backends import quantize_llmcompressor

    device = "cpu" if a.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("quantune: error: bench/quant_gpu.py: no CUDA device; fix: run it on a GPU machine (or --tiny)",
              file=sys.stderr)
        return 2
    shape = TINY if a.tiny else OPT_6_7B
    dtype = torch.float32 if a.tiny else torch.bfloat16
    cfg = load_config(overrides={"scale": "full"})
    calib = {"gptq": (a.gptq_samples, a.gptq_seq), "awq": (a.awq_samples, a.awq_seq)}
    import importlib.metadata as md

    result = {
        "what": "llm-compressor quantization of a random-weight OPT-6.7B-shaped model (time and memory only; "
                "random weights: no perplexity)" if not a.tiny else "tiny-shape CPU check of the bench code path",
        "command": "python bench/quant_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "shape": shape, "dtype": str(dtype).replace("torch.", ""),
        "versions": {k: md.version(k) for k in ("torch", "transformers", "llmcompressor", "compressed-tensors")},
        "calibration": "random token ids (uniform over the vocabulary)",
        "methods": {},
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def dump():
        rat = result["methods"].get("rtn", {}).get("wall_s")
        for name, r in result["methods"].items():
            if rat:
                r["wall_s_vs_rtn"] = r["wall_s"] / rat
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)

    for method in a.methods.split(","):
        recipe = load_recipe(ROOT / "recipes" / f"{method}_opt67b.yaml", cfg)
        samples = None
        want = (recipe.get("calibration_samples"), recipe.get("calibration_seq_len"))
        if method in calib:
            n, seq = calib[method]
            if a.tiny:
                n, seq = min(n, 8), min(seq, 64)
            recipe.update(calibration_samples=n, calibration_seq_len=seq)
            g = torch.Generator().manual_seed(0)
            samples = {"input_ids": torch.randint(3, shape["vocab_size"], (n, seq), generator=g).tolist()}
        with tempfile.TemporaryDirectory() as cfg_dir:
            t0 = time.perf_counter()
            model = build(shape, device, dtype, cfg_dir)
            build_s = time.perf_counter() - t0
            model_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
            with PeakMemory() as pk:
                extra = quantize_llmcompressor(model, None, recipe, samples, recipe.get("awq_mappings"))
            result["methods"][method] = {
                "recipe": f"recipes/{method}_opt67b.yaml", "bits": recipe["bits"], "group_size": recipe["group_size"],
                "zero_point": recipe.get("zero_point", False),
                "calibration_samples": samples and len(samples["input_ids"]),
                "calibration_seq_len": samples and len(samples["input_ids"][0]),
                "recipe_calibration": None if samples is None else f"{want[0]} x {want[1]}",
                "calibration_reduced": None if samples is None else (len(samples["input_ids"]), len(samples["input_ids"][0])) != want,
                "wall_s": pk.seconds, "peak_gpu_mib": pk.gpu_mb, "peak_gpu_gib": pk.gpu_mb and pk.gpu_mb / 1024,
                "model_gib": model_bytes / 2**30, "peak_rss_mib": pk.rss_mb, "build_s": build_s,
                **{k: v for k, v in extra.items() if not k.startswith("_")},
            }
            print(json.dumps({method: result["methods"][method]}), flush=True)
            model = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            dump()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
