"""One group of shape-scale targets as rows (bench/results/shape_<group>.json and .md): for each target its status,
wall time (Snakemake's benchmark file), the speed and memory figures its metrics.json records, the GPU, the library
versions, and for a failed target the one-line error its log ends with. A target this run did not start (no log, no
metrics: a run of part of a group, QUANTUNE_TARGETS) keeps its row from the summary already in --out, if there is one;
each row names its GPU.

    python scripts/shape_summary.py quantize --results results/shape --out bench/results
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

GROUPS = {
    "lora": ["lora_distilgpt2_quick", "lora_mt0_large", "lora_sft_qwen", "lora_rank_sweep"],
    "qlora": ["qlora_chatglm_steps100", "qlora_chatglm_linear", "qlora_chatglm_cosine", "qlora_compare"],
    "quantize": ["eval_opt67b", "rtn_opt67b", "gptq_opt67b", "awq_opt67b"],
    "awq": ["awq_opt67b", "awq_opt67b_w3"],  # AWQ alone at 4 and 3 bits (a rerun after a fix)
    "quantize_w3": ["rtn_opt67b_w3", "gptq_opt67b_w3", "awq_opt67b_w3", "quant_compare"],
    "bnb": ["eval_opt27b", "bnb_int8_opt27b", "bnb_nf4_opt27b"],
    "sft": ["qwen3_deepspeed_sft"],
    "gguf": ["merge_lora_qwen", "gguf_f16_qwen", "gguf_q8_0", "gguf_q4_k_m", "gguf_q4_0", "gguf_eval"],
    "data": ["data_clean"],
}
COST = re.compile(r"(seconds|_per_s|per_step|steps_per_s|peak|_mb$|full_recipe_steps|global_step|tokens_seen)")
PEAK_KEYS = ("quant_peak_gpu_mb", "peak_mem_mb")


def wall_s(bench: Path) -> float | None:
    try:
        rows = list(csv.DictReader(bench.open(), delimiter="\t"))
        return round(float(rows[-1]["s"]), 1)
    except (OSError, KeyError, IndexError, ValueError):
        return None


EXC = re.compile(r"^(\[rank\d+\]:\s*)?([A-Za-z_.]+(Error|Exception)|Exception)\b.*:")


def error_line(log: Path) -> str:
    """The last `quantune: error:` line of a job's log, else its last exception line, else its last line."""
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return f"{log}: no log (the job did not start: see the Snakemake log)"
    errs = [x for x in lines if x.startswith("quantune: error:")] or [x for x in lines if EXC.match(x)]
    return (errs or lines or ["(empty log)"])[-1][:400]


def row(target: str, res: Path, gpu: str) -> dict:
    m_path = res / target / "metrics.json"
    out = {"target": target, "gpu": gpu, "wall_s": wall_s(res / "benchmarks" / f"{target}.tsv")}
    if not m_path.is_file():
        log = res / "logs" / f"{target}.log"
        return {**out, "status": "failed", "error": error_line(log), "started": log.is_file()}
    m = json.loads(m_path.read_text())
    peak = next((m[k] for k in PEAK_KEYS if isinstance(m.get(k), (int, float))), None)
    return {**out, "status": "ok", "stage": m.get("stage"), "device": m.get("device"),
            "peak_gib": round(peak / 1024, 2) if peak is not None else None,
            "speed": {k: v for k, v in sorted(m.items()) if COST.search(k) and isinstance(v, (int, float))
                      and not isinstance(v, bool)},
            "versions": {k[len("version_"):]: v for k, v in sorted(m.items()) if k.startswith("version_")}}


def kept(rows: list[dict], earlier_json: Path) -> list[dict]:
    """rows, where a target that did not start in this run takes its row from earlier_json (an earlier run's)."""
    if not earlier_json.exists():
        return rows
    try:
        earlier = {r["target"]: r for r in json.loads(earlier_json.read_text())}
    except (ValueError, KeyError, TypeError) as e:  # not overwritten: it may hold the only copy of earlier rows
        sys.exit(f"shape_summary: {earlier_json}: not a list of summary rows ({type(e).__name__}: {e}); "
                 "fix: repair it or move it aside")
    return [{**earlier[r["target"]], "kept": True} if r.get("started") is False and r["target"] in earlier else r
            for r in rows]


def shape_world_rows(res: Path, gpu: str) -> list[dict]:
    out = []
    for b in sorted((res / "shape_world" / "benchmarks").glob("shape_*.tsv")):
        name = b.stem  # shape_tokenizer, shape_model_<model>, shape_dataset_<data set> (rules/shape.smk)
        built = res / "shape_world" / "tokenizer"
        for prefix, sub in (("shape_model_", "models"), ("shape_dataset_", "data")):
            if name.startswith(prefix):
                built = res / "shape_world" / sub / name[len(prefix):]
        out.append({"target": name, "gpu": gpu, "wall_s": wall_s(b), "status": "ok" if built.exists() else "failed"})
    return out


def gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "unknown"


def to_md(group: str, rows: list[dict], world: list[dict]) -> str:
    lines = [f"# Shape scale, group `{group}`", "",
             f"`scripts/gpu_check.sh {group}`: the full recipes on random-weight models of the real architectures "
             "(config/hub_configs/), data at the real lengths, through the targets' own rules (`snakemake --config "
             "scale=shape`). Quality numbers at this scale mean nothing; time and memory are the real ones. "
             f"GPU: {', '.join(sorted({r['gpu'] for r in rows})) or '?'}.", "",
             "| target | status | wall s | peak GiB | figures (metrics.json) | gpu |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        figs = "; ".join(f"{k} {v:.4g}" for k, v in r.get("speed", {}).items()) if r["status"] == "ok" else r["error"]
        status = f"{r['status']} (an earlier run's)" if r.get("kept") else r["status"]
        lines.append(f"| {r['target']} | {status} | {r['wall_s'] or '-'} | {r.get('peak_gib') or '-'} | "
                     f"{figs.replace('|', '/')} | {r['gpu']} |")
    if world:
        lines += ["", "Shape world built in this run (models from their hub config, data sets):", "",
                  "| job | status | wall s |", "| --- | --- | --- |"]
        lines += [f"| {r['target']} | {r['status']} | {r['wall_s']} |" for r in world]
    versions = next((r["versions"] for r in sorted(rows, key=lambda r: bool(r.get("kept"))) if r.get("versions")), {})
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("group", choices=sorted(GROUPS))
    p.add_argument("--results", default="results/shape")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--targets", action="store_true", help="print the group's targets and exit")
    a = p.parse_args()
    if a.targets:
        print(" ".join(GROUPS[a.group]))
        return 0
    res, gpu = Path(a.results), gpu_name()
    out = Path(a.out)
    rows = kept([row(t, res, gpu) for t in GROUPS[a.group]], out / f"shape_{a.group}.json")
    world = shape_world_rows(res, gpu)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"shape_{a.group}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / f"shape_{a.group}.md").write_text(to_md(a.group, rows, world))
    print(to_md(a.group, rows, world))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
