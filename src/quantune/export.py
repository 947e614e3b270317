"""Export: merge a LoRA adapter into its base, convert to GGUF with llama.cpp's own converter, and quantize
the GGUF with llama.cpp (through llama-cpp-python). Seed 004's chain; the evaluation is quantune.gguf_eval.

    python -m quantune.export merge    --recipe recipes/merge_lora_qwen.yaml --out results/merge_lora_qwen
    python -m quantune.export convert  --recipe recipes/gguf_f16_qwen.yaml   --out results/gguf_f16_qwen
    python -m quantune.export quantize --recipe recipes/gguf_q4_0.yaml       --out results/gguf_q4_0

Each step reads the artifact of the target its recipe names (`adapter`, `merged`, `gguf`) from the results
directory of the current scale; `--adapter/--merged/--gguf DIR_OR_FILE` point a step at anything else.
The converter (convert_hf_to_gguf.py of the llama.cpp tree inside the pinned llama-cpp-python sdist) is
installed by scripts/install_llamacpp.sh into <venv>/share/llama.cpp/; QUANTUNE_LLAMACPP_DIR overrides.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import atomic_dir, fail, run_cli, write_json, write_metrics

ROOT = Path(__file__).resolve().parents[2]
INSTALL_HINT = "run scripts/install_llamacpp.sh (installs llama-cpp-python, gguf and the converter into .venv)"

# llama.cpp names (llama.h: enum llama_ftype LLAMA_FTYPE_MOSTLY_<X>, ggml.h: enum ggml_type GGML_TYPE_<X>)
FTYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
          "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
TENSOR_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                "Q6_K"]
CONVERT_OUTTYPES = ["f32", "f16", "bf16", "q8_0"]


# ================================================================ shared helpers

def target_dir(cfg: dict, target: str) -> Path:
    from .config import results_dir

    return Path(results_dir(cfg)) / target


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise fail("llama_cpp", "llama-cpp-python is not installed", INSTALL_HINT) from None
    return llama_cpp


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise fail("gguf", "the gguf package is not installed", INSTALL_HINT) from None
    return gguf


def converter_dir() -> Path:
    """The llama.cpp tree holding convert_hf_to_gguf.py, of the same release as the installed binding."""
    import importlib.metadata

    env = os.environ.get("QUANTUNE_LLAMACPP_DIR")
    cands = [Path(env)] if env else [Path(sys.prefix) / "share" / "llama.cpp", ROOT / ".venv" / "share" / "llama.cpp"]
    for d in cands:
        if (d / "convert_hf_to_gguf.py").is_file():
            break
    else:
        raise fail(f"{cands[0]}/convert_hf_to_gguf.py", "llama.cpp's converter is not installed", INSTALL_HINT)
    try:
        binding = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        raise fail("llama_cpp", "llama-cpp-python is not installed", INSTALL_HINT) from None
    stamp = (d / "VERSION").read_text().strip() if (d / "VERSION").is_file() else "unknown"
    if stamp != f"llama-cpp-python=={binding}":
        raise fail(f"{d}/VERSION", f"converter is from {stamp}, the installed binding is llama-cpp-python {binding}",
                   f"{INSTALL_HINT}; it replaces the converter with the matching one")
    return d


def read_gguf(path: str | Path) -> dict:
    """Read a GGUF back with the gguf package: architecture, tokenizer, and every tensor's type and size."""
    gguf = import_gguf()
    r = gguf.GGUFReader(str(path))

    def field(name):
        f = r.fields.get(name)
        if f is None or not f.data:
            return None
        v = f.parts[f.data[0]]
        return bytes(v).decode("utf-8") if f.types and f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]

    tensors = [{"name": t.name, "type": t.tensor_type.name, "shape": [int(x) for x in t.shape],
                "n_elements": int(t.n_elements), "n_bytes": int(t.n_bytes)} for t in r.tensors]
    return {"architecture": field("general.architecture"), "file_type": field("general.file_type"),
            "tokenizer_model": field("tokenizer.ggml.model"), "tokenizer_pre": field("tokenizer.ggml.pre"),
            "n_vocab": len(r.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in r.fields else None,
            "tensors": tensors}


def tensor_summary(info: dict, path: str | Path) -> dict:
    """Flat numbers for metrics.json: which type each role got, counts per type, sizes."""
    tensors = info["tensors"]
    by_name = {t["name"]: t for t in tensors}
    out: dict = {"gguf_file_bytes": Path(path).stat().st_size, "gguf_tensors": len(tensors),
                 "gguf_tensor_bytes": sum(t["n_bytes"] for t in tensors),
                 "gguf_weights": sum(t["n_elements"] for t in tensors),
                 "gguf_architecture": info["architecture"], "gguf_tokenizer_model": info["tokenizer_model"],
                 "gguf_n_vocab": info["n_vocab"]}
    out["gguf_bits_per_weight"] = 8 * out["gguf_tensor_bytes"] / max(out["gguf_weights"], 1)
    for t in tensors:
        out[f"n_tensors_{t['type']}"] = out.get(f"n_tensors_{t['type']}", 0) + 1
        out[f"weights_{t['type']}"] = out.get(f"weights_{t['type']}", 0) + t["n_elements"]
    out["type_token_embd"] = by_name.get("token_embd.weight", {}).get("type")
    # tied embeddings (Qwen2.5-1.5B, the tiny llama): no output.weight, token_embd also computes the logits
    out["output_tied"] = "output.weight" not in by_name
    out["type_output"] = (by_name.get("output.weight") or by_name.get("token_embd.weight") or {}).get("type")
    out["output_tensor"] = "token_embd.weight" if out["output_tied"] else "output.weight"
    layer_types = sorted({t["type"] for t in tensors if t["name"].startswith("blk.") and len(t["shape"]) > 1})
    out["types_layer_matrices"] = ",".join(layer_types)
    return out


def _write_tb(out: Path, scalars: dict, metrics: dict) -> None:
    from .tb import TBWriter

    with TBWriter(out / "tb") as tb:
        tb.scalars(scalars, 0)
        tb.final(metrics)


# ================================================================ merge

def find_adapter(path: Path) -> Path:
    """A PEFT adapter directory: `path` itself, or the shallowest folder under it with adapter_config.json."""
    if (path / "adapter_config.json").is_file():
        return path
    found = sorted(path.rglob("adapter_config.json"), key=lambda p: (len(p.parts), str(p))) if path.is_dir() else []
    if not found:
        raise fail(str(path), "no PEFT adapter here (adapter_config.json missing)",
                   "build the adapter target first (snakemake <adapter target>) or pass --adapter DIR")
    return found[0].parent


def _modules(tm) -> str:
    return ",".join(sorted(tm)) if isinstance(tm, (set, list, tuple)) else str(tm)


def _same_base(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    if pa.exists() != pb.exists():
        return True  # a local copy of a hub model: cannot tell, the shapes decide
    return a.rstrip("/") == b.rstrip("/")


def sentencepiece_model_for(source: str, family: str, cfg: dict) -> Path | None:
    """tokenizer.model of a model: its own, or (tiny world) the SentencePiece model its tokenizer was saved
    from, when that tokenizer's tokenizer.json is byte-identical to the model's."""
    own = Path(source) / "tokenizer.model"
    if own.is_file():
        return own
    from .config import tiny_world_dir
    from .models import TOKENIZER_OF_FAMILY

    tok_dir = Path(tiny_world_dir(cfg)) / "tokenizers" / TOKENIZER_OF_FAMILY.get(family, "")
    cand = tok_dir / "tokenizer.model"
    tj_model, tj_tok = Path(source) / "tokenizer.json", tok_dir / "tokenizer.json"
    if cand.is_file() and tj_model.is_file() and tj_tok.is_file() and sha256_file(tj_model) == sha256_file(tj_tok):
        return cand
    return None


def check_text(cfg: dict, recipe: dict) -> str:
    from .config import resolve_dataset
    from .data import join_text, load_split

    return join_text(load_split(resolve_dataset(cfg, recipe["check_dataset"], key="check_dataset"),
                                recipe.get("check_split", "test")))


def merge(recipe_path: str, out: str, cfg: dict, adapter: str | None = None) -> dict:
    import torch
    from peft import PeftConfig, PeftModel

    from .config import load_recipe, resolve_model
    from .models import count_parameters, load_model

    recipe = load_recipe(recipe_path, cfg)
    m = resolve_model(cfg, recipe["model"], must_exist=True)
    adapter_dir = find_adapter(Path(adapter) if adapter else target_dir(cfg, recipe["adapter"]))
    pcfg = PeftConfig.from_pretrained(str(adapter_dir))
    if pcfg.peft_type.value != "LORA":
        raise fail(f"{adapter_dir}/adapter_config.json", f"peft_type {pcfg.peft_type.value} is not LORA",
                   "merge a LoRA adapter (the lora_sft stage writes one)")
    if pcfg.base_model_name_or_path and not _same_base(pcfg.base_model_name_or_path, m["source"]):
        raise fail(f"{recipe_path}: key model", f"the adapter was trained on {pcfg.base_model_name_or_path}, "
                   f"the recipe's base is {m['source']}", "use the adapter's base model (or the adapter of this base)")
    text = check_text(cfg, recipe)  # read before any model is loaded: a missing data set fails at once
    t0 = time.time()
    model, tok = load_model(m["source"], trust_remote_code=m["trust_remote_code"], dtype=recipe["dtype"])
    device = "cuda" if torch.cuda.is_available() and recipe.get("device", "auto") != "cpu" else "cpu"
    model.to(device)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    peft_model.eval()
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, : recipe["check_tokens"]]
    ids = ids.to(device)
    with torch.no_grad():
        adapted = peft_model(ids).logits.float()
        with peft_model.disable_adapter():
            base = peft_model(ids).logits.float()
        merged = peft_model.merge_and_unload()
        merged.eval()
        merged_logits = merged(ids).logits.float()
    merge_diff = (merged_logits - adapted).abs().max().item()
    adapter_delta = (adapted - base).abs().max().item()
    if merge_diff > recipe["logit_tolerance"]:
        raise fail(f"{recipe_path}: key logit_tolerance", f"merged logits differ from base+adapter by "
                   f"{merge_diff:.3g} > {recipe['logit_tolerance']}", "merge in float32 (key dtype) or check the adapter")
    spm = sentencepiece_model_for(m["source"], m["family"], cfg)
    outp = Path(out)
    with atomic_dir(outp / "model") as tmp:
        merged.to(_torch_dtype(recipe["save_dtype"])).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if spm is not None:
            shutil.copyfile(spm, tmp / "tokenizer.model")
    metrics = {"target": recipe["name"], "stage": "merge", "scale": cfg["scale"], "model": recipe["model"],
               "model_source": m["source"], "adapter_dir": str(adapter_dir), "lora_r": pcfg.r,
               "lora_alpha": pcfg.lora_alpha, "lora_target_modules": _modules(pcfg.target_modules),
               "merge_dtype": recipe["dtype"], "save_dtype": recipe["save_dtype"], "device": device,
               "check_tokens": int(ids.shape[1]), "merge_max_abs_logit_diff": merge_diff,
               "adapter_max_abs_logit_delta": adapter_delta, "logit_tolerance": recipe["logit_tolerance"],
               "tokenizer_model_copied_from": str(spm) if spm else "none",
               "merged_bytes": sum(f.stat().st_size for f in (outp / "model").iterdir() if f.is_file()),
               "wall_s": time.time() - t0, **count_parameters(merged)}
    _write_tb(outp, {"quant/merge_max_abs_logit_diff": merge_diff,
                     "quant/adapter_max_abs_logit_delta": adapter_delta}, metrics)
    return write_metrics(outp / "metrics.json", metrics)


# ================================================================ convert (HF -> GGUF)

def hf_vs_llamacpp_tokens(gguf_path: str | Path, hf_dir: str | Path, texts: list[str]) -> dict:
    """Tokenize the same texts with transformers' tokenizer and llama.cpp's (from the GGUF's vocab): a wrong
    vocab mapping (e.g. a pre-tokenizer forced onto an unknown hash) changes tokenization silently."""
    from transformers import AutoTokenizer

    llama_cpp = import_llama_cpp()
    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    agree, first_diff = 0, ""
    n_tokens = 0
    for t in texts:
        a = hf(t, add_special_tokens=False)["input_ids"]
        b = llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)
        n_tokens += len(a)
        if a == b:
            agree += 1
        elif not first_diff:
            i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            first_diff = f"text {texts.index(t)} token {i}: hf {a[i:i + 5]} llama.cpp {b[i:i + 5]}"
    llm.close()
    return {"tokenizer_check_texts": len(texts), "tokenizer_check_agree": agree,
            "tokenizer_check_tokens": n_tokens, "tokenizer_check_first_diff": first_diff or "none"}


