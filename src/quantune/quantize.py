"""The quantize stage: GPTQ, AWQ and round-to-nearest weight quantization with llm-compressor (or GPTQ with
GPTQModel), load-time LLM.int8 / NF4 with bitsandbytes. The table over the targets is quantune.quantize_compare.

    python -m quantune.quantize --recipe recipes/gptq_opt67b.yaml --out results/gptq_opt67b

A target writes
results/<target>/model/ (safetensors + config + tokenizer, loadable by transformers), metrics.json (perplexity
of the unquantized and of the quantized model with the same context/stride, size on disk, quantization wall
time and peak memory, greedy tokens/s) and tb/. The perplexity reported for the quantized model is measured
on the model reloaded from model/, i.e. on what a user gets.

Backends: auto-gptq and autoawq are archived upstream (their READMEs point to GPTQModel and llm-compressor);
llm-compressor (GPTQModifier, AWQModifier, QuantizationModifier) is the default, GPTQModel is an opt-in backend
for GPTQ in its own env (envs/gptqmodel.yaml), imported only when a recipe says `backend: gptqmodel`.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .lib.common import atomic_dir, fail, run_cli, write_metrics
from .lib.measure import (PeakMemory, first_window_logits, generation_speed, kl_divergence, kl_reference, perplexity,
                          release_memory, safetensors_bytes, sign_split, split_metrics, weights_bytes)
from .lib.models import count_parameters, load_model, pick_device, set_cpu_threads, to_host
from .lib.quant_arch import check_against_model, quantized_linears
from .lib.quant_backends import bnb_config, quantize_gptqmodel, quantize_llmcompressor
from .lib.quant_data import calibration_samples, eval_ids

# method -> backends that implement it (the first is the default)
METHOD_BACKENDS = {
    "gptq": ("llmcompressor", "gptqmodel"),
    "awq": ("llmcompressor",),
    "rtn": ("llmcompressor",),
    "bnb_int8": ("bitsandbytes",),
    "bnb_nf4": ("bitsandbytes",),
}
# weight bits each backend can store for a method: compressed-tensors packs 1..8-bit integers into int32
# (pack-quantized); GPTQModel's GPTQ kernels pack 2, 3, 4 and 8 bits; bitsandbytes is int8 or 4-bit NF4/FP4
SUPPORTED_BITS = {
    ("llmcompressor", "gptq"): (2, 3, 4, 5, 6, 7, 8),
    ("llmcompressor", "awq"): (2, 3, 4, 5, 6, 7, 8),
    ("llmcompressor", "rtn"): (2, 3, 4, 5, 6, 7, 8),
    ("gptqmodel", "gptq"): (2, 3, 4, 8),
    ("bitsandbytes", "bnb_int8"): (8,),
    ("bitsandbytes", "bnb_nf4"): (4,),
}
CALIBRATED = ("gptq", "awq")  # methods that need calibration data (rtn and bitsandbytes are data-free)
AWQ_KEYS = ("awq_mappings", "duo_scaling", "n_grid")
GPTQ_KEYS = ("damp", "act_order", "block_size")
GROUPED_KEYS = ("group_size", "zero_point", "ignore")
BNB_INT8_KEYS = ("int8_threshold",)
BNB_NF4_KEYS = ("quant_type", "double_quant", "compute_dtype")
LLMC_KEYS = ("sign_split",)  # measured only on llm-compressor's in-memory model
CALIB_KEYS = ("calibration_dataset", "calibration_split", "calibration_samples", "calibration_seq_len",
              "calibration_batch_size")


def backend_of(recipe: dict) -> str:
    return recipe.get("backend") or METHOD_BACKENDS[recipe["method"]][0]


# ================================================================ checks (no heavy imports: run at parse time)

def check_recipe(recipe: dict, where: str) -> None:
    """Checks that need no model: method/backend pairing, bits the backend can store, keys that belong to
    another method, calibration settings. Raised as one line naming the recipe file and key."""
    method, backend = recipe["method"], backend_of(recipe)
    if backend not in METHOD_BACKENDS[method]:
        raise fail(f"{where}: key backend", f"method {method} has no backend {backend!r}",
                   f"use one of: {', '.join(METHOD_BACKENDS[method])}")
    bits = recipe["bits"]
    ok = SUPPORTED_BITS[(backend, method)]
    if bits not in ok:
        raise fail(f"{where}: key bits", f"{bits} bits is outside what backend {backend} supports for {method}",
                   f"use one of: {', '.join(map(str, ok))}")
    foreign = {
        "gptq": AWQ_KEYS + BNB_INT8_KEYS + BNB_NF4_KEYS,
        "awq": GPTQ_KEYS + BNB_INT8_KEYS + BNB_NF4_KEYS,
        "rtn": AWQ_KEYS + GPTQ_KEYS + BNB_INT8_KEYS + BNB_NF4_KEYS + CALIB_KEYS + ("speed",),
        "bnb_int8": AWQ_KEYS + GPTQ_KEYS + GROUPED_KEYS + BNB_NF4_KEYS + CALIB_KEYS + LLMC_KEYS + ("speed",),
        "bnb_nf4": AWQ_KEYS + GPTQ_KEYS + GROUPED_KEYS + BNB_INT8_KEYS + CALIB_KEYS + LLMC_KEYS + ("speed",),
    }[method]
    for key in foreign:
        if key in recipe:
            raise fail(f"{where}: key {key}", f"method {method} does not use it", "remove the key")
    if method in ("gptq", "awq", "rtn") and "group_size" not in recipe:
        raise fail(f"{where}: key group_size", f"method {method} needs a group size",
                   "add group_size: 128 (or -1 for one scale per output channel)")
    gs = recipe.get("group_size")
    if gs is not None and gs != -1 and gs < 1:
        raise fail(f"{where}: key group_size", f"{gs} is not a group size", "use a positive size (e.g. 128) or -1")
    if method in CALIBRATED:
        for key in ("calibration_dataset", "calibration_samples", "calibration_seq_len"):
            if key not in recipe:
                raise fail(f"{where}: key {key}", f"method {method} calibrates on data and needs it", "add the key")
    if backend == "gptqmodel" and "sign_split" in recipe:
        raise fail(f"{where}: key sign_split", "it is measured on llm-compressor's in-memory model only",
                   "remove the key or set backend: llmcompressor")
    if backend == "gptqmodel" and "speed" in recipe:
        raise fail(f"{where}: key speed", "the speed modes are llm-compressor's (GPTQModel has its own options)",
                   "remove the key or set backend: llmcompressor")
    if backend == "gptqmodel" and recipe.get("act_order") in ("static", "weight"):
        raise fail(f"{where}: key act_order", f"GPTQModel has no {recipe['act_order']!r} activation order",
                   "use none or group (GPTQModel's desc_act)")
    if recipe["stride"] > recipe["context"]:
        raise fail(f"{where}: key stride", f"stride {recipe['stride']} is larger than context {recipe['context']}",
                   "use a stride of at most the context")


# the defaults of the keys a method reads, per backend; defaults every method shares are in the schema
_GROUPED_DEFAULTS = {"zero_point": False, "ignore": ["lm_head"]}
_CALIB_DEFAULTS = {"calibration_split": "train", "calibration_batch_size": 1}
METHOD_DEFAULTS = {
    ("llmcompressor", "gptq"): {**_GROUPED_DEFAULTS, **_CALIB_DEFAULTS, "act_order": "static", "damp": 0.01,
                                "block_size": 128, "sign_split": True, "speed": "seed"},
    ("gptqmodel", "gptq"): {**_GROUPED_DEFAULTS, **_CALIB_DEFAULTS, "act_order": "none", "damp": 0.01},
    ("llmcompressor", "awq"): {**_GROUPED_DEFAULTS, **_CALIB_DEFAULTS, "duo_scaling": True, "n_grid": 20,
                               "sign_split": True, "speed": "seed"},
    ("llmcompressor", "rtn"): {**_GROUPED_DEFAULTS, "sign_split": True},
    ("bitsandbytes", "bnb_int8"): {"int8_threshold": 6.0},
    ("bitsandbytes", "bnb_nf4"): {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
}


def check(recipe: dict, cfg: dict, where: str) -> dict:
    """The quantize stage's recipe check (config.load_recipe calls it): check_recipe, then the method's defaults."""
    check_recipe(recipe, where)
    backend = backend_of(recipe)
    return {**METHOD_DEFAULTS[(backend, recipe["method"])], **recipe, "backend": backend}


# ================================================================ the quantize stage

def _check_backend_installed(recipe: dict, where: str) -> None:
    import importlib.util

    backend = backend_of(recipe)
    module = {"llmcompressor": "llmcompressor", "gptqmodel": "gptqmodel", "bitsandbytes": "bitsandbytes"}[backend]
    if importlib.util.find_spec(module) is None:
        env = "envs/gptqmodel.yaml" if backend == "gptqmodel" else "envs/quantize.yaml"
        raise fail(f"{where}: key backend", f"backend {backend} is selected but the {module} package is not installed",
                   f"run with --use-conda: {env}" + (" (on a CUDA machine)" if backend == "gptqmodel" else ""))
    if backend == "gptqmodel":
        import torch

        if not torch.cuda.is_available():
            raise fail(f"{where}: key backend", "GPTQModel quantizes with CUDA kernels and no GPU is visible",
                       "run on a GPU node (resources: gpu=1) or set backend: llmcompressor")


@dataclass
class Job:
    """A quantize run as checked before any weight is loaded."""
    recipe: dict
    where: str
    m: dict
    info: dict
    device: str
    dtype: str
    tok: Any
    samples: dict | None
    ids: Any


def prepare(recipe_path: str, cfg: dict) -> Job:
    """Every check before any work (the recipe's own were made by load_recipe): backend installed, the
    architecture on the meta device, calibration and evaluation data."""
    from transformers import AutoTokenizer

    from .lib.config import load_recipe, resolve_model
    from .lib.models import meta_model

    where = str(recipe_path)
    recipe = load_recipe(recipe_path, cfg)
    if recipe["stage"] != "quantize":
        raise fail(f"{where}: key stage", f"{recipe['stage']!r} is not quantize",
                   f"run it with python -m quantune.{recipe['stage']}")
    _check_backend_installed(recipe, where)
    m = resolve_model(cfg, recipe["model"], where, must_exist=True)
    info = check_against_model(recipe, meta_model(m["source"], trust_remote_code=m["trust_remote_code"]), where)
    device = pick_device(recipe, where)
    set_cpu_threads()
    tok = AutoTokenizer.from_pretrained(m["source"], trust_remote_code=m["trust_remote_code"])
    samples = calibration_samples(cfg, recipe, tok, where) if recipe["method"] in CALIBRATED else None
    ids = eval_ids(cfg, recipe, tok, where)
    if ids.numel() < recipe["context"]:
        raise fail(f"{where}: key context", f"the evaluation text has {ids.numel()} tokens, fewer than one window",
                   "lower context or give more evaluation text")
    return Job(recipe=recipe, where=where, m=m, info=info, device=device,
               dtype=recipe["dtype"] if device == "cuda" else "float32", tok=tok, samples=samples, ids=ids)


def measure_base(model, job: Job) -> dict:
    """The unquantized model's numbers (the "before"): size, parameters, perplexity, KL reference, speed."""
    r = job.recipe
    return {"bytes": weights_bytes(model), "params": count_parameters(model),
            "ppl": perplexity(model, job.ids, r["context"], r["stride"]),
            "kl_ref": kl_reference(model, job.ids, r["context"], r["kl_tokens"]),
            "gen": generation_speed(model, job.tok, r["prompt"], r["gen_tokens"]) if r["gen_tokens"] else {}}


def quantize_in_memory(model, job: Job, save_dir: Path) -> dict:
    """llm-compressor: quantize the loaded model, measure sign_split on it, save it compressed."""
    r, m = job.recipe, job.m
    if r["method"] in ("gptq", "awq") and m["local"]:
        model.config._name_or_path = m["source"]  # llm-compressor re-reads the config from here
    original = None
    if r["sign_split"] and r["method"] == "gptq":  # GPTQ overwrites the weights it rounds: keep them (CPU)
        original = {n: mod.weight.detach().to("cpu", copy=True) for n, mod in quantized_linears(model, list(r["ignore"]))}
    offload = offloads_model(r, job.device)
    moved = 0.0
    pinned = None
    if offload:  # llm-compressor's sequential pipeline then onloads one decoder layer at a time
        t0 = time.perf_counter()
        pinned = to_host(model)
        release_memory()
        moved += time.perf_counter() - t0
    with PeakMemory() as pk:
        extra = quantize_llmcompressor(model, job.tok, r, job.samples, job.info.get("awq_mappings"), job.device)
    if offload:  # back on the GPU for the measurements (outside the peak: evaluating needs it there anyway)
        from compressed_tensors.offload import remove_dispatch

        t0 = time.perf_counter()
        remove_dispatch(model)  # (onload_tensors=True would onload lm_head and its tied embeddings apart)
        model.to(job.device)
        moved += time.perf_counter() - t0
    extra.update(quant_move_seconds=moved, **speed_changes(r, extra, offload, pinned))
    pk.seconds += moved
    ref_logits = first_window_logits(model, job.ids, r["context"])
    split = {}
    if r["sign_split"]:  # before the save, which compresses the in-memory weights
        split = sign_split(model, job.ids, r["context"], r["stride"], original)
        original = None
    model.save_pretrained(save_dir, save_compressed=True)
    job.tok.save_pretrained(save_dir)
    return {"pk": pk, "ref_logits": ref_logits, "format": "compressed-tensors (pack-quantized)", "extra": extra,
            "split": split}


def offloads_model(recipe: dict, device: str) -> bool:
    """The fast mode on a GPU keeps a calibrated method's model on the CPU during oneshot, so the peak GPU memory is
    a decoder layer and its calibration batch, not the whole model (the move out and back is counted in
    quant_seconds as quant_move_seconds)."""
    return recipe.get("speed") == "fast" and device == "cuda" and recipe["method"] in CALIBRATED


def speed_changes(recipe: dict, extra: dict, offload: bool, pinned: bool | None) -> dict:
    """What the recipe's speed mode changed against llm-compressor's own call (metrics' speed_changes)."""
    if recipe.get("speed") != "fast" or recipe["method"] not in CALIBRATED:
        return {"speed": recipe.get("speed", "seed"), "speed_changes": {}}
    changes = {"calibration_batch_size": extra.get("calibration_batch_size")}
    if recipe["method"] == "gptq":
        changes["hessians"] = f"{extra['hessian_products']}; {extra['hessians_shared']} layers share another's"
    if recipe["method"] == "awq":
        changes["grid_search_loss"] = extra.get("awq_grid_loss")
        changes["grid_search_attention"] = "sdpa" if extra.get("awq_sdpa_searches") else "eager (the calibration's)"
    if offload:
        changes.update(model_during_oneshot=f"cpu ({'page-locked' if pinned else 'pageable'} memory), one decoder "
                                            "layer onloaded at a time",
                       offloaded_weight_updates="cast to the weight's dtype on the GPU, then copied to the CPU",
                       activations_between_layers=extra.get("_activations_on"))
    return {"speed": "fast", "speed_changes": changes}


def quantize_on_load(job: Job, save_dir: Path) -> dict:
    """GPTQModel (loads the checkpoint itself) or bitsandbytes (quantizes while loading), then saved."""
    r, m = job.recipe, job.m
    if backend_of(r) == "gptqmodel":
        with PeakMemory() as pk:
            quantize_gptqmodel(m["source"], job.tok, r, job.samples, save_dir, job.where)
        return {"pk": pk, "ref_logits": None, "format": "gptq (GPTQModel)", "extra": {}, "split": {}}
    with PeakMemory() as pk:
        model, _ = load_model(m["source"], trust_remote_code=m["trust_remote_code"], dtype=job.dtype,
                              quantization_config=bnb_config(r), device_map={"": job.device})
    # save before any forward pass: with bitsandbytes 0.50.2 on CPU, a forward pass first changes what
    # save_pretrained writes for NF4 (the reloaded model's logits then differ by ~0.06; saved first: 0.0)
    model.save_pretrained(save_dir)
    job.tok.save_pretrained(save_dir)
    ref_logits = first_window_logits(model, job.ids, r["context"])
    fmt = f"bitsandbytes {'int8' if r['method'] == 'bnb_int8' else r['quant_type']}"
    return {"pk": pk, "ref_logits": ref_logits, "format": fmt, "extra": {}, "split": {}}


def measure_saved(save_dir: Path, job: Job, base: dict, q: dict) -> dict:
    """The saved model, reloaded: what a user gets."""
    r = job.recipe
    qmodel, qtok = load_model(str(save_dir), trust_remote_code=job.m["trust_remote_code"],
                              device_map={"": job.device} if r["method"].startswith("bnb") or job.device == "cuda"
                              else None)
    qmodel.eval()
    reload_diff = None
    if q["ref_logits"] is not None:
        reload_diff = (first_window_logits(qmodel, job.ids, r["context"]) - q["ref_logits"]).abs().max().item()
    return {"ppl": perplexity(qmodel, job.ids, r["context"], r["stride"]),
            "kl": kl_divergence(qmodel, job.ids, r["context"], base["kl_ref"]), "reload_diff": reload_diff,
            "gen": generation_speed(qmodel, qtok, r["prompt"], r["gen_tokens"]) if r["gen_tokens"] else {},
            "size": safetensors_bytes(save_dir)}


def quantize_metrics(job: Job, base: dict, q: dict, after: dict) -> dict:
    r, pk, info, samples = job.recipe, q["pk"], job.info, job.samples
    quant, gen = after["ppl"], after["gen"]
    return {
        "target": r["name"], "stage": "quantize", "scale": r["scale"], "model": r["model"],
        "model_source": job.m["source"], "architecture": info["architecture"], "method": r["method"],
        "backend": backend_of(r), "format": q["format"], "bits": r["bits"], "group_size": r.get("group_size"),
        "zero_point": r.get("zero_point"), "act_order": r.get("act_order"), "damp": r.get("damp"),
        "quantized_layers": info.get("quantized_layers"), "device": job.device, "dtype": job.dtype,
        "calibration_dataset": r.get("calibration_dataset"),
        "calibration_samples": len(samples["input_ids"]) if samples else None,
        "calibration_seq_len": r.get("calibration_seq_len"),
        "calibration_pool_tokens": samples["pool_tokens"] if samples else None,
        "eval_dataset": r["eval_dataset"], "eval_split": r["eval_split"],
        "eval_context": r["context"], "eval_stride": r["stride"], "eval_tokens_scored": quant["tokens_scored"],
        "ppl_base": base["ppl"]["ppl"], "ppl_quant": quant["ppl"], "ppl_delta": quant["ppl"] - base["ppl"]["ppl"],
        "ppl_ratio": quant["ppl"] / base["ppl"]["ppl"], **after["kl"], **split_metrics(q["split"], base["ppl"]),
        "size_bytes_base": base["bytes"], "size_bytes": after["size"], "size_ratio": after["size"] / base["bytes"],
        "quant_seconds": pk.seconds, "quant_peak_rss_mb": pk.rss_mb, "quant_peak_rss_scope": pk.rss_scope,
        "quant_peak_gpu_mb": pk.gpu_mb, "quant_peak_mem_mb": pk.gpu_mb if pk.gpu_mb is not None else pk.rss_mb,
        "reload_max_abs_logit_diff": after["reload_diff"],
        "gen_tokens": gen.get("gen_tokens"), "gen_tokens_per_s": gen.get("gen_tokens_per_s"),
        "gen_tokens_per_s_base": base["gen"].get("gen_tokens_per_s"), "gen_text": gen.get("gen_text"),
        **base["params"], **{k: v for k, v in q["extra"].items() if not k.startswith("_")},
    }


def write_tb(tb_dir: Path, metrics: dict, q: dict, after: dict) -> None:
    from .lib.tb import TBWriter

    with TBWriter(tb_dir) as tb:
        for i, loss in enumerate(q["extra"].get("_gptq_losses", [])):
            tb.scalars({"quant/gptq_layer_loss": loss}, i, system=False)
        tb.scalars({"quant/ppl_base": metrics["ppl_base"], "quant/ppl": metrics["ppl_quant"],
                    "quant/ppl_delta": metrics["ppl_delta"], "quant/kl_vs_base": metrics["kl_vs_base"],
                    **({"quant/ppl_even": metrics["ppl_even"], "quant/ppl_mirror": metrics["ppl_mirror"],
                        "quant/nll_odd": metrics["nll_odd"]} if "ppl_even" in metrics else {}),
                    "quant/bits": metrics["bits"],
                    "quant/size_mb": metrics["size_bytes"] / 2**20, "quant/size_ratio": metrics["size_ratio"],
                    "quant/seconds": metrics["quant_seconds"], "quant/peak_mem_mb": metrics["quant_peak_mem_mb"],
                    "eval/ppl": metrics["ppl_quant"], "eval/loss": after["ppl"]["nll"],
                    "system/gen_tokens_per_s": metrics["gen_tokens_per_s"]}, 0)
        tb.final(metrics)
        tb.text("generation", after["gen"].get("gen_text", ""))


def run(recipe_path: str, out: str, cfg: dict) -> dict:
    job = prepare(recipe_path, cfg)
    # from here on the tokenizer as load_model gives it (a pad token where the model has none), as it is saved
    model, job.tok = load_model(job.m["source"], trust_remote_code=job.m["trust_remote_code"], dtype=job.dtype)
    model.to(job.device)
    base = measure_base(model, job)
    with atomic_dir(Path(out)) as tmp:
        save_dir = tmp / "model"
        if backend_of(job.recipe) == "llmcompressor":
            q = quantize_in_memory(model, job, save_dir)
            model = None
        else:
            model = None  # GPTQModel and bitsandbytes load the checkpoint themselves: free this copy first
            release_memory()
            q = quantize_on_load(job, save_dir)
        release_memory()
        after = measure_saved(save_dir, job, base, q)
        metrics = quantize_metrics(job, base, q, after)
        write_tb(tmp / "tb", metrics, q, after)
        return write_metrics(tmp / "metrics.json", metrics)


# ================================================================ CLI

def _cmd(a) -> None:
    from .lib.config import config_from_args

    m = run(a.recipe, a.out, config_from_args(a))
    print(f"{m['target']}: {m['method']} {m['bits']}-bit ({m['backend']}): ppl {m['ppl_base']:.3f} -> "
          f"{m['ppl_quant']:.3f} (context {m['eval_context']}, stride {m['eval_stride']}), "
          f"{m['size_bytes'] / 2**20:.1f} MB, quantized in {m['quant_seconds']:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    from .lib.config import stage_parser

    p = stage_parser("quantune.quantize", __doc__, _cmd)
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
