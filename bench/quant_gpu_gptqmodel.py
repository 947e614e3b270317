"""The quantize stage's GPTQModel backend (`backend: gptqmodel`) on an OPT-6.7B-shaped model: wall time and peak
GPU memory of GPTQ W4 g128 through the project's own code (quantune.lib.quant_backends.quantize_gptqmodel:
GPTQModel.load of a saved model directory, quantize(calibration), save) with recipes/gptq_opt67b.yaml at full scale.

The model is bench/quant_gpu.py's: OPTConfig of facebook/opt-6.7b with random bf16 weights, built on the GPU and
saved to a temporary directory (GPTQModel loads from a path), with a word-level tokenizer over the same vocabulary
(no download). Calibration is the same random token ids as bench/quant_gpu.py's GPTQ run (128 x 2048, seed 0).
Random weights make time and memory real and perplexity meaningless, so none is reported.

GPTQModel JIT-compiles two optional extensions on first use (the CUDA GPTQ block update and the CPU packer). They
are built (or found missing) before the timed block, and their build seconds are reported apart; the JSON says
which path the quantization used.

    python bench/quant_gpu_gptqmodel.py --out $OUT/quant_gpu_gptqmodel.json            # a CUDA machine
    python bench/quant_gpu_gptqmodel.py --out /tmp/g.json --tiny                       # tiny shape (CPU or GPU)

Numbers are written as each phase finishes (a run cut short keeps what it measured).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from quant_gpu import OPT_6_7B, TINY, build  # noqa: E402  (the same model as the llm-compressor bench)


def make_tokenizer(vocab_size: int):
    """A word-level fast tokenizer with OPT's special ids (0 <s>, 1 <pad>, 2 </s>, 3 <unk>): GPTQModel.load reads
    a tokenizer from the model directory, and the project saves one beside the quantized model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=2048)