def check_texts(cfg: dict, recipe: dict, n: int) -> list[str]:
    from .config import resolve_dataset
    from .data import load_split

    rows = load_split(resolve_dataset(cfg, recipe["check_dataset"], key="check_dataset"),
                      recipe.get("check_split", "test"))
    return [r["text"] for r in rows if r["text"].strip()][:n]


def convert(recipe_path: str, out: str, cfg: dict, merged: str | None = None) -> dict:
    from .config import load_recipe

    recipe = load_recipe(recipe_path, cfg)
    src = Path(merged) if merged else target_dir(cfg, recipe["merged"]) / "model"
    if not (src / "config.json").is_file():
        raise fail(str(src), "no transformers model here (config.json missing)",
                   f"build {recipe['merged']} first (snakemake {recipe['merged']}) or pass --merged DIR")
    conv = converter_dir()
    texts = check_texts(cfg, recipe, recipe["check_texts"])
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    final = outp / f"model-{recipe['outtype']}.gguf"
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=outp)
    os.close(fd)
    t0 = time.time()
    cmd = [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(src), "--outfile", tmp,
           "--outtype", recipe["outtype"]]
    print("+", " ".join(cmd), flush=True)
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter's own gguf-py
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stdout.write(r.stdout[-20000:])
    sys.stdout.write(r.stderr[-20000:])
    if r.returncode != 0:
        os.unlink(tmp)
        last = next((l for l in reversed((r.stderr or r.stdout).strip().splitlines()) if l.strip()), "")
        raise fail(str(src), f"convert_hf_to_gguf.py failed ({r.returncode}): {last[:300]}",
                   "see the log above; the model's architecture and tokenizer must be ones the converter accepts")
    convert_s = time.time() - t0
    try:  # checked before the file takes its final name: a failed check leaves no GGUF behind
        info = read_gguf(tmp)
        tokcheck = hf_vs_llamacpp_tokens(tmp, src, texts)
        bad = tokcheck["tokenizer_check_texts"] - tokcheck["tokenizer_check_agree"]
        if bad and recipe["require_same_tokens"]:
            raise fail(f"{recipe_path}: key require_same_tokens", f"llama.cpp tokenizes {bad} of "
                       f"{tokcheck['tokenizer_check_texts']} held-out texts differently from transformers "
                       f"({tokcheck['tokenizer_check_first_diff']})",
                       "give the model a tokenizer the converter maps exactly (a SentencePiece tokenizer.model "
                       "beside tokenizer.json, or a BPE whose pre-tokenizer hash llama.cpp knows)")
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    write_json(outp / "tensor_types.json", info)
    metrics = {"target": recipe["name"], "stage": "gguf_convert", "scale": cfg["scale"], "merged": str(src),
               "outtype": recipe["outtype"], "gguf_path": str(final), "converter": str(conv),
               "converter_release": (conv / "VERSION").read_text().strip(), "convert_seconds": convert_s,
               **tensor_summary(info, final), **tokcheck}
    _write_tb(outp, {"quant/gguf_file_mb": metrics["gguf_file_bytes"] / 2**20,
                     "quant/bits_per_weight": metrics["gguf_bits_per_weight"]}, metrics)
    return write_metrics(outp / "metrics.json", metrics)


