"""GGUF evaluation (stage gguf_evaluate): GGUF models loaded with llama-cpp-python, beside the transformers model
they came from. Perplexity on held-out text (the same windows and token ids for every model, through
quantune.evaluate.perplexity), prompt-processing and generation tokens/s, file sizes, and greedy generations
for the same prompt ids side by side.

llama.cpp runs in a process of its own that never imports torch (LlamaProcess; why: lib.gguf.import_llama_cpp).
This process holds the transformers model; the other the GGUFs, scored on the same ids and windows
(lib.measure.windowed_nll).

    python -m quantune.gguf_evaluate --recipe recipes/gguf_eval.yaml --out results/gguf_eval
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from .lib.common import fail, run_cli, write_jsonl, write_metrics
from .lib.gguf import import_llama_cpp, read_gguf, target_dir, tensor_summary


def token_nll(logits, targets, block: int = 256):
    """Per-row -log softmax(logits)[target] with numpy (a llama.cpp process has no torch): llama.cpp's float32
    logits read in place, blocks of `block` rows (a row is the vocabulary: 151,936 wide for Qwen), each row's
    exponentials summed in float64. Equal to a float64 log-softmax within 1e-7 a token, at a fraction of its time
    and memory (a 2,048-token window of Qwen's logits is 1.2 GB in float32)."""
    import numpy as np

    out = np.empty(len(logits))
    for i in range(0, len(logits), block):
        b = logits[i:i + block]
        top = b.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(b - top).sum(axis=1, dtype=np.float64))
        out[i:i + len(b)] = lse - b[np.arange(len(b)), targets[i:i + len(b)]]
    return out


def gguf_nll(llm, ids: list[int], context: int, stride: int) -> dict:
    """Perplexity of a llama.cpp model over lib.measure's sliding windows, each window a fresh sequence (KV cache
    cleared), scored by token_nll."""
    from .lib.measure import windowed_nll

    def losses(begin: int, end: int):
        seq = ids[begin:end]
        llm.reset()
        llm.eval(seq)
        return token_nll(llm.scores[: len(seq) - 1], seq[1:])

    return windowed_nll(losses, len(ids), context, stride)


def open_gguf(path: str | Path, recipe: dict, n_ctx: int, logits_all: bool):
    llama_cpp = import_llama_cpp()
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                           n_threads=recipe["threads"], n_threads_batch=recipe["threads"],
                           n_gpu_layers=recipe["n_gpu_layers"], seed=0, verbose=False)


