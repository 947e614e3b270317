"""Q4_0 vs f16 GGUF speed on this machine's CPU, through llama-cpp-python (issue 6's speed goal).

The tiny world's model is too small for speed to mean anything (Python overhead per token dominates), so the
bench builds a Llama-architecture model of a size where the weights dominate (default ~110M parameters,
random weights, the tiny world's SentencePiece tokenizer), converts it with llama.cpp's own converter, quantizes
it with the Q4_0 recipe's parameters (recipes/gguf_q4_0.yaml), and times prompt processing and greedy
generation of both files with the same code as the gguf_eval stage (quantune.gguf_eval.speed: llama.cpp's own
counters, median of --repeats). Results are ratios against the f16 baseline measured in the same run.

    .venv/bin/python bench/gguf_cpu.py [--hidden 1024 --layers 8 --threads 1 --gen-tokens 64 --repeats 5]

--threads defaults to 1: on a 2-core machine shared with other jobs, ggml's 2 OpenMP threads wait on each
other behind the other processes and both files slow down ~10x (measured: f16 9.0 vs 73 tok/s); on an idle
machine, pass the core count.

On a GPU machine, build llama-cpp-python with CUDA (CMAKE_ARGS="-DGGML_CUDA=on" scripts/install_llamacpp.sh)
and pass --n-gpu-layers -1 to time the GPU instead.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def build_model(out: Path, tokenizer_dir: Path, hidden: int, layers: int, seed: int) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=(hidden * 11 // 4 + 255) // 256 * 256,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    shutil.copyfile(tokenizer_dir / "tokenizer.model", out / "tokenizer.model")
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    import yaml

    from quantune.export import converter_dir, import_llama_cpp, quantize_file, read_gguf, tensor_summary
    from quantune.gguf_eval import speed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default=str(ROOT / "results" / "tiny_world" / "tokenizers" / "spm"))
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--pp-tokens", type=int, default=256)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--keep", default=None, help="keep the model and GGUFs in this directory")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    llama_cpp = import_llama_cpp()
    tok_dir = Path(a.tokenizer)
    if not (tok_dir / "tokenizer.model").is_file():
        sys.exit(f"bench: {tok_dir}/tokenizer.model not found; fix: build the tiny world (snakemake tiny_world)")
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="gguf_bench."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.time()
        n_params = build_model(work / "hf", tok_dir, a.hidden, a.layers, seed=0)
        f16 = work / "model-f16.gguf"
        subprocess.run([sys.executable, str(converter_dir() / "convert_hf_to_gguf.py"), str(work / "hf"),
                        "--outfile", str(f16), "--outtype", "f16"], check=True, capture_output=True)
        recipe = yaml.safe_load((ROOT / "recipes" / "gguf_q4_0.yaml").read_text())
        q4 = work / "model-Q4_0.gguf"
        quantize_file(f16, q4, recipe)
        prep_s = time.time() - t0
        rng_ids = list(range(100, 100 + a.pp_tokens))  # any in-vocabulary ids: the weights are random
        results = {"params": n_params, "hidden": a.hidden, "layers": a.layers, "threads": a.threads,
                   "n_gpu_layers": a.n_gpu_layers, "cpu_count": os.cpu_count(), "prepare_seconds": prep_s,
                   "llama_cpp_python": llama_cpp.__version__,
                   "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}
        for label, path in [("f16", f16), ("q4_0", q4)]:
            llm = llama_cpp.Llama(str(path), n_ctx=max(a.pp_tokens, 64) + a.gen_tokens + 8,
                                  n_batch=a.pp_tokens, n_ubatch=a.pp_tokens, n_threads=a.threads,
                                  n_threads_batch=a.threads, n_gpu_layers=a.n_gpu_layers, verbose=False)
            sp = speed(llm, rng_ids, rng_ids[:16], a.gen_tokens, a.repeats)
            llm.close()
            summ = tensor_summary(read_gguf(path), path)
            results.update({f"{label}_file_bytes": summ["gguf_file_bytes"],
                            f"{label}_bits_per_weight": summ["gguf_bits_per_weight"],
                            f"{label}_pp_tokens_per_s": sp["pp_tokens_per_s"],
                            f"{label}_tg_tokens_per_s": sp["tg_tokens_per_s"],
                            f"{label}_tg_wall_tokens_per_s": sp["tg_wall_tokens_per_s"]})
        results["q4_0_vs_f16_tg_speedup"] = results["q4_0_tg_tokens_per_s"] / results["f16_tg_tokens_per_s"]
        results["q4_0_vs_f16_pp_speedup"] = results["q4_0_pp_tokens_per_s"] / results["f16_pp_tokens_per_s"]
        results["q4_0_vs_f16_size"] = results["q4_0_file_bytes"] / results["f16_file_bytes"]
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"Q4_0 vs f16 ({n_params / 1e6:.0f}M params, {a.threads} threads): generation x"
          f"{results['q4_0_vs_f16_tg_speedup']:.2f} ({results['q4_0_tg_tokens_per_s']:.1f} vs "
          f"{results['f16_tg_tokens_per_s']:.1f} tok/s), prompt processing x{results['q4_0_vs_f16_pp_speedup']:.2f}, "
          f"size x{results['q4_0_vs_f16_size']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
