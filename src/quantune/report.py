"""Reports: gather finished targets' metrics into tables, plots and one page.

    python -m quantune.report build --results results [--recipes recipes] [--md results/REPORT.md]
        [--html results/report/index.html] [--figures results/report/figures]
    python -m quantune.report tensorboard-screenshot --logdir results --run REGEX --out PNG

`build` reads what exists under the results directory and never builds anything: every target that has a
metrics.json is reported from it, in the section of its `stage` field; every recipe (and every target a stage's
declaration names, e.g. the tiny world) that has none is listed as "not built". A section reads only the keys
its stages declare in config/schemas/metrics/<stage>.schema.yaml. A number the report shows is one a target
measured and wrote; a field a target does not record is shown as "—", never as 0.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .lib.common import atomic_write_text, run_cli
from .lib.metrics import declared_stages
from .lib.report_lora import GGUF, LoRA, RankSweep
from .lib.report_render import MISSING, Block, F, H2, P, T, fmt, grey_quality, render_html, render_markdown
from .lib.report_sections import SFT, Ctx, Evaluate, Other, QuantCompare, Quantization, Section, StageFields, TinyWorld
from .lib.report_seed001 import seed001_table
from .lib.report_targets import Target, declared_targets, scales

__all__ = ["build_report", "fmt", "read_recipes", "recipe_stages", "discover", "sections"]

NOT_TARGET_DIRS = {"logs", "benchmarks", "report", *scales()}  # a scale's own results tree, e.g. results/full
SECTIONS: list[Section] = [TinyWorld(), Evaluate(), Quantization(), QuantCompare(), LoRA(), SFT(), GGUF(), RankSweep()]

# ================================================================ discovery


def read_recipes(recipes_dir: str | Path | None) -> dict[str, dict]:
    """{recipe name: its top-level keys} read from the recipe files (the workflow validates recipes)."""
    import yaml

    out: dict[str, dict] = {}
    if recipes_dir is None or not Path(recipes_dir).is_dir():
        return out
    for p in sorted(Path(recipes_dir).glob("*.yaml")):
        try:
            r = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            r = {}
        out[p.stem] = {**r, "stage": str(r.get("stage", "?"))} if isinstance(r, dict) else {"stage": "?"}
    return out


def recipe_stages(recipes_dir: str | Path | None) -> dict[str, str]:
    """{recipe name: stage} read from the recipe files."""
    return {n: r["stage"] for n, r in read_recipes(recipes_dir).items()}


def discover(results: str | Path, recipes: dict[str, dict]) -> dict[str, Target]:
    """Every target under `results` with a metrics.json, plus every recipe (not built)."""
    results = Path(results)
    names = set(recipes)
    if results.is_dir():
        names |= {d.name for d in results.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and d.name not in NOT_TARGET_DIRS and (d / "metrics.json").is_file()}
    out: dict[str, Target] = {}
    for name in sorted(names):
        d = results / name
        t = Target(name=name, dir=d, recipe=recipes.get(name, {}))
        mf = d / "metrics.json"
        if mf.is_file():
            try:
                m = json.loads(mf.read_text(encoding="utf-8"))
                if not isinstance(m, dict):
                    raise ValueError("not a JSON object")
                t.metrics, t.status = m, "built"
            except (ValueError, UnicodeDecodeError) as e:
                t.status, t.note = "unreadable", f"{mf}: {e}"
        elif d.is_dir():
            t.note = "no metrics.json yet: running, interrupted or failed"
        out[name] = t
    return out


def sections(targets: dict[str, Target]) -> list[tuple[Section, list[Target]]]:
    """Each target in the section of its stage: a section of the report's own, else one per declared stage, else
    "other" (an undeclared stage, or an unreadable metrics.json); sections without targets are left out."""
    by_stage = {st: s for s in SECTIONS for st in s.stages}
    for st in declared_stages():
        by_stage.setdefault(st, StageFields(st))
    order = SECTIONS + [s for st, s in by_stage.items() if s not in SECTIONS] + [Other()]
    found: dict[str, list[Target]] = {s.key: [] for s in order}
    for t in sorted(targets.values(), key=lambda t: t.name):
        found[by_stage.get(t.stage, order[-1]).key].append(t)
    return [(s, found[s.key]) for s in order if found[s.key]]


# ================================================================ the whole report


def _overview(results: Path, secs, built: list[Target], missing: list[Target], scale: str) -> list[Block]:
    rows = [[s.title, f"`{t.name}`", t.status_cell(), str(t.stage or MISSING), str(t.get("written_at", "")),
             f"`{t.get('git_commit')}`" if t.built else ""] for s, ts in secs for t in ts]
    return [H2("Overview", "overview"), P(
        f"Results directory `{results}`; {len(built)} targets built, {len(missing)} not built. Every number below is "
        "read from a target's `metrics.json` (or its TensorBoard events); a target that is not built is listed as "
        f"\"not built\", and a field a built target does not record is shown as \"{MISSING}\"."
        + (" Scale tiny: tiny models on a tiny corpus, numbers that test the pipeline, not the real models."
           if scale == "tiny" else "")
        + (" Scale shape: the full recipes on random-weight models of the real architectures. Time and memory are "
           "the real ones; quality numbers (perplexity, loss, KL, BLEU, ROUGE) mean nothing at random weights and "
           "are greyed (italic in REPORT.md)." if scale == "shape" else "")),
        T(["section", "target", "status", "stage", "written at (UTC)", "git commit"], rows)]


def _provenance(targets: dict[str, Target]) -> list[Block]:
    main = ("version_python", "version_torch", "version_transformers")
    rows = []
    for t in (t for t in targets.values() if t.built):
        versions = {k: v for k, v in sorted(t.metrics.items()) if k.startswith("version_") and t.declares(k)}
        others = ", ".join(f"{k[len('version_'):]} {v}" for k, v in versions.items() if k not in main)
        rows.append([f"`{t.name}`", str(t.stage or MISSING), t.value_or_missing("scale"),
                     f"`{t.get('git_commit', MISSING)}`", str(t.get("written_at", MISSING))]
                    + [str(versions.get(k, MISSING)) for k in main] + [others or MISSING])
    return [H2("Provenance", "provenance"), P("Each row traces a target to the code (git commit; -dirty: uncommitted "
                                              "changes) and library versions that produced it."),
            T(["target", "stage", "scale", "git commit", "written at (UTC)", "python", "torch", "transformers",
               "other libraries"], rows)]


def _tensorboard(results: Path, tb_screenshot) -> tuple[list[Block], list[str]]:
    runs = sorted({str(p.parent.relative_to(results)) for p in results.rglob("events.out.tfevents.*")
                   if not any(part.startswith(".") for part in p.relative_to(results).parts)})
    out = [H2("TensorBoard", "tensorboard"),
           P(f"`tensorboard --logdir {results}` lists {len(runs)} runs, named by their directory: "
             + ", ".join(f"`{r}`" for r in runs[:60]) + ("…" if len(runs) > 60 else "") + ". Tags: "
             "`train/loss`, `train/lr`, `train/grad_norm`, `eval/loss`, `eval/ppl`, `quant/...`, "
             "`system/tokens_per_s`, `system/peak_mem_mb`, `system/wall_s`, `final/<metric>`.")]
    if tb_screenshot and Path(tb_screenshot).is_file():
        out.append(F(tb_screenshot, "TensorBoard's time-series view of the tiny OPT pretraining run "
                                    "(headless Chromium screenshot)"))
    return out, runs


def build_report(results: str | Path, recipes: dict[str, str | dict], md_out: str | Path | None = None,
                 html_out: str | Path | None = None, figures: str | Path | None = None,
                 tb_screenshot: str | Path | None = None, scale: str | None = None) -> dict:
    """Scan `results`, write REPORT.md and the HTML page; return what was found (for tests and logs).
    `recipes`: {recipe name: its stage, or its keys (read_recipes)}."""
    results = Path(results)
    figures = Path(figures) if figures else results / "report" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    scale = scale or (results.name if results.name in scales() else "tiny")
    known = {n: {"stage": st} for n, st in declared_targets(scale).items()}
    known.update({n: r if isinstance(r, dict) else {"stage": r} for n, r in recipes.items()})
    targets = discover(results, known)
    ctx = Ctx(results=results, figures=figures, targets=targets)
    secs = sections(targets)
    built = [t for t in targets.values() if t.built]
    missing = [t for t in targets.values() if not t.built]

    blocks = _overview(results, secs, built, missing, scale)
    blocks += [H2("Seed 001: quantization methods, measured", "seed001")] + seed001_table(ctx)
    for sec, ts in secs:
        blocks += [H2(sec.title, sec.key)] + [b for b in sec.render(ts, ctx) if not (b.kind == "p" and not b.text)]
    tb_blocks, runs = _tensorboard(results, tb_screenshot)
    blocks += tb_blocks + _provenance(targets)
    if scale == "shape":
        grey_quality(blocks)

    title = "quantune report"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    md_out = Path(md_out) if md_out else results / "REPORT.md"
    html_out = Path(html_out) if html_out else results / "report" / "index.html"
    atomic_write_text(md_out, render_markdown(blocks, title, md_out.parent).replace(
        f"# {title}\n", f"# {title}\n\nBuilt {stamp} from `{results}`. HTML version: "
        f"`{html_out.relative_to(md_out.parent) if html_out.is_relative_to(md_out.parent) else html_out}`.\n", 1))
    atomic_write_text(html_out, render_html(blocks, title, f"built {stamp} from {results}; {len(built)} targets "
                                                           f"built, {len(missing)} not built", html_out.parent))
    return {"built": sorted(t.name for t in built), "not_built": sorted(t.name for t in missing),
            "sections": {s.key: [t.name for t in ts] for s, ts in secs}, "runs": runs,
            "figures": sorted(str(b.path) for b in blocks if b.kind == "figure")}


def _cmd_build(a) -> None:
    recipes: dict[str, str | dict] = read_recipes(a.recipes)
    if a.recipe_stages:  # the workflow's recipes (names and stages); the files add the keys the report reads
        recipes = {n: {**recipes.get(n, {}), "stage": st} for n, st in json.loads(a.recipe_stages).items()}
    r = build_report(a.results, recipes, a.md, a.html, a.figures, a.tensorboard_png, a.scale)
    print(f"report: {len(r['built'])} targets built ({', '.join(r['built']) or 'none'}); "
          f"{len(r['not_built'])} not built ({', '.join(r['not_built']) or 'none'}); {len(r['runs'])} TensorBoard runs")


def _cmd_tb_screenshot(a) -> None:
    from .lib.browser import screenshot_tensorboard

    info = screenshot_tensorboard(a.logdir, a.run, a.out, tag_regex=a.tags)
    print(json.dumps(info))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantune.report", description=__doc__.splitlines()[0])
    sub = p.add_subparsers()
    b = sub.add_parser("build", help="REPORT.md and the HTML report from whatever is built under --results")
    b.add_argument("--results", required=True)
    b.add_argument("--recipes", default="recipes", help="recipes directory (target names, stages, methods)")
    b.add_argument("--recipe-stages", default=None, help='{"<recipe>": "<stage>"}: the targets, instead of the '
                                                         "--recipes file names")
    b.add_argument("--md", default=None, help="default: <results>/REPORT.md")
    b.add_argument("--html", default=None, help="default: <results>/report/index.html")
    b.add_argument("--figures", default=None, help="default: <results>/report/figures")
    b.add_argument("--tensorboard-png", default=None, help="a TensorBoard screenshot to embed, when it exists")
    b.add_argument("--scale", choices=scales(), default=None,
                   help="default: the scale --results is named after (results/full), else tiny")
    b.set_defaults(func=_cmd_build)
    s = sub.add_parser("tensorboard-screenshot", help="serve --logdir with TensorBoard on localhost and screenshot "
                                                      "one run's scalars in headless Chromium")
    s.add_argument("--logdir", required=True)
    s.add_argument("--run", required=True, help="run name regex, e.g. ^tiny_world/models/opt/tb$")
    s.add_argument("--tags", default="^(train|eval|system)/", help="tag regex")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_tb_screenshot)
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