def greedy_llamacpp(llm, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy (argmax) continuation; EOS does not stop it, so every model yields exactly n tokens."""
    out = []
    for tok in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def greedy_hf(model, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy (argmax) continuation of a transformers causal LM, with the KV cache, EOS not special."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    out, past = [], None
    with torch.no_grad():
        for _ in range(n):
            r = model(ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
            past = r.past_key_values
            nxt = int(r.logits[0, -1].float().argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return out


def speed(llm, pp_ids: list[int], gen_prompt: list[int], gen_tokens: int, repeats: int) -> dict:
    """Prompt processing (one batch of len(pp_ids) tokens) and generation (gen_tokens greedy tokens),
    each timed by llama.cpp's own counters (llama_perf_context, as llama-bench) and by the wall clock."""
    llama_cpp = import_llama_cpp()
    ctx = llm.ctx
    pp, tg, tg_wall = [], [], []
    llm.reset()
    llm.eval(pp_ids[:8])  # warm-up
    for _ in range(repeats):
        llm.reset()
        llama_cpp.llama_perf_context_reset(ctx)
        llm.eval(pp_ids)
        llama_cpp.llama_synchronize(ctx)  # the counters are updated when the computation is waited for
        d = llama_cpp.llama_perf_context(ctx)
        pp.append(d.n_p_eval / (d.t_p_eval_ms / 1e3) if d.t_p_eval_ms > 0 else float("nan"))
        llama_cpp.llama_perf_context_reset(ctx)
        llm.reset()
        first = None
        n = 0
        for _tok in llm.generate(gen_prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            n += 1
            if first is None:
                first = time.perf_counter()  # the prompt is processed before the first token comes out
            if n == gen_tokens:
                break
        t1 = time.perf_counter()
        d = llama_cpp.llama_perf_context(ctx)
        # n_eval counts single-token decodes (generation); the prompt is counted in n_p_eval
        tg.append(d.n_eval / (d.t_eval_ms / 1e3) if d.t_eval_ms > 0 else float("nan"))
        tg_wall.append((n - 1) / (t1 - first) if n > 1 and t1 > first else float("nan"))
    return {"pp_tokens_per_s": statistics.median(pp), "tg_tokens_per_s": statistics.median(tg),
            "tg_wall_tokens_per_s": statistics.median(tg_wall), "pp_tokens": len(pp_ids), "tg_tokens": gen_tokens,
            "timing_repeats": repeats}


def _target_metrics(cfg: dict, target: str, recipe_path: str, key: str) -> dict:
    p = target_dir(cfg, target) / "metrics.json"
    if not p.is_file():
        raise fail(f"{recipe_path}: key {key}", f"{target} has not been built ({p} missing)",
                   f"build it first: snakemake {target}")
    return json.loads(p.read_text())


def inputs(recipe: dict, recipe_path: str, cfg: dict, gguf_files: dict[str, str] | None, reference: str | None):
    """Each GGUF's path and tensor types, the reference model directory, the evaluation text."""
    from .lib.config import resolve_dataset
    from .lib.data import join_text, load_split

    gguf_files = gguf_files or {}
    unknown = sorted(set(gguf_files) - set(recipe["ggufs"]))
    if unknown:
        raise fail("--gguf", f"{unknown[0]} is not in the recipe's ggufs", f"use one of: {', '.join(recipe['ggufs'])}")
    ggufs = {}
    for t in recipe["ggufs"]:
        path = gguf_files.get(t) or _target_metrics(cfg, t, recipe_path, "ggufs").get("gguf_path", "")
        if not Path(path).is_file():
            raise fail(f"{recipe_path}: key ggufs", f"{t} has no GGUF file ({path or 'none recorded'})", f"rebuild {t}")
        ggufs[t] = {"gguf_path": str(path), **tensor_summary(read_gguf(path), path)}
    if reference:
        ref_dir = Path(reference)
    else:
        _target_metrics(cfg, recipe["reference"], recipe_path, "reference")
        ref_dir = target_dir(cfg, recipe["reference"]) / "model"
    if not (ref_dir / "config.json").is_file():
        raise fail(str(ref_dir), "no transformers model here (config.json missing)",
                   f"build {recipe['reference']} first or pass --reference DIR")
    text = join_text(load_split(resolve_dataset(cfg, recipe["dataset"]), recipe["split"]))
    return ggufs, ref_dir, text


# ---- the llama.cpp process: these run in LlamaProcess's worker, which never imports torch

def gpu_offload(recipe_path: str, n_gpu_layers: int) -> bool:
    """Whether this llama-cpp-python offloads to a GPU; n_gpu_layers other than 0 without it is refused."""
    llama_cpp = import_llama_cpp()
    if n_gpu_layers != 0 and not llama_cpp.llama_supports_gpu_offload():
        raise fail(f"{recipe_path}: key n_gpu_layers", f"{n_gpu_layers} asks for GPU offload, but this "
                   "llama-cpp-python was built without a GPU backend",
                   'build it with CUDA (CMAKE_ARGS="-DGGML_CUDA=on" scripts/install_llamacpp.sh) or set n_gpu_layers: 0')
    return bool(llama_cpp.llama_supports_gpu_offload())


def llama_vocab(path: str, text: str) -> list[int]:
    """The eval text's token ids by llama.cpp's tokenizer (the GGUF's vocabulary)."""
    vocab = import_llama_cpp().Llama(path, vocab_only=True, verbose=False)
    try:
        return vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        vocab.close()


def llama_score(path: str, recipe: dict, ids: list[int], prompt_ids: list, pp_ids: list, n_ctx: int) -> dict:
    """One GGUF: perplexity on the transformers model's ids and windows, greedy generations (their ids and text),
    prompt-processing and generation speed."""
    n_gen = recipe["gen_tokens"]
    llm = open_gguf(path, recipe, n_ctx, logits_all=True)
    try:
        r = gguf_nll(llm, ids, recipe["context"], recipe["stride"])
        out = [greedy_llamacpp(llm, pi, n_gen) for pi in prompt_ids]
        texts = [llm.detokenize(o).decode("utf-8", errors="replace") for o in out]
    finally:
        llm.close()
    fast = open_gguf(path, recipe, n_ctx, logits_all=False)
    try:
        sp = speed(fast, pp_ids, prompt_ids[0], n_gen, recipe.get("repeats", 3))
    finally:
        fast.close()
    return {"ppl": r["ppl"], "nll": r["nll"], "tokens_scored": r["tokens_scored"], "gens": out, "texts": texts, **sp}


class LlamaProcess:
    """One worker process for llama.cpp (multiprocessing's spawn: a fresh interpreter that imports this module,
    which imports no torch), kept for all of a run's GGUFs. A worker that dies (an abort in native code) is one
    line naming its exit, not a BrokenProcessPool traceback."""

    def __enter__(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return self

    def call(self, fn, *args):
        from concurrent.futures.process import BrokenProcessPool

        try:
            return self.pool.submit(fn, *args).result()
        except BrokenProcessPool:
            raise fail("llama.cpp", f"its process ended abnormally during {fn.__name__} (see the log above)",
                       "check the llama-cpp-python build (scripts/install_llamacpp.sh) and the GGUF files") from None

    def __exit__(self, *exc):
        self.pool.shutdown(wait=True, cancel_futures=True)


def run(recipe_path: str, out: str, cfg: dict, gguf_files: dict[str, str] | None = None,
        reference: str | None = None) -> dict:
    from .lib.config import load_recipe

    recipe = load_recipe(recipe_path, cfg)
    with LlamaProcess() as llama:  # a GPU recipe on a build without GPU offload is refused before the other checks
        offload = llama.call(gpu_offload, recipe_path, recipe["n_gpu_layers"])
        ggufs, ref_dir, text = inputs(recipe, recipe_path, cfg, gguf_files, reference)
        return _run(recipe, recipe_path, ggufs, ref_dir, text, out, cfg, llama, offload)


def _run(recipe: dict, recipe_path: str, ggufs: dict, ref_dir: Path, text: str, out: str, cfg: dict,
         llama: LlamaProcess, offload: bool) -> dict:
    import torch

    from .lib.measure import perplexity
    from .lib.models import load_model
    from .lib.tb import TBWriter

    t0 = time.time()
    # token ids: llama.cpp's tokenizer (the GGUF vocab), compared with transformers' on the same text
    base = ggufs[recipe["ggufs"][0]]["gguf_path"]
    ids = llama.call(llama_vocab, base, text)
    ref, tok = load_model(str(ref_dir), dtype=recipe.get("reference_dtype", "float32"))
    device = "cuda" if torch.cuda.is_available() and recipe["n_gpu_layers"] != 0 else "cpu"
    ref.to(device).eval()
    hf_ids = tok(text, add_special_tokens=False)["input_ids"]
    max_tok = recipe.get("max_eval_tokens")
    scored = ids[:max_tok] if max_tok else ids
    ids_t = torch.tensor(scored, dtype=torch.long)
    metrics: dict = {"target": recipe["name"], "stage": "gguf_evaluate", "scale": cfg["scale"],
                     "reference": recipe["reference"], "dataset": recipe["dataset"], "split": recipe["split"],
                     "context": recipe["context"], "stride": recipe["stride"], "threads": recipe["threads"],
                     "n_gpu_layers": recipe["n_gpu_layers"], "eval_text_tokens": len(ids),
                     "eval_tokens_same_as_transformers": int(ids == hf_ids),
                     "gpu_offload_supported": offload}
    # the transformers model on the same ids and windows
    r = perplexity(ref, ids_t, recipe["context"], recipe["stride"], device=device)
    metrics.update({"hf_ppl": r["ppl"], "hf_nll": r["nll"], "tokens_scored": r["tokens_scored"]})

    # prompts: the same ids for every model (transformers' tokenizer, with BOS as the model was trained)
    prompt_ids = [tok(p)["input_ids"] for p in recipe["prompts"]]
    n_gen = recipe["gen_tokens"]
    gens = [{"prompt": p, "prompt_ids": len(pi), "hf": greedy_hf(ref, pi, n_gen)}
            for p, pi in zip(recipe["prompts"], prompt_ids)]
    pp_ids = ids[: recipe["pp_tokens"]]
    if len(pp_ids) < recipe["pp_tokens"]:
        raise fail(f"{recipe_path}: key pp_tokens", f"the eval text has only {len(ids)} tokens", "lower pp_tokens")
    n_ctx = max(recipe["context"], recipe["pp_tokens"], max(len(p) for p in prompt_ids) + n_gen + 1)
    for t, gm in ggufs.items():
        r = llama.call(llama_score, gm["gguf_path"], recipe, scored, prompt_ids, pp_ids, n_ctx)
        if r["tokens_scored"] != metrics["tokens_scored"]:
            raise RuntimeError(f"{t}: scored {r['tokens_scored']} tokens, the transformers model "
                               f"{metrics['tokens_scored']}")
        for g, o, txt in zip(gens, r["gens"], r["texts"]):
            g[t], g[f"{t}_text"] = o, txt
        agree = [next((i for i, (a, b) in enumerate(zip(g["hf"], o)) if a != b), n_gen) for g, o in zip(gens, r["gens"])]
        row = {"ppl": r["ppl"], "nll": r["nll"], "file_bytes": Path(gm["gguf_path"]).stat().st_size,
               "type_output": gm.get("type_output"), "bits_per_weight": gm.get("gguf_bits_per_weight"),
               "greedy_agree_min": min(agree), "greedy_agree_mean": sum(agree) / len(agree),
               **{k: v for k, v in r.items() if k not in ("ppl", "nll", "tokens_scored", "gens", "texts")}}
        metrics.update({f"{t}_{k}": v for k, v in row.items()})
        with TBWriter(Path(out) / "tb" / t) as tb:
            tb.scalars({"eval/ppl": row["ppl"], "eval/loss": row["nll"], "system/tokens_per_s": row["tg_tokens_per_s"],
                        "system/prompt_tokens_per_s": row["pp_tokens_per_s"],
                        "quant/file_mb": row["file_bytes"] / 2**20}, 0)
    metrics.update(ratios(recipe["ggufs"], metrics))
    rows = [{"prompt": g["prompt"], "prompt_tokens": g["prompt_ids"], "transformers": tok.decode(g["hf"]),
             "transformers_ids": g["hf"],
             **{k: v for t in recipe["ggufs"] for k, v in ((t, g[f"{t}_text"]), (f"{t}_ids", g[t]))}}
            for g in gens]
    outp = Path(out)
    write_jsonl(outp / "generations.jsonl", rows)
    metrics["wall_s"] = time.time() - t0
    with TBWriter(outp / "tb" / "summary") as tb:
        tb.final(metrics)
        for i, row in enumerate(rows):
            tb.text("generations", "\n\n".join(f"**{k}**: {v}" for k, v in row.items() if not k.endswith("ids")), i)
    return write_metrics(outp / "metrics.json", metrics)


def ratios(targets: list[str], metrics: dict) -> dict:
    """Each GGUF against the first (the f16 baseline): perplexity, size and generation speed; the baseline
    against the transformers model."""
    b = targets[0]
    out = {}
    for t in targets:
        out[f"{t}_ppl_ratio_vs_{b}"] = metrics[f"{t}_ppl"] / metrics[f"{b}_ppl"]
        out[f"{t}_size_ratio_vs_{b}"] = metrics[f"{t}_file_bytes"] / metrics[f"{b}_file_bytes"]
        out[f"{t}_tg_speedup_vs_{b}"] = metrics[f"{t}_tg_tokens_per_s"] / metrics[f"{b}_tg_tokens_per_s"]
    out[f"{b}_ppl_ratio_vs_hf"] = metrics[f"{b}_ppl"] / metrics["hf_ppl"]
    return out


def _cmd(a) -> None:
    from .lib.config import config_from_args

    files = {}
    for item in a.gguf:
        if "=" not in item:
            raise fail("--gguf", f"{item!r} is not TARGET=FILE", "write e.g. --gguf gguf_q4_0=path/model-Q4_0.gguf")
        k, v = item.split("=", 1)
        files[k] = v
    m = run(a.recipe, a.out, config_from_args(a), gguf_files=files, reference=a.reference)
    base = m["target"]
    print(f"{base}: transformers ppl {m['hf_ppl']:.3f} over {m['tokens_scored']} tokens (context {m['context']})")
    for k in sorted(k[:-4] for k in m if k.endswith("_ppl") and k != "hf_ppl"):
        print(f"  {k}: ppl {m[k + '_ppl']:.3f}, {m[k + '_file_bytes']} bytes, pp {m[k + '_pp_tokens_per_s']:.0f} tok/s, "
              f"tg {m[k + '_tg_tokens_per_s']:.0f} tok/s, greedy agreement with transformers >= {m[k + '_greedy_agree_min']}")


def build_parser() -> argparse.ArgumentParser:
    from .lib.config import stage_parser

    p = stage_parser("quantune.gguf_evaluate", __doc__, _cmd)
    p.add_argument("--gguf", action="append", default=[], help="TARGET=FILE: use this GGUF for a target of ggufs")
    p.add_argument("--reference", default=None, help="use this transformers model directory as the reference")
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
