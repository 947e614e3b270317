"""GGUF helpers the export chain shares: llama.cpp's type names, the pinned llama-cpp-python and gguf
imports, llama.cpp's converter directory, reading a GGUF's header and tensor types, a target's directory."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from .common import ROOT, fail


INSTALL_HINT = "run scripts/install_llamacpp.sh (installs llama-cpp-python, gguf and the converter into .venv)"


# llama.cpp names (llama.h: enum llama_ftype LLAMA_FTYPE_MOSTLY_<X>, ggml.h: enum ggml_type GGML_TYPE_<X>)
FTYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
          "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]


TENSOR_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                "Q6_K"]


CONVERT_OUTTYPES = ["f32", "f16", "bf16", "q8_0"]


def target_dir(cfg: dict, target: str) -> Path:
    from .config import results_dir

    return Path(results_dir(cfg)) / target


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_llama_cpp():
    """llama_cpp, for a process that will never import torch after it. On the GPU machine (H100, 2026-12-05; a CUDA
    build of llama-cpp-python 0.3.36, which links the system's libstdc++) `import torch` after llama_cpp aborted
    inside torch's own import ("free(): invalid pointer"); torch first and then llama_cpp ran, and so did a process
    with llama_cpp alone (gguf_quantize included). The GGUF steps keep llama.cpp and torch in separate processes."""
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


def write_tb(out: Path, scalars: dict, metrics: dict) -> None:
    from .tb import TBWriter

    with TBWriter(out / "tb") as tb:
        tb.scalars(scalars, 0)
        tb.final(metrics)


def serve_llama(conn, path: str, want_gpu: bool) -> None:
    """A GGUF model served over a multiprocessing connection, in a process that imports no torch (import_llama_cpp
    says why): ("ready", on_gpu) once loaded, then for each (prompt, kwargs) create_completion's chunks as
    ("chunk", c) and ("end", None); ("error", line) for a failure; "close" ends it."""
    def line(e: BaseException) -> str:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    try:
        llama_cpp = import_llama_cpp()
        gpu = want_gpu and bool(llama_cpp.llama_supports_gpu_offload())
        llm = llama_cpp.Llama(path, n_ctx=0, n_gpu_layers=-1 if gpu else 0, verbose=False)
    except BaseException as e:  # noqa: BLE001 - the parent shows it as one line
        conn.send(("error", line(e)))
        return
    conn.send(("ready", gpu))
    try:
        while (msg := conn.recv()) != "close":
            prompt, kw = msg
            try:
                for chunk in llm.create_completion(prompt, **kw):
                    conn.send(("chunk", chunk))
                conn.send(("end", None))
            except Exception as e:  # noqa: BLE001 - the parent raises it in its stream
                conn.send(("error", line(e)))
    except EOFError:  # the parent went away
        pass
    finally:
        llm.close()