# ================================================================ quantize (GGUF -> GGUF)

def quantize_params(recipe: dict, where: str):
    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{recipe['ftype']}", None)
    if ftype is None:
        raise fail(f"{where}: key ftype", f"{recipe['ftype']} is not in this llama-cpp-python", f"use one of {FTYPES}")
    params.ftype = ftype
    for key in ("output_tensor_type", "token_embedding_type"):
        if recipe.get(key):
            params.__setattr__(key, getattr(llama_cpp, f"GGML_TYPE_{recipe[key]}"))
    params.pure = bool(recipe.get("pure", False))
    params.nthread = int(recipe.get("threads", 0))
    return params


def quantize_file(src: str | Path, dst: str | Path, recipe: dict, where: str = "recipe") -> None:
    """llama_model_quantize into a temporary file, renamed into place on success."""
    import ctypes

    llama_cpp = import_llama_cpp()
    params = quantize_params(recipe, where)
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), tmp.encode(), ctypes.byref(params))
        if rc != 0:
            raise fail(str(src), f"llama_model_quantize returned {rc}", "see the llama.cpp log above")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def quantize(recipe_path: str, out: str, cfg: dict, gguf_in: str | None = None) -> dict:
    from .config import load_recipe

    recipe = load_recipe(recipe_path, cfg)
    if gguf_in:
        src = Path(gguf_in)
    else:
        m = target_dir(cfg, recipe["gguf"]) / "metrics.json"
        if not m.is_file():
            raise fail(str(m), "the GGUF to quantize has not been built", f"build it first: snakemake {recipe['gguf']}")
        src = Path(json.loads(m.read_text())["gguf_path"])
    if not src.is_file():
        raise fail(str(src), "GGUF file not found", "rebuild the GGUF target or pass --gguf FILE")
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    final = outp / f"model-{recipe['ftype']}.gguf"
    t0 = time.time()
    quantize_file(src, final, recipe, recipe_path)
    secs = time.time() - t0
    info = read_gguf(final)
    write_json(outp / "tensor_types.json", info)
    src_info = read_gguf(src)
    metrics = {"target": recipe["name"], "stage": "gguf_quantize", "scale": cfg["scale"], "gguf_in": str(src),
               "gguf_path": str(final), "ftype": recipe["ftype"],
               "requested_output_tensor_type": recipe.get("output_tensor_type") or "default",
               "requested_token_embedding_type": recipe.get("token_embedding_type") or "default",
               "pure": bool(recipe.get("pure", False)), "quantize_seconds": secs,
               "gguf_in_file_bytes": src.stat().st_size,
               "gguf_in_tensor_bytes": sum(t["n_bytes"] for t in src_info["tensors"]),
               **tensor_summary(info, final)}
    metrics["size_ratio_vs_input"] = metrics["gguf_file_bytes"] / metrics["gguf_in_file_bytes"]
    _write_tb(outp, {"quant/gguf_file_mb": metrics["gguf_file_bytes"] / 2**20,
                     "quant/bits_per_weight": metrics["gguf_bits_per_weight"],
                     "quant/size_ratio_vs_input": metrics["size_ratio_vs_input"]}, metrics)
    return write_metrics(outp / "metrics.json", metrics)


