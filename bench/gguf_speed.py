"""Q4_0 vs f16 GGUF speed through llama-cpp-python, on this machine's CPU or on a CUDA GPU (the speed goal).

The tiny world's model is too small for speed to mean anything (Python overhead per token dominates), so the
bench builds a Llama-architecture model of a size where the weights dominate (default ~110M parameters, or
--shape qwen2.5-1.5b: the layer sizes and vocabulary size of Qwen/Qwen2.5-1.5B, the real-scale model of
gguf_q4_0; random weights, the tiny world's SentencePiece tokenizer, its vocabulary padded by llama.cpp's
converter to the model's size; Llama differs from Qwen2 only by Qwen2's q/k/v biases, a negligible share of
the work), converts it with llama.cpp's own converter, quantizes
it with the Q4_0 recipe's parameters (recipes/gguf_q4_0.yaml), and times prompt processing and greedy
generation of both files with the same code as the gguf_evaluate stage (quantune.gguf_evaluate.speed: llama.cpp's own
counters, median of --repeats). Results are ratios against the f16 baseline measured in the same run.

    .venv/bin/python bench/gguf_speed.py [--hidden 1024 --layers 8 --threads 1 --gen-tokens 64 --repeats 5]
    bench/gguf_gpu.sh WHEELHOUSE OUTDIR   # on a bare CUDA machine: CUDA build, then --shape qwen2.5-1.5b --n-gpu-layers -1

--threads defaults to 1: on a 2-core machine shared with other jobs, ggml's 2 OpenMP threads wait on each
other behind the other processes and both files slow down ~10x (measured: f16 9.0 vs 73 tok/s); on an idle
machine, pass the core count.

On a GPU machine, build llama-cpp-python with CUDA (CMAKE_ARGS="-DGGML_CUDA=on" scripts/install_llamacpp.sh)
and pass --n-gpu-layers -1 to time the GPU instead (bench/gguf_gpu.sh does both on a bare CUDA machine).
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


# the sizes of real models' configs (config.json on the hub), for --shape
SHAPES = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
}


def build_model(out: Path, tokenizer_dir: Path, hidden: int, layers: int, seed: int, shape: str | None = None) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    heads = max(1, hidden // 64)
    sizes = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=(hidden * 11 // 4 + 255) // 256 * 256,
                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                 tie_word_embeddings=True)
    if shape:
        sizes.update(SHAPES[shape])
    cfg = LlamaConfig(**sizes, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 1.5B weights on CPU is slow
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    shutil.copyfile(tokenizer_dir / "tokenizer.model", out / "tokenizer.model")
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    import yaml

    from quantune.gguf_quantize import quantize_file
    from quantune.lib.gguf import converter_dir, import_llama_cpp, read_gguf, tensor_summary
    from quantune.gguf_evaluate import speed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default=str(ROOT / "results" / "tiny_world" / "tokenizers" / "spm"))
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="a real model's sizes (wins over the two above)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--pp-tokens", type=int, default=256)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--keep", default=None, help="keep the model and GGUFs in this directory")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--build-only", default=None, help=argparse.SUPPRESS)  # internal: build the HF model there, exit
    a = p.parse_args()
    if a.build_only:
        print(build_model(Path(a.build_only), Path(a.tokenizer), a.hidden, a.layers, seed=0, shape=a.shape))
        return 0
    llama_cpp = import_llama_cpp()
    if a.n_gpu_layers != 0 and not llama_cpp.llama_supports_gpu_offload():
        sys.exit("bench: --n-gpu-layers was given but this llama-cpp-python has no GPU offload; fix: build it with "
                 'CMAKE_ARGS="-DGGML_CUDA=on" scripts/install_llamacpp.sh (bench/gguf_gpu.sh does it on a CUDA machine)')
    tok_dir = Path(a.tokenizer)
    if not (tok_dir / "tokenizer.model").is_file():
        sys.exit(f"bench: {tok_dir}/tokenizer.model not found; fix: build the tiny world (snakemake tiny_world)")
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="gguf_bench."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.time()
        # torch builds the model in a process of its own: torch's CUDA runtime and llama.cpp's in one process
        # aborted on the H100 image ("free(): invalid pointer")
        args = [sys.executable, __file__, "--build-only", str(work / "hf"), "--tokenizer", str(tok_dir),
                "--hidden", str(a.hidden), "--layers", str(a.layers)] + (["--shape", a.shape] if a.shape else [])
        n_params = int(subprocess.run(args, check=True, capture_output=True, text=True).stdout.split()[-1])
        f16 = work / "model-f16.gguf"
        subprocess.run([sys.executable, str(converter_dir() / "convert_hf_to_gguf.py"), str(work / "hf"),
                        "--outfile", str(f16), "--outtype", "f16"], check=True, capture_output=True)
        recipe = yaml.safe_load((ROOT / "recipes" / "gguf_q4_0.yaml").read_text())
        q4 = work / "model-Q4_0.gguf"
        quantize_file(f16, q4, recipe)
        prep_s = time.time() - t0
        rng_ids = list(range(100, 100 + a.pp_tokens))  # any in-vocabulary ids: the weights are random
        results = {"params": n_params, "shape": a.shape or f"hidden {a.hidden}, layers {a.layers}", "threads": a.threads,
                   "n_gpu_layers": a.n_gpu_layers, "cpu_count": os.cpu_count(), "prepare_seconds": prep_s,
                   "llama_cpp_python": llama_cpp.__version__,
                   "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
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
    where = f"{a.threads} threads" if a.n_gpu_layers == 0 else f"GPU, {a.n_gpu_layers} layers offloaded"
    print(f"Q4_0 vs f16 ({n_params / 1e6:.0f}M params, {where}): generation x"
          f"{results['q4_0_vs_f16_tg_speedup']:.2f} ({results['q4_0_tg_tokens_per_s']:.1f} vs "
          f"{results['f16_tg_tokens_per_s']:.1f} tok/s), prompt processing x{results['q4_0_vs_f16_pp_speedup']:.2f}, "
          f"size x{results['q4_0_vs_f16_size']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
