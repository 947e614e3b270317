"""GPTQ and AWQ through the quantize stage, llm-compressor's own call against the project's fast path (issue 19's
bench), with where the time goes: each run is the stage's own run (`quantune.quantize.run`) of recipes/gptq_opt67b.yaml
or awq_opt67b.yaml with only `model:` and `speed:` changed. Path `llmcompressor` is `speed: seed` (oneshot as
its defaults have it, the recipe's calibration batch); path `project` is `speed: fast` (the same method, settings,
calibration rows and order; see the quantize schema's `speed`); path `project_eager` (a diagnostic, `--paths`)
is `project` with AWQ's scale search left in the calibration's eager attention (eager_grid_search), path
`project_resident` (a diagnostic) `project` with the model left on the GPU during oneshot, as llm-compressor's own
call has it (model_resident), path `project_b64` (a diagnostic) `project` with calibration batches of twice its
tokens. Each run is a process of its own (the same CUDA start-up for every path), with wall-clock timers, the GPU
synchronised around them, on the stage's phases and llm-compressor 0.14's: tracing the model into subgraphs, the
calibration cache and its onload/offload traffic, the calibration forwards (GPTQ's Hessian hooks timed apart), GPTQ's
per-layer solve, AWQ's scale search, saving and the measurements. A nested phase is also inside its parent: the
table says which.

    python bench/quant_speed.py --out bench/results                         # scale shape, on the GPU machine
    python bench/quant_speed.py --methods gptq --models opt-6.7b --out /tmp/qs
    python bench/quant_speed.py --methods awq gptq --series gptq --out /tmp/qs  # AWQ at the 6.7b shape only
    python bench/quant_speed.py --methods awq --models opt-6.7b --paths llmcompressor project project_eager --out /tmp/qs
    python bench/quant_speed.py --scale tiny --models opt-6.7b --out /tmp/qs  # the same code on the tiny OPT, CPU
    python bench/quant_speed.py --methods awq --models opt-6.7b --paths project --cprofile --out /tmp/qs  # + cProfile
    python bench/quant_speed.py --methods awq --models opt-6.7b --paths project --kernels --out /tmp/qs  # subgraphs 4-5
    python bench/quant_speed.py --offload-check --out /tmp/qs   # GPU: to_host and the offloaded weights' write-back

Writes quant_speed.json (a list of rows: method, path, model, params, seconds (the stage's quant_seconds),
peak_gib, split (phase -> seconds), the result figures (GPTQ's mean layer loss, perplexity, KL to the unquantized
model), gpu) and quant_speed.md: per method and model the project path's time and peak against llm-compressor's
and how far its result is from it; one plot each of time and peak memory against parameters for both paths. On a
GPU it also checks the fast path's Hessian update (GPTQ) and grid-search loss (AWQ) against llm-compressor's on one
half-precision batch (quant_speed_checks.json). A run of some methods, models or paths replaces those rows
(another GPU's stay beside them, each ratio against its own GPU's llmcompressor row, each GPU its own line in the
plots) and checks in what --out already holds and keeps the others (rows of the run's scale only). Run it where
scripts/gpu_check.sh installed the quantize group's wheels (PYTHONPATH set); the shape world is built by the
workflow's rules.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml
from benchlib import build_shape_inputs, earlier, gpu_name, merged, run_stamp, write_gpu_check

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"gptq": "gptq_opt67b", "awq": "awq_opt67b"}
MODELS = ["opt-125m", "opt-1.3b", "opt-2.7b", "opt-6.7b"]
PATHS = {"llmcompressor": "seed", "project": "fast", "project_eager": "fast", "project_resident": "fast",
         "project_b64": "fast"}
DEFAULT_PATHS = ["llmcompressor", "project"]
# phase: (module, attribute path, the phase it runs inside)
PHASES = {
    "load model (and the reload)": ("quantune.quantize", "load_model", None),
    "baseline measure": ("quantune.quantize", "measure_base", None),
    "quantize (oneshot)": ("quantune.quantize", "quantize_llmcompressor", None),
    "trace subgraphs": ("llmcompressor.pipelines.sequential.pipeline", "trace_subgraphs", "quantize (oneshot)"),
    "calibration cache": ("llmcompressor.pipelines.cache", "IntermediatesCache.from_dataloader", "quantize (oneshot)"),
    "cache fetch (onload)": ("llmcompressor.pipelines.cache", "IntermediatesCache.fetch", "quantize (oneshot)"),
    "cache update (offload)": ("llmcompressor.pipelines.cache", "IntermediatesCache.update", "quantize (oneshot)"),
    "subgraph forwards": ("llmcompressor.pipelines.sequential.helpers", "Subgraph.forward", "quantize (oneshot)"),
    "GPTQ Hessian hooks": ("llmcompressor.modifiers.gptq.base", "GPTQModifier.calibrate_module", "subgraph forwards"),
    "GPTQ solve (compress)": ("llmcompressor.modifiers.gptq.base", "GPTQModifier.compress_modules",
                              "quantize (oneshot)"),
    "AWQ smoothing (scale search)": ("llmcompressor.modifiers.transform.awq.base", "AWQModifier._apply_smoothing",
                                     "quantize (oneshot)"),
    # inside the scale search: the parent module's forwards (once unquantized, once per grid point), their loss, and
    # each grid point's weight statistics, qparams and fake quantization
    "AWQ parent forwards": ("llmcompressor.modifiers.transform.awq.base", "AWQModifier._run_samples",
                            "AWQ smoothing (scale search)"),
    "AWQ loss": ("llmcompressor.modifiers.transform.awq.base", "AWQModifier._compute_loss",
                 "AWQ smoothing (scale search)"),
    "AWQ observe weights": ("llmcompressor.modifiers.transform.awq.base", "observe", "AWQ smoothing (scale search)"),
    "AWQ qparams": ("llmcompressor.modifiers.transform.awq.base", "update_qparams", "AWQ smoothing (scale search)"),
    "AWQ fake quantize": ("llmcompressor.modifiers.transform.awq.base", "forward_quantize",
                          "AWQ smoothing (scale search)"),
    # a mapping's whole grid search (the phases above but the unquantized forward are inside it), and the writes of
    # the smoothed weights back to an offloaded model's CPU copy
    "AWQ best-scale search": ("llmcompressor.modifiers.transform.awq.base", "AWQModifier._compute_best_scale",
                              "AWQ smoothing (scale search)"),
    "AWQ offloaded-weight updates": ("llmcompressor.modifiers.transform.awq.base", "update_offload_parameter",
                                     "AWQ smoothing (scale search)"),
    # the fast path's grid-search loss for a Linear parent: its inputs' Gram matrix once, a quadratic form a grid point
    "AWQ Gram matrices (fast)": ("quantune.lib.quant_backends", "centred_gram", "AWQ smoothing (scale search)"),
    "AWQ Gram-matrix loss (fast)": ("quantune.lib.quant_backends", "AwqLinearLoss.loss",
                                    "AWQ smoothing (scale search)"),
    "save_pretrained": ("transformers.modeling_utils", "PreTrainedModel.save_pretrained", None),
    "quantized measure": ("quantune.quantize", "measure_saved", None),
}
RESULT_KEYS = ("gptq_loss_mean", "gptq_loss_max", "gptq_rtn_fallback_layers", "ppl_base", "ppl_quant", "kl_vs_base")


class Timers:
    def __init__(self):
        self.seconds, self.calls = defaultdict(float), defaultdict(int)

    def wrap(self, phase: str, fn):
        import torch

        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        @functools.wraps(fn)
        def timed(*a, **kw):
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                sync()
                self.seconds[phase] += time.perf_counter() - t0
                self.calls[phase] += 1

        return timed


def install(timers: Timers) -> list[str]:
    """Wrap every phase this installation has (before the stage is imported); returns the phases it lacks. The fast
    path patches GPTQModifier.calibrate_module while oneshot runs, so its Hessian hooks are timed there as well."""
    missing = []
    for phase, (mod, attr, _) in PHASES.items():
        try:
            owner = importlib.import_module(mod)
            *path, name = attr.split(".")
            for p in path:
                owner = getattr(owner, p)
            setattr(owner, name, timers.wrap(phase, getattr(owner, name)))
        except (ImportError, AttributeError):
            missing.append(phase)
    if "GPTQ Hessian hooks" not in missing:
        from quantune.lib import quant_backends

        quant_backends.GptqHessians.calibrate = timers.wrap("GPTQ Hessian hooks", quant_backends.GptqHessians.calibrate)
    return missing


def recipe_copy(method: str, model: str, path_name: str, tmp: Path) -> Path:
    """recipes/<method's recipe>.yaml with `model` and the path's `speed`: the file keeps the recipe's name, so
    its checks and scale caps apply."""
    name = RECIPES[method]
    r = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text(encoding="utf-8"))
    r.update(model=model, speed=PATHS[path_name])
    d = tmp / f"{model}-{path_name}"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.yaml").write_text(yaml.safe_dump(r, allow_unicode=True), encoding="utf-8")
    return d / f"{name}.yaml"


def eager_grid_search() -> None:
    """Path project_eager (a diagnostic, not a recipe setting): the fast path with AWQ's scale search left in the
    eager attention llm-compressor's calibration context forces (the fast path runs it under SDPA:
    lib.quant_backends.SdpaScaleSearch); what SDPA saves there: the difference from path project."""
    from quantune.lib import quant_backends

    quant_backends.SdpaScaleSearch.apply_smoothing = lambda self, orig, modifier, model: orig(modifier, model)


def model_resident() -> None:
    """Path project_resident (a diagnostic, not a recipe setting): the fast path with the model left on the GPU during
    oneshot (quantize.offloads_model false), as llm-compressor's own call has it; the difference from path project
    is what the fast mode's offloaded model (CPU copy, one decoder layer onloaded at a time) costs in time and saves
    in peak memory."""
    import quantune.quantize as stage

    stage.offloads_model = lambda recipe, device: False


def double_calibration_batch() -> None:
    """Path project_b64 (a diagnostic, not a recipe setting): the fast path with calibration batches of twice
    FAST_CALIBRATION_TOKENS (AWQ's 512-token rows: 64 a forward), so half the forwards in AWQ's grid search, each
    with its per-call overheads (the fake-quantized weights' quantize-dequantize runs on every call), at more
    activation memory; the difference from path project is what that batch size would change."""
    from quantune.lib import quant_backends

    quant_backends.FAST_CALIBRATION_TOKENS *= 2


def profiled(fn, out_txt: Path | None, top: int = 60):
    """fn() under cProfile when out_txt is given: the `top` functions by own time and by cumulative time written
    there (the host's view: time waiting for the GPU shows in the call that waits, e.g. a synchronize or .item())."""
    if out_txt is None:
        return fn()
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    try:
        return prof.runcall(fn)
    finally:
        buf = io.StringIO()
        for key in ("tottime", "cumulative"):
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(top)
        out_txt.write_text(buf.getvalue(), encoding="utf-8")


KERNEL_WINDOW = (4, 2)  # --kernels: the subgraphs profiled, (first, count); the first ones pay one-time work


@contextlib.contextmanager
def kernel_window(out_txt: Path, first: int, count: int, top: int = 60):
    """--kernels: torch.profiler (CPU and, where there is one, CUDA activity) over `count` subgraphs of
    llm-compressor's sequential pipeline from subgraph `first` (0-based, at least 1): from the end of the one before
    (LifecycleCallbacks.sequential_epoch_end) to the end of the last, so their calibration forwards and the
    modifiers' per-subgraph work (AWQ's smoothing and scale search, GPTQ's solves), without loading, measuring,
    saving or the other layers (the whole stage of a 6.7B model under the profiler ran past 290 s on an H100).
    Writes the window's wall seconds, the GPU's busy seconds in it and the `top` operators and kernels by device
    time and by host time to out_txt (the profiler's overhead included: a separate run); a window the run ends
    inside is closed and written with what it holds."""
    import torch
    from llmcompressor.core import LifecycleCallbacks
    from torch.profiler import ProfilerActivity, profile

    from quantune.lib.measure import profile_report, synced_clock

    if first < 1 or count < 1:
        raise SystemExit(f"--kernel-window {first} {count}: FIRST must be at least 1 and COUNT at least 1")
    cuda = torch.cuda.is_available()
    orig = LifecycleCallbacks.__dict__["sequential_epoch_end"]
    st: dict = {"ended": 0, "prof": None, "t0": 0.0}

    def start():
        st["prof"] = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
        st["prof"].__enter__()
        st["t0"] = synced_clock()

    def stop(early: bool = False):
        prof, st["prof"] = st["prof"], None
        wall = synced_clock() - st["t0"]
        prof.__exit__(None, None, None)
        label = (f"subgraphs {first}-{min(st['ended'], first + count) - 1} of the sequential pipeline (0-based)"
                 + ("; the pipeline ended inside the window, so what followed it is in too" if early else ""))
        out_txt.write_text(profile_report(prof, label, wall, rows=top, name_width=80), encoding="utf-8")

    def epoch_end(cls, *args, **kwargs):
        result = orig.__func__(cls, *args, **kwargs)
        st["ended"] += 1
        if st["ended"] == first:
            start()
        elif st["ended"] == first + count and st["prof"] is not None:
            stop()
        return result

    LifecycleCallbacks.sequential_epoch_end = classmethod(epoch_end)
    try:
        yield
    finally:
        LifecycleCallbacks.sequential_epoch_end = orig
        if st["prof"] is not None:
            stop(early=True)


def one_run(method: str, model: str, path_name: str, scale: str, sets: list[str], out_json: Path,
            profile_txt: Path | None = None, window: tuple[int, int] | None = None) -> None:
    """One stage run with the timers installed (in a process of its own), its row written to out_json; with
    profile_txt, the stage's run under cProfile (profiled), or with `window` (first, count) those subgraphs of it
    under torch.profiler (kernel_window)."""
    from quantune.lib.config import _parse_set, load_config, load_recipe

    cfg = load_config(overrides={"scale": scale, **_parse_set(sets)})
    timers = Timers()
    missing = install(timers)
    if path_name == "project_eager":
        eager_grid_search()
    if path_name == "project_resident":
        model_resident()
    if path_name == "project_b64":
        double_calibration_batch()
    from quantune.quantize import run  # after install: the stage's module-level names are the wrapped ones

    (ROOT / "results").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quant-speed-", dir=ROOT / "results") as tmp:
        path = recipe_copy(method, model, path_name, Path(tmp))
        build_shape_inputs(cfg, load_recipe(path, cfg), model)
        t0 = time.perf_counter()
        with kernel_window(profile_txt, *window) if window else contextlib.nullcontext():
            m = profiled(lambda: run(str(path), str(Path(tmp) / "out"), cfg), None if window else profile_txt)
        wall = time.perf_counter() - t0
    q = m["quant_seconds"]
    split = {phase: {"seconds": round(timers.seconds[phase], 3), "calls": timers.calls[phase], "inside": parent,
                     "share_of_quant": round(timers.seconds[phase] / q, 4) if q else None}
             for phase, (_, _, parent) in PHASES.items() if timers.calls.get(phase)}
    row = {"method": method, "path": path_name, "speed": m.get("speed"), "model": model, "scale": scale,
           "params": m["params_total"], "dtype": m["dtype"], "seconds": round(q, 3),
           "quant_move_seconds": m.get("quant_move_seconds"),
           "peak_gib": round(m["quant_peak_gpu_mb"] / 1024, 2) if m.get("quant_peak_gpu_mb") else None,
           "peak_rss_gib": round(m["quant_peak_rss_mb"] / 1024, 2), "wall_s": round(wall, 1),
           "calibration": f"{m['calibration_samples']} x {m['calibration_seq_len']}",
           "calibration_batch_size": m.get("calibration_batch_size"), "speed_changes": m.get("speed_changes"),
           "hessian_products": m.get("hessian_products"), **{k: m.get(k) for k in RESULT_KEYS if k in m},
           "split": split, "phases_missing": missing, "gpu": gpu_name(), "run": run_stamp(),
           "versions": {k[len("version_"):]: v for k, v in m.items() if k.startswith("version_")}}
    out_json.write_text(json.dumps(row, indent=1) + "\n", encoding="utf-8")


def spectral_norm(a, iters: int = 30) -> float:
    """The largest singular value of a symmetric matrix by power iteration."""
    import torch

    v = torch.randn(a.shape[0], dtype=a.dtype, device=a.device)
    for _ in range(iters):
        v = a @ v
        v /= v.norm()
    return (a @ v).norm().item()


def hessian_check(device: str = "cuda", d: int = 16384, batch: int = 8, seq: int = 2048) -> dict | None:
    """On a GPU: the Hessian update of llm-compressor (fp32 matmul) and of the fast path (lib.quant_backends'
    add_input_products) on one batch shaped like OPT-6.7B's fc2 input (8 x 2,048 tokens x 16,384, post-ReLU: every
    entry >= 0, where tensor cores' truncated sums drift most), each against the float64 product: its largest
    error relative to the largest entry, and the error's spectral norm relative to GPTQ's damping (1% of the mean
    diagonal; an error past it can stop the Hessian from inverting). `tf32_one_product` is the previous fast
    path (one TF32 product of the whole batch), kept for the comparison."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return None
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian

    from quantune.lib.quant_backends import add_input_products, tf32_matmul

    def tf32_one_product(h, x):
        x = x.reshape(-1, x.shape[-1]).float()
        with tf32_matmul():
            h.addmm_(x.t(), x, alpha=2.0)

    torch.manual_seed(0)
    layer = torch.nn.Linear(d, 8, device=device)
    x = torch.randn(batch, seq, d, device=device, dtype=torch.float16).relu_()
    x64 = x.reshape(-1, d).double()
    exact = 2 * x64.t() @ x64
    del x64
    damping = 0.01 * exact.diagonal().mean().item()
    out = {"input": f"{batch} x {seq} x {d} fp16, relu of standard normal", "damping": damping}
    paths = {"llmcompressor": lambda h: accumulate_hessian(x, layer, h, torch.zeros((), device=device)),
             "project": lambda h: add_input_products(h, x),
             "tf32_one_product": lambda h: tf32_one_product(h, x)}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for name, fn in paths.items():
        h = torch.zeros(d, d, device=device)
        fn(h)  # warm-up
        h.zero_()
        sync()
        t0 = time.perf_counter()
        fn(h)
        sync()
        seconds = time.perf_counter() - t0
        err = h.double() - exact
        out[name] = {"seconds": round(seconds, 4), "max_rel_error": (err.abs().max() / exact.abs().max()).item(),
                     "spectral_error_over_damping": spectral_norm(err) / damping}
        del h, err
    return out


def awq_loss_check(device: str = "cuda", d_in: int = 16384, d_out: int = 4096, tokens: int = 16384) -> dict | None:
    """On a GPU: AWQ's grid-search loss for one grid point of a layer shaped like OPT-6.7B's fc2 (post-ReLU fp16
    inputs, every entry >= 0; the weight against its 4-bit group-128 min-max rounding), as llm-compressor computes it
    (fp16 forwards of both weights, the squared error summed in fp32: what the stage's fp32_awq_loss runs) and as the
    fast path does (lib.quant_backends.AwqLinearLoss: the inputs' centred Gram matrix once, then one quadratic form,
    fp16 tensor-core products with fp32 results: half_product; `project_tf32` the same form in TF32, as before
    half_product; `forwards_half_loss` llm-compressor's forwards with their squared error read once in half
    precision, half_squared_error, as the fast path does for the mappings the Gram matrix does not serve), each
    against the float64 loss of the same fp16 weights and inputs, with the seconds a grid point costs each way and
    the Gram matrix's one-off seconds."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return None
    from quantune.lib.quant_backends import AwqLinearLoss, centred_gram, half_squared_error, to_half

    torch.manual_seed(0)
    layer = torch.nn.Linear(d_in, d_out, device=device, dtype=torch.float16)
    w0 = layer.weight.detach().clone()
    g = w0.float().reshape(d_out, -1, 128)  # 4-bit asymmetric min-max rounding per group of 128
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = ((hi - lo) / 15).clamp_min(1e-8)
    w1 = (((g - lo) / step).round().clamp(0, 15) * step + lo).reshape(d_out, d_in).half()
    x = torch.randn(tokens // 2048, 2048, d_in, device=device, dtype=torch.float16).relu_()
    dw = w1.double() - w0.double()
    exact = sum((b.reshape(-1, d_in).double() @ dw.t()).pow(2).sum().item() for b in x) / (tokens * d_out)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def llmcompressor():
        ref = [torch.nn.functional.linear(b, w0, layer.bias) for b in x]
        out = [torch.nn.functional.linear(b, w1, layer.bias) for b in x]
        err = sum(torch.nn.functional.mse_loss(a.float(), c.float(), reduction="sum") for a, c in zip(ref, out))
        return err.item() / (tokens * d_out)

    def forwards_half_loss():  # the same forwards, their squared error as the fast path reads it for other mappings
        ref = [torch.nn.functional.linear(b, w0, layer.bias) for b in x]
        out = [torch.nn.functional.linear(b, w1, layer.bias) for b in x]
        got = half_squared_error(ref, out)
        return got if got is not None else float("nan")

    state, tf32 = AwqLinearLoss(), AwqLinearLoss()
    t0 = time.perf_counter()
    gram = centred_gram(lambda: iter(x), d_in, x.device)
    state.active = (layer, *gram, w0, to_half(gram[0]))
    sync()
    gram_seconds = time.perf_counter() - t0
    tf32.active = (layer, *gram, w0, None)  # the quadratic form in TF32, as before half_product
    out = {"input": f"{tokens:,} tokens x {d_in:,} fp16 (relu of standard normal), weight {d_out:,} x {d_in:,}",
           "gram_seconds": round(gram_seconds, 4)}
    for name, fn in (("llmcompressor", llmcompressor), ("project", lambda: state.loss(None, None, None, [w1])),
                     ("project_tf32", lambda: tf32.loss(None, None, None, [w1])),
                     ("forwards_half_loss", forwards_half_loss)):
        fn()  # warm-up
        sync()
        t0 = time.perf_counter()
        got = fn()
        sync()
        out[name] = {"seconds_per_grid_point": round(time.perf_counter() - t0, 4), "loss": got,
                     "rel_error": got / exact - 1}
    out["exact"] = exact
    return out


def check_lines(check: dict) -> list[str]:
    from quantune.lib.tables import markdown_table

    lines = []
    if check.get("hessian"):
        h = check["hessian"]
        rows = [[name, v["seconds"], f"{v['max_rel_error']:.2e}", f"{v['spectral_error_over_damping']:.3g}"]
                for name, v in h.items() if isinstance(v, dict)]
        lines += [f"Hessian update on one batch ({h['input']}), each path against the float64 product:", "",
                  *markdown_table(["path", "seconds", "largest error / largest entry",
                                   "error's spectral norm / damping"], rows), ""]
    if check.get("awq_loss"):
        a = check["awq_loss"]
        rows = [[name, v["seconds_per_grid_point"], f"{v['rel_error']:.2e}"]
                for name, v in a.items() if isinstance(v, dict)]
        gram = (f"as scaled fp16 products (half_product) {a['gram_seconds']} s, in TF32 {a['gram_seconds_tf32']} s, "
                f"largest difference {a['gram_tf32_vs_project_max_rel']:.2e} of the largest entry") \
            if "gram_seconds_tf32" in a else f"{a['gram_seconds']} s"  # checks of 335df64 timed both ways
        lines += [f"AWQ grid-search loss of one grid point ({a['input']}; the fast path's Gram matrix once: {gram}), "
                  "each path against the float64 loss:", "",
                  *markdown_table(["path", "seconds a grid point", "relative error"], rows), ""]
    return lines


def write(rows: list[dict], check: dict | None, out: Path) -> None:
    from quantune.lib.report_render import plot
    from quantune.lib.tables import markdown_table

    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_speed.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    (out / "quant_speed_checks.json").write_text(json.dumps(check or {}, indent=1) + "\n", encoding="utf-8")
    ok = [r for r in rows if "error" not in r]
    gpus = dict.fromkeys(r["gpu"] for r in ok)
    several = len(gpus) > 1  # then the table, its sections and the plots' lines name each row's GPU

    def on(g: str) -> str:
        return f" ({short_gpu(g)})" if several else ""

    gpu = ("GPUs: " + ", ".join(f"{g} ({sum(r['gpu'] == g for r in ok)} rows)" for g in gpus)
           + "; a ratio is against the llmcompressor row of the same GPU") if several else \
        (next(iter(gpus)) if gpus else "-")
    md = ["# GPTQ and AWQ: llm-compressor's own call against the project's fast path (quantize stage)", "",
          "`python bench/quant_speed.py`: recipes gptq_opt67b and awq_opt67b with only `model` and `speed` changed "
          "(llmcompressor = `speed: seed`, project = `speed: fast`), each the stage's own run in a process of its "
          f"own; seconds = the stage's quant_seconds, peak = the CUDA allocator's peak of that block. {gpu}. A run of "
          "some paths keeps the other rows of an earlier run: each row names its run, and a ratio is against the "
          "llmcompressor row of its method and model, whichever run that was.", ""]
    if check:
        md += check_lines(check)
    table = []
    for r in ok:
        base = next((b for b in ok if b["path"] == "llmcompressor"
                     and (b["method"], b["model"], b["gpu"]) == (r["method"], r["model"], r["gpu"])), None)
        ratio = f"{r['seconds'] / base['seconds']:.2f}x" if base and base["seconds"] else "-"
        same = "-"
        if base and r is not base:
            key = "gptq_loss_mean" if r.get("gptq_loss_mean") is not None else "kl_vs_base"
            same = f"{key} {r.get(key, 0) / base[key]:.4f}x; ppl {r['ppl_quant'] / base['ppl_quant']:.5f}x" \
                if base.get(key) else "-"
            if key != "kl_vs_base" and base.get("kl_vs_base"):
                same += f"; KL to the unquantized model {r['kl_vs_base'] / base['kl_vs_base']:.3f}x"
        table.append([r["method"], r["model"], r["path"], f"{r['params']:,}", r["seconds"], ratio, r["peak_gib"],
                      r["calibration_batch_size"], same, r.get("gptq_rtn_fallback_layers", "-"), r.get("run", "-")]
                     + [short_gpu(r["gpu"])] * several)
    md += markdown_table(["method", "model", "path", "parameters", "seconds", "time vs llmcompressor", "peak GiB",
                          "calibration batch", "result vs llmcompressor", "GPTQ layers rounded to nearest",
                          "run (commit, UTC)"] + ["GPU"] * several, table) + [""]
    for r in rows:
        if "error" in r:
            md += [f"- {r['method']} {r['model']} {r['path']}: failed: {r['error']}"]
    for method in dict.fromkeys(r["method"] for r in ok):
        for model, g in dict.fromkeys((r["model"], r["gpu"]) for r in ok if r["method"] == method):
            pair = [r for r in ok if (r["method"], r["model"], r["gpu"]) == (method, model, g)]
            phases = list(dict.fromkeys(p for r in pair for p in r["split"]))
            md += ["", f"## {method}, {model}{on(g)}: where the time goes", ""] + markdown_table(
                ["phase", "inside"] + [f"{r['path']} s" for r in pair],
                [[p, next(r["split"][p]["inside"] for r in pair if p in r["split"]) or "-"]
                 + [r["split"].get(p, {}).get("seconds", "-") for r in pair] for p in phases])
        for key, label in (("seconds", "quantization seconds"), ("peak_gib", "peak GPU GiB")):
            series = {p + on(g):
                      [(r["params"] / 1e9, r[key]) for r in ok if r["method"] == method and r["path"] == p
                       and r["gpu"] == g and r[key] is not None] for g in gpus for p in PATHS}
            png = plot(out / f"quant_speed_{method}_{key}.png", series, "parameters (billions)", label,
                       f"{method}: {label} against model size", marker="o", zero_y=True)
            if png:
                md += ["", f"![{method} {key}]({png.name})"]
    (out / "quant_speed.md").write_text("\n".join(md) + "\n", encoding="utf-8")


def offload_check(layers: int = 8, repeats: int = 3) -> dict | None:
    """On a GPU: the fast path's host-side costs with the model offloaded, on OPT-6.7B's fc1 shape (16,384 x 4,096
    fp16, 128 MiB): torch's own page-locked allocation (cudaHostAlloc), the stage's to_host (page-locked with
    cudaHostRegister across threads, lib.models.parallel_page_locking, then the copy), and AWQ's smoothing write-back
    (compressed-tensors' update_offload_parameter of an fp32 product, as _smooth hands it) without and with
    lib.quant_backends.offload_updates_in_dtype, checking both store the same bits. None without a GPU."""
    import torch
    from compressed_tensors.offload import offload_module, update_offload_parameter

    from quantune.lib.models import PAGE_LOCK_THREADS, parallel_page_locking, to_host
    from quantune.lib.quant_backends import offload_updates_in_dtype

    if not torch.cuda.is_available():
        return None
    shape, mib = (16_384, 4_096), 16_384 * 4_096 * 2 / 2**20
    model = torch.nn.Sequential(*[torch.nn.Linear(shape[1], shape[0], bias=False, dtype=torch.float16,
                                                  device="cuda") for _ in range(layers)])
    t0 = time.perf_counter()
    held = [torch.empty(shape, dtype=torch.float16, pin_memory=True) for _ in range(layers)]  # cudaHostAlloc
    alloc = time.perf_counter() - t0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pinned = to_host(model)  # held keeps the blocks above from being reused: this allocates anew, as the stage does
    moved = time.perf_counter() - t0
    threads = parallel_page_locking()  # what to_host turned on, for the record
    del held
    for layer in model:
        offload_module(layer, "cuda", "cpu")
    scales = torch.rand(shape[1], device="cuda") + 0.5  # fp32, as AWQ's scales are
    weights = [layer.weight.clone() for layer in model]  # onloaded once, as while AWQ smooths the layer
    out = {"tensor_mib": mib, "layers": layers, "pinned": pinned,
           "page_locked_alloc_gib_per_s": round(layers * mib / 1024 / alloc, 2),
           "to_host_gib_per_s": round(layers * mib / 1024 / moved, 2),
           "to_host_page_locking": f"cudaHostRegister, {PAGE_LOCK_THREADS} threads" if threads else "cudaHostAlloc"}
    stored = {}
    for name, ctx in (("update_as_llmcompressor", contextlib.nullcontext), ("update_cast_first", offload_updates_in_dtype)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with ctx():
            for _ in range(repeats):
                for layer, w in zip(model, weights):
                    update_offload_parameter(layer, "weight", w * scales.view(1, -1))
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / (repeats * layers)
        stored[name] = [layer._parameters.offloaded_values["weight"].clone() for layer in model]
        out[name] = {"seconds_per_update": round(dt, 5), "gib_per_s": round(mib / 1024 / dt, 2)}
    out["same_bits"] = all(torch.equal(a, b) for a, b in zip(*stored.values()))
    return out


def rank(row: dict) -> tuple:
    """A row's place: by method, then model size (MODELS order, others last), then GPU, then path (PATHS order)."""
    return (row["method"], MODELS.index(row["model"]) if row["model"] in MODELS else len(MODELS), row.get("gpu", ""),
            list(PATHS).index(row["path"]))


def row_key(row: dict) -> tuple:
    """What a later run's row replaces: the same method, model and path on the same GPU (another GPU's stay)."""
    return row["method"], row["model"], row["path"], row.get("gpu")


def short_gpu(name: str) -> str:
    """A GPU's name for a plot's legend: NVIDIA H100 80GB HBM3 -> H100."""
    return name.removeprefix("NVIDIA ").split()[0] if name else "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--series", nargs="*", default=list(RECIPES), choices=list(RECIPES),
                   help="methods run at every --models size; the others at the last one only (the largest by default)")
    p.add_argument("--paths", nargs="*", default=DEFAULT_PATHS, choices=list(PATHS),
                   help="diagnostics: project_eager, the fast path with AWQ's scale search in eager attention; "
                   "project_resident, the fast path with the model on the GPU during oneshot; project_b64, the fast "
                   "path with calibration batches of twice its tokens")
    p.add_argument("--scale", default="shape", choices=["tiny", "shape"])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE config override (dotted keys)")
    prof = p.add_mutually_exclusive_group()
    prof.add_argument("--cprofile", action="store_true",
                      help="each run's stage under cProfile: quant_speed_profile_<method>_<model>_<path>.txt in --out")
    prof.add_argument("--kernels", action="store_true",
                      help="subgraphs of each run's sequential pipeline under torch.profiler (--kernel-window): "
                      "quant_speed_kernels_<method>_<model>_<path>.txt in --out")
    p.add_argument("--kernel-window", nargs=2, type=int, default=KERNEL_WINDOW, metavar=("FIRST", "COUNT"),
                   help="with --kernels: COUNT subgraphs from FIRST (0-based, at least 1; default %(default)s)")
    p.add_argument("--offload-check", action="store_true",
                   help="only offload_check (GPU): host-side costs of the offloaded model, OUT/quant_offload_check.json")
    p.add_argument("--one", nargs=4, metavar=("METHOD", "MODEL", "PATH", "JSON"), help=argparse.SUPPRESS)
    p.add_argument("--profile-txt", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        one_run(*a.one[:3], a.scale, a.set, Path(a.one[3]), a.profile_txt,
                tuple(a.kernel_window) if a.kernels else None)
        return 0
    if a.offload_check:
        write_gpu_check("quant_speed", "--offload-check", offload_check(),
                        "page-locked memory, offloading to the CPU", a.out / "quant_offload_check.json")
        return 0
    # a run of some methods, models or paths replaces their rows (and checks) in an earlier run's at the same scale
    # and keeps the rest
    kept = [r for r in earlier(a.out / "quant_speed.json", []) if r.get("scale") == a.scale]
    kept_check = earlier(a.out / "quant_speed_checks.json", {})
    rows: list[dict] = []
    check = {"hessian": hessian_check() if "gptq" in a.methods else None,
             "awq_loss": awq_loss_check() if "awq" in a.methods else None}
    check = {**kept_check, **{k: v for k, v in check.items() if v}}
    with tempfile.TemporaryDirectory() as tmp:
        for method in a.methods:
            for model in a.models if method in a.series else a.models[-1:]:
                for path_name in a.paths:
                    print(f"quant_speed: {method} {model} {path_name}", flush=True)
                    js = Path(tmp) / f"{method}-{model}-{path_name}.json"
                    cmd = [sys.executable, __file__, "--scale", a.scale, *[f"--set={s}" for s in a.set],
                           "--one", method, model, path_name, str(js)]
                    if a.cprofile or a.kernels:
                        a.out.mkdir(parents=True, exist_ok=True)
                        kind = "kernels" if a.kernels else "profile"
                        cmd += ["--profile-txt", str(a.out / f"quant_speed_{kind}_{method}_{model}_{path_name}.txt")]
                        cmd += ["--kernels", "--kernel-window", *map(str, a.kernel_window)] if a.kernels else []
                    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                    sys.stdout.write(r.stdout[-4000:])
                    if r.returncode == 0 and js.exists():
                        rows.append(json.loads(js.read_text()))
                    else:
                        err = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
                        rows.append({"method": method, "model": model, "path": path_name, "scale": a.scale,
                                     "error": err[-1] if err else f"exit {r.returncode}"})
                        sys.stderr.write(r.stderr[-4000:])
                    # after each run: a later failure keeps what finished
                    write(merged(kept, rows, row_key, rank), check, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
