"""The gguf_quantize stage: a GGUF quantized to Q4_0 / Q8_0 / Q4_K_M / ... with llama.cpp's
llama_model_quantize (through llama-cpp-python), the output tensor's type set as the recipe says.

    python -m quantune.gguf_quantize --recipe recipes/gguf_q4_0.yaml --out results/gguf_q4_0

--gguf FILE quantizes another GGUF instead of the recipe's `gguf` target's.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from .lib.common import fail, run_cli, write_json, write_metrics
from .lib.gguf import FTYPES, import_llama_cpp, read_gguf, target_dir, tensor_summary
from .lib.gguf import write_tb


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
    from .lib.config import load_recipe

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
    write_tb(outp, {"quant/gguf_file_mb": metrics["gguf_file_bytes"] / 2**20,
                     "quant/bits_per_weight": metrics["gguf_bits_per_weight"],
                     "quant/size_ratio_vs_input": metrics["size_ratio_vs_input"]}, metrics)
    return write_metrics(outp / "metrics.json", metrics)


def _cmd(a) -> None:
    from .lib.config import config_from_args

    m = quantize(a.recipe, a.out, config_from_args(a), gguf_in=a.gguf)
    print(f"{m['target']}: {m['gguf_path']} ({m['gguf_file_bytes']} bytes, {m['size_ratio_vs_input']:.3f} of the input; "
          f"{m['output_tensor']} {m['type_output']}, layers {m['types_layer_matrices']})")


def build_parser() -> argparse.ArgumentParser:
    from .lib.config import stage_parser

    p = stage_parser("quantune.gguf_quantize", __doc__, _cmd)
    p.add_argument("--gguf", default=None, help="a GGUF file to quantize instead of the recipe's target's")
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
