"""How cost grows with model size, at scale shape, through the stages' own code: one recipe run unchanged on
models of one family at several sizes (random weights, config/hub_configs/), its time and peak GPU memory against
the parameter count, one table and one plot per recipe.

    python bench/shape_scaling.py --out bench/results                    # every series (on the GPU machine)
    python bench/shape_scaling.py --series rtn_opt67b --out bench/results
    python bench/shape_scaling.py --series qlora_chatglm_linear --models chatglm3-6b --out bench/results  # one row

Series: rtn_opt67b (W4 g128) on OPT 125m / 1.3b / 2.7b / 6.7b (GPTQ's and AWQ's series are bench/quant_speed.py's:
llm-compressor's own call and the fast path side by side); the QLoRA recipe qlora_chatglm_linear (NF4, r 4 on the
attention's q/k/v, 16 x 4 rows of AdvertiseGen lengths, the shape caps' steps) on Qwen2.5-0.5B / Qwen2.5-1.5B /
ChatGLM3-6B shapes (ChatGLM3's fused query_key_value is q/k/v there). Each run is the stage's run on a copy of the
recipe with `model:` (and for a decoder without ChatGLM's module names, `target_modules`) replaced; the shape
world's models and data are built by the workflow's own rules.
Writes shape_scaling.json (rows: series, model, params, seconds, peak_gib, the stage's figures, gpu) and .md, and
shape_scaling_<series>.png; rows of an earlier run in --out that this run does not redo are kept (the gpu column
says where each ran). Run it where scripts/gpu_check.sh has installed the stack (PYTHONPATH set).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml
from benchlib import build_shape_inputs, earlier, gpu_name, merged, run_stamp

ROOT = Path(__file__).resolve().parent.parent
SERIES = {
    "rtn_opt67b": ["opt-125m", "opt-1.3b", "opt-2.7b", "opt-6.7b"],
    "qlora_chatglm_linear": ["qwen2.5-0.5b", "qwen2.5-1.5b", "chatglm3-6b"],
}
QKV = ["q_proj", "k_proj", "v_proj"]  # ChatGLM3's query_key_value, in a decoder that keeps them apart


def recipe_copy(name: str, model: str, cfg: dict, tmp: Path) -> Path:
    """recipes/<name>.yaml with another model: the file keeps the recipe's name, so its checks and caps apply."""
    r = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text(encoding="utf-8"))
    r["model"] = model
    if "target_modules" in r and not cfg["models"][model].get("shape_modules"):
        r["target_modules"] = [m for t in r["target_modules"] for m in (QKV if t == "query_key_value" else [t])]
        r.get("shape", {}).pop("target_modules", None)
    d = tmp / model
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.yaml").write_text(yaml.safe_dump(r, allow_unicode=True), encoding="utf-8")
    return d / f"{name}.yaml"


def run_one(name: str, model: str, cfg: dict, tmp: Path) -> dict:
    from quantune.lib.config import load_recipe

    path = recipe_copy(name, model, cfg, tmp)
    recipe = load_recipe(path, cfg)
    build_shape_inputs(cfg, recipe, model)
    out = tmp / "out" / model / name
    t0 = time.perf_counter()
    if recipe["stage"] == "quantize":
        from quantune.quantize import run

        m = run(str(path), str(out), cfg)
        seconds, peak = m["quant_seconds"], m.get("quant_peak_gpu_mb")
        figures = {k: m.get(k) for k in ("quant_seconds", "gptq_layers", "ppl_base")}
    else:
        from quantune.lora_sft import train

        m = train(str(path), str(out), cfg)
        seconds, peak = m["seconds_per_step"], m.get("peak_mem_mb")
        figures = {k: m.get(k) for k in ("speed", "real_tokens_per_s", "seconds_per_step", "warmup_step_seconds",
                                         "projected_full_seconds")}
    shape = json.loads((Path(cfg["results"]["shape"]) / "shape_world" / "models" / model / "shape_model.json").read_text())
    return {"series": name, "model": model, "params": shape["params"], "dtype": shape["dtype"],
            "seconds": round(seconds, 3), "seconds_kind": "quantization" if recipe["stage"] == "quantize" else "per step",
            "peak_gib": round(peak / 1024, 2) if peak else None, "wall_s": round(time.perf_counter() - t0, 1),
            "figures": figures, "gpu": gpu_name(), "run": run_stamp()}


def rank(row: dict) -> int:
    """A row's place in SERIES order (rows of series or models no longer in SERIES last)."""
    order = [(name, model) for name, models in SERIES.items() for model in models]
    k = (row["series"], row["model"])
    return order.index(k) if k in order else len(order)


def write(rows: list[dict], out: Path) -> None:
    from quantune.lib.report_render import plot
    from quantune.lib.tables import markdown_table

    out.mkdir(parents=True, exist_ok=True)
    (out / "shape_scaling.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    md = ["# How cost grows with model size (scale shape)", "",
          "`python bench/shape_scaling.py --out bench/results`: each recipe unchanged on random-weight models of one "
          "family at several sizes, through the stage's own run. Seconds: quantization time (quantize) or seconds "
          "per optimizer step (lora_sft); peak: the CUDA allocator's peak.", ""]
    for name in dict.fromkeys(r["series"] for r in rows):
        rs = [r for r in rows if r["series"] == name]
        md += [f"## {name}", ""]
        rate = [f"{r['figures']['real_tokens_per_s']:,.0f}" if r["figures"].get("real_tokens_per_s") else "-"
                for r in rs]  # lora_sft's timed steps (the first, warm-up step left out)
        md += markdown_table(["model", "parameters", "dtype", f"seconds ({rs[0]['seconds_kind']})", "real tokens/s",
                              "peak GiB", "wall s", "gpu"],
                             [[r["model"], f"{r['params']:,}", r["dtype"], r["seconds"], t, r["peak_gib"], r["wall_s"],
                               r["gpu"]] for r, t in zip(rs, rate)]) + [""]
        for key, label in (("seconds", f"seconds ({rs[0]['seconds_kind']})"), ("peak_gib", "peak GPU GiB")):
            png = plot(out / f"shape_scaling_{name}_{key}.png",
                       {name: [(r["params"] / 1e9, r[key]) for r in rs if r[key] is not None]},
                       "parameters (billions)", label, f"{name}: {label} against model size", marker="o", zero_y=True)
            if png:
                md += [f"![{name} {key}]({png.name})", ""]
    (out / "shape_scaling.md").write_text("\n".join(md), encoding="utf-8")


def main(argv=None) -> int:
    from quantune.lib.config import load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--series", nargs="*", default=list(SERIES), choices=list(SERIES))
    p.add_argument("--models", nargs="*", default=None, help="only these models of each series")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = p.parse_args(argv)
    cfg = load_config(overrides={"scale": "shape"})
    # a run of some series or models replaces their rows in an earlier shape_scaling.json and keeps the others
    kept = earlier(a.out / "shape_scaling.json", [])
    rows = []
    (ROOT / "results").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shape-scaling-", dir=ROOT / "results") as tmp:
        for name in a.series:
            for model in SERIES[name]:
                if a.models and model not in a.models:
                    continue
                print(f"shape_scaling: {name} on {model}", flush=True)
                rows.append(run_one(name, model, cfg, Path(tmp)))
                # after each run: a later failure keeps what finished
                write(merged(kept, rows, lambda r: (r["series"], r["model"]), rank), a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