# ================================================================ CLI

def _cmd_merge(a) -> None:
    from .config import config_from_args

    m = merge(a.recipe, a.out, config_from_args(a), adapter=a.adapter)
    print(f"{m['target']}: merged {m['adapter_dir']} into {m['model_source']}; max |logit diff| "
          f"{m['merge_max_abs_logit_diff']:.3g} (adapter moves logits by up to {m['adapter_max_abs_logit_delta']:.3g})")


def _cmd_convert(a) -> None:
    from .config import config_from_args

    m = convert(a.recipe, a.out, config_from_args(a), merged=a.merged)
    print(f"{m['target']}: {m['gguf_path']} ({m['gguf_file_bytes']} bytes, {m['gguf_tensors']} tensors); "
          f"tokenizer check {m['tokenizer_check_agree']}/{m['tokenizer_check_texts']} texts identical")


def _cmd_quantize(a) -> None:
    from .config import config_from_args

    m = quantize(a.recipe, a.out, config_from_args(a), gguf_in=a.gguf)
    print(f"{m['target']}: {m['gguf_path']} ({m['gguf_file_bytes']} bytes, {m['size_ratio_vs_input']:.3f} of the input; "
          f"{m['output_tensor']} {m['type_output']}, layers {m['types_layer_matrices']})")


def build_parser() -> argparse.ArgumentParser:
    from .config import add_config_args

    p = argparse.ArgumentParser(prog="python -m quantune.export", description=__doc__.splitlines()[0])
    sub = p.add_subparsers()
    for name, func, extra, help_ in [
        ("merge", _cmd_merge, "--adapter", "merge a LoRA adapter into its base (a plain transformers model)"),
        ("convert", _cmd_convert, "--merged", "transformers model -> GGUF with llama.cpp's convert_hf_to_gguf.py"),
        ("quantize", _cmd_quantize, "--gguf", "GGUF -> quantized GGUF with llama_model_quantize"),
    ]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--recipe", required=True)
        s.add_argument("--out", required=True)
        s.add_argument(extra, default=None, help="use this input instead of the recipe's target")
        add_config_args(s)
        s.set_defaults(func=func)
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
