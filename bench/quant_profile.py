"""Where the time of a GPTQ or AWQ target goes (issue 19: profile first), through the quantize stage's own run:
`quantune.quantize.run` of the committed recipe, with wall-clock timers (the GPU synchronised before and after)
around the stage's phases and llm-compressor 0.14's: model load, the baseline measurement, tracing the model into
subgraphs, the calibration cache, the calibration forwards (with GPTQ's Hessian hooks, timed apart), GPTQ's
per-layer solve, AWQ's scale search and smoothing, the propagation forwards, the cache's offload traffic, saving
and the quantized model's measurement (its reload counted under "load model"). A nested phase is also inside its
parent: the table says which.

    python bench/quant_profile.py --out bench/results                       # scale shape, on the GPU machine
    python bench/quant_profile.py --scale tiny --targets gptq_opt67b --out /tmp/qp   # the same code, CPU

Writes quant_profile.json (a list of rows: target, phase, parent, seconds, calls, share of the target's
quant_seconds, gpu) and quant_profile.md. Run it where scripts/gpu_check.sh installed the quantize group's wheels
(PYTHONPATH set); the shape world is built by the workflow's rules.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchlib import build_shape_inputs, gpu_name

ROOT = Path(__file__).resolve().parent.parent
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
    "GPTQ solve (compress)": ("llmcompressor.modifiers.gptq.base", "GPTQModifier.compress_modules", "quantize (oneshot)"),
    "AWQ smoothing (scale search)": ("llmcompressor.modifiers.transform.awq.base", "AWQModifier._apply_smoothing",
                                     "quantize (oneshot)"),
    "save_pretrained": ("transformers.modeling_utils", "PreTrainedModel.save_pretrained", None),
    "quantized measure": ("quantune.quantize", "measure_saved", None),
}


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
    """Wrap every phase that this installation has; returns the phases it does not (named in the table)."""
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
    return missing


def main(argv=None) -> int:

    from quantune.lib.config import _parse_set, load_config, load_recipe
    from quantune.lib.tables import markdown_table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", nargs="*", default=["gptq_opt67b", "awq_opt67b"])
    p.add_argument("--scale", default="shape", choices=["tiny", "shape"])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE config override (dotted keys)")
    a = p.parse_args(argv)
    cfg = load_config(overrides={"scale": a.scale, **_parse_set(a.set)})
    timers = Timers()
    missing = install(timers)
    from quantune.quantize import run  # after install: the stage's module-level names are the wrapped ones

    gpu = gpu_name()
    rows, md = [], ["# Where the time of a quantize target goes (quantize stage, llm-compressor)", "",
                    f"`python bench/quant_profile.py --scale {a.scale}`: the stage's own run, GPU synchronised around "
                    f"each phase; a nested phase is also counted in its parent. {gpu}.", ""]
    for name in a.targets:
        path = ROOT / "recipes" / f"{name}.yaml"
        build_shape_inputs(cfg, load_recipe(path, cfg))
        timers.seconds.clear()
        timers.calls.clear()
        with tempfile.TemporaryDirectory(prefix="quant-profile-", dir=ROOT / "results") as tmp:
            m = run(str(path), str(Path(tmp) / name), cfg)
        q = m.get("quant_seconds") or 0
        for phase, (_, _, parent) in PHASES.items():
            if timers.calls.get(phase):
                rows.append({"target": name, "phase": phase, "parent": parent, "seconds": timers.seconds[phase],
                             "calls": timers.calls[phase], "share_of_quant": timers.seconds[phase] / q if q else None,
                             "quant_seconds": q, "scale": a.scale, "gpu": gpu})
        md += [f"## {name} (quant_seconds {q:.1f})", ""] + markdown_table(
            ["phase", "inside", "seconds", "calls", "share of quant_seconds"],
            [[r["phase"], r["parent"] or "-", f"{r['seconds']:.2f}", r["calls"],
              "-" if r["share_of_quant"] is None else f"{r['share_of_quant']:.1%}"]
             for r in rows if r["target"] == name]) + [""]
    md += [f"Not found in this installation: {', '.join(missing)}" if missing else ""]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "quant_profile.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    (a.out / "quant_profile.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