class NvmlPeak:
    """Device memory in use (nvidia-smi's figure: every context on the GPU), sampled every 0.2 s."""

    def __init__(self):
        self.peak_mib = None
        self.base_mib = None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            idx = int((os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0])
            self._h = pynvml.nvmlDeviceGetHandleByIndex(idx)
            self._nv = pynvml
        except Exception as e:  # no NVML: leave the figure out
            self._h, self.error = None, repr(e)

    def _used(self):
        return self._nv.nvmlDeviceGetMemoryInfo(self._h).used / 2**20

    def _loop(self):
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib or 0, self._used())
            self._stop.wait(0.2)

    def __enter__(self):
        if self._h is not None:
            self.base_mib = self._used()
            self._t = threading.Thread(target=self._loop, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self._h is not None:
            self._stop.set()
            self._t.join()
            self.peak_mib = max(self.peak_mib or 0, self._used())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="tiny OPT shape (8 x 64 calibration): checks the code path")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--workdir", default=None, help="where the saved source model and the output go (default: a "
                                                   "temporary directory, removed at the end)")
    p.add_argument("--no-warm-ext", action="store_true", help="do not build GPTQModel's JIT extensions before "
                                                              "the timed block (their build is then timed in it)")
    a = p.parse_args(argv)

    import importlib.metadata as md

    import torch

    from quantune.lib.config import load_config, load_recipe
    from quantune.lib.measure import PeakMemory
    from quantune.lib.quant_backends import quantize_gptqmodel

    cuda = torch.cuda.is_available()
    if not cuda and not a.tiny:
        print("quantune: error: bench/quant_gpu_gptqmodel.py: no CUDA device; fix: run it on a GPU machine "
              "(or --tiny)", file=sys.stderr)
        return 2
    import importlib.util

    if importlib.util.find_spec("gptqmodel") is None:
        print("quantune: error: bench/quant_gpu_gptqmodel.py: gptqmodel is not installed; fix: install it "
              "(bench/run_gptqmodel_device.sh on the device image, envs/gptqmodel.yaml elsewhere)", file=sys.stderr)
        return 2
    shape = TINY if a.tiny else OPT_6_7B
    dtype = torch.bfloat16 if cuda else torch.float32
    n, seq = (min(a.samples, 8), min(a.seq, 64)) if a.tiny else (a.samples, a.seq)

    cfg = load_config(overrides={"scale": "full"})
    recipe_path = ROOT / "recipes" / "gptq_opt67b.yaml"
    recipe = load_recipe(recipe_path, cfg)
    want = (recipe.get("calibration_samples"), recipe.get("calibration_seq_len"))
    recipe.update(backend="gptqmodel", calibration_samples=n, calibration_seq_len=seq)
    g = torch.Generator().manual_seed(0)  # bench/quant_gpu.py's calibration tokens
    samples = {"input_ids": torch.randint(3, shape["vocab_size"], (n, seq), generator=g).tolist()}

    def ver(k):
        try:
            return md.version(k)
        except md.PackageNotFoundError:
            return None

    result = {
        "what": ("GPTQModel GPTQ of a random-weight OPT-6.7B-shaped model through quantune.quantize."
                 "quantize_gptqmodel (time and memory only; random weights: no perplexity)") if not a.tiny
        else "tiny-shape check of the GPTQModel bench code path",
        "command": "python bench/quant_gpu_gptqmodel.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "shape": shape, "dtype": str(dtype).replace("torch.", ""),
        "versions": {k: ver(k) for k in ("torch", "transformers", "accelerate", "gptqmodel", "tokenicer", "defuser",
                                         "logbar", "device-smi", "pypcre", "triton", "numpy")},
        "python": sys.version.split()[0],
        "recipe": "recipes/gptq_opt67b.yaml (backend overridden to gptqmodel)",
        "bits": recipe["bits"], "group_size": recipe["group_size"], "zero_point": recipe.get("zero_point", False),
        "act_order": recipe.get("act_order", "none"), "damp": recipe.get("damp", 0.01),
        "calibration": "random token ids (uniform over the vocabulary), seed 0, as bench/quant_gpu.py",
        "calibration_samples": n, "calibration_seq_len": seq, "recipe_calibration": f"{want[0]} x {want[1]}",
        "calibration_reduced": (n, seq) != want, "calibration_batch_size": recipe.get("calibration_batch_size", 1),
        "phases": {},
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def dump():
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
        os.replace(tmp, out)
        print(json.dumps(result["phases"], default=str), flush=True)

    work = Path(a.workdir or tempfile.mkdtemp(prefix="qt_gptqmodel_"))
    work.mkdir(parents=True, exist_ok=True)
    src, dst = work / "source", work / "quantized"
    try:
        # ---- the source model: built on the GPU (fast random init), saved as bf16 safetensors, then freed
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as cfg_dir:
            model = build(shape, "cuda" if cuda else "cpu", dtype, cfg_dir)
            model_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
            model.config._name_or_path = str(src)
            model.save_pretrained(src)
        tok = make_tokenizer(shape["vocab_size"])
        tok.save_pretrained(src)
        model = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        result["phases"]["build_and_save_source"] = {"seconds": time.perf_counter() - t0,
                                                     "model_gib": model_bytes / 2**30}
        dump()

        # ---- GPTQModel import and its JIT extensions (one-time costs, outside the timed block)
        t0 = time.perf_counter()
        try:
            import gptqmodel
            from gptqmodel import GPTQModel
        except ImportError as e:
            print(f"quantune: error: bench/quant_gpu_gptqmodel.py: gptqmodel is not importable ({e}); fix: install "
                  "it (bench/run_gptqmodel_device.sh on the device image, envs/gptqmodel.yaml elsewhere)",
                  file=sys.stderr)
            return 2

        result["versions"]["gptqmodel"] = getattr(gptqmodel, "__version__", result["versions"]["gptqmodel"])
        ext = {"import_s": time.perf_counter() - t0}
        if not a.no_warm_ext:
            if cuda:
                t0 = time.perf_counter()
                try:
                    from gptqmodel.quantization import gptq_cuda

                    ext["gptq_block_cuda"] = bool(gptq_cuda.block_update_available())
                    if not ext["gptq_block_cuda"]:
                        ext["gptq_block_cuda_error"] = str(getattr(gptq_cuda._EXTENSION, "_last_error", ""))[-2000:]
                except Exception as e:
                    ext["gptq_block_cuda"], ext["gptq_block_cuda_error"] = False, repr(e)[-2000:]
                ext["gptq_block_cuda_build_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                from gptqmodel.utils import cpp

                ext["pack_block_cpu"] = cpp.load_pack_block_extension() is not None
                if not ext["pack_block_cpu"]:
                    ext["pack_block_cpu_error"] = str(getattr(cpp._pack_block_extension(), "_last_error", ""))[-2000:]
            except Exception as e:
                ext["pack_block_cpu"], ext["pack_block_cpu_error"] = False, repr(e)[-2000:]
            ext["pack_block_cpu_build_s"] = time.perf_counter() - t0
        result["phases"]["gptqmodel_import_and_extensions"] = ext
        dump()

        # ---- the timed block: the project's quantize_gptqmodel (load, quantize, save), phases timed through a
        # thin wrapper around GPTQModel.load and the returned model's quantize and save
        marks: dict = {}
        orig_load, orig_attr = GPTQModel.load, GPTQModel.__dict__["load"]

        def timed_load(*args, **kw):
            t = time.perf_counter()
            m = orig_load(*args, **kw)
            if cuda:
                torch.cuda.synchronize()
            marks["load_s"] = time.perf_counter() - t
            marks["load_peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            q, s = m.quantize, m.save

            def quantize(*qa, **qk):
                t1 = time.perf_counter()
                r = q(*qa, **qk)
                if cuda:
                    torch.cuda.synchronize()
                marks["quantize_s"] = time.perf_counter() - t1
                marks["quantize_peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
                kinds: dict = {}
                for name, mod in m.model.named_modules():
                    if hasattr(mod, "qweight") or type(mod).__name__.endswith("QuantLinear"):
                        kinds[type(mod).__name__] = kinds.get(type(mod).__name__, 0) + 1
                marks["quantized_module_classes"] = kinds
                qc = getattr(m, "quantize_config", None)
                try:
                    marks["quantize_config"] = qc.to_dict()
                except Exception:
                    marks["quantize_config"] = repr(qc)
                return r

            def save(*sa, **sk):
                t1 = time.perf_counter()
                r = s(*sa, **sk)
                marks["save_s"] = time.perf_counter() - t1
                return r

            m.quantize, m.save = quantize, save
            return m

        GPTQModel.load = timed_load
        try:
            with NvmlPeak() as nv, PeakMemory() as pk:
                quantize_gptqmodel(str(src), tok, recipe, samples, dst, str(recipe_path))
        finally:
            GPTQModel.load = orig_attr
        files = sorted(p.name for p in dst.iterdir())
        qweights = 0
        from safetensors import safe_open

        for f in dst.glob("*.safetensors"):
            with safe_open(str(f), "pt") as sf:
                qweights += sum(k.endswith(".qweight") for k in sf.keys())
        qcfg_file = dst / "quantize_config.json"
        result["phases"]["quantize_gptqmodel"] = {
            "wall_s": pk.seconds, "peak_gpu_gib": pk.gpu_mb and pk.gpu_mb / 1024,
            "peak_gpu_gib_nvml": nv.peak_mib and nv.peak_mib / 1024,
            "gpu_in_use_before_gib_nvml": nv.base_mib and nv.base_mib / 1024,
            "peak_rss_gib": pk.rss_mb / 1024, "rss_scope": pk.rss_scope,
            **marks,
            "saved_files": files, "saved_gib": sum(f.stat().st_size for f in dst.iterdir() if f.is_file()) / 2**30,
            "saved_qweight_tensors": qweights,
            "expected_qweight_tensors": 6 * shape["num_hidden_layers"],
            "saved_quantize_config": json.loads(qcfg_file.read_text()) if qcfg_file.exists() else None,
        }
        dump()
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
