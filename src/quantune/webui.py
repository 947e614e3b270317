"""The web page (Gradio) over what is built under results/ at the configured scale: chat with one or two built
models side by side, compare every target's numbers and loss curves, edit a recipe in a form made from its
stage's schema and launch its target through Snakemake, and read the README.

    python -m quantune.webui                     # http://127.0.0.1:7860
    python -m quantune.webui --port 8080 --set scale=shape
    python -m quantune.webui --host 0.0.0.0      # other machines too: prints a warning (no authentication)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

from .lib.common import ROOT, QuantuneError, fail, run_cli
from .lib.config import (_parse_set, add_config_args, config_from_args, known_stages, load_recipe, load_yaml,
                         results_dir)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
NUMBER_KINDS = (int, float)


class App:
    """What the page reads and runs: the config, the recipes, the chat models, the one Snakemake run."""

    def __init__(self, cfg: dict, overrides: dict, max_models: int, cores: int):
        from .lib.chat import ModelCache
        from .lib.launcher import Launcher

        self.cfg, self.results = cfg, Path(results_dir(cfg))
        self.recipes_dir = (ROOT / cfg["recipes_dir"]).resolve()
        self.cache = ModelCache(cfg, max_models)
        # the launched run sees the same config: the top-level keys this page was given
        items = {"scale": cfg["scale"], **{k.split(".")[0]: cfg[k.split(".")[0]] for k in overrides}}
        self.launcher = Launcher(cores, items)
        self.reload()

    def reload(self) -> None:
        """Recipes as the workflow loads them (one that does not load is listed with its error) and chat models."""
        from .lib.chat import catalogue

        self.recipes, self.recipe_errors = {}, {}
        for p in sorted(self.recipes_dir.glob("*.yaml")):
            try:
                self.recipes[p.stem] = load_recipe(p, self.cfg)
            except QuantuneError as e:
                self.recipe_errors[p.stem] = f"quantune: error: {e}"
        self.models = catalogue(self.cfg, self.recipes)

    # ------------------------------------------------------------ chat
    def chat(self, text, left, right, sample, temperature, top_p, max_new, seed, hist_l, hist_r):
        """Both sides answer the same prompt, one after the other, streaming; each turn stands alone."""
        from .lib.chat import Settings, stream

        s = Settings(bool(sample == "sampled"), float(temperature), float(top_p), int(max_new), int(seed or 0))
        hists, stats = [list(hist_l or []), list(hist_r or [])], ["", ""]
        if not (text or "").strip():
            yield hists[0], hists[1], "type a prompt", ""
            return
        for side, label in enumerate((left, right)):
            if not label:
                continue
            hists[side] += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
            cm = self.models.get(label)
            try:
                if cm is None:
                    raise fail(label, "not in the list of built models", "press 'refresh' and choose again")
                stats[side] = f"loading {label} ..."
                yield hists[0], hists[1], stats[0], stats[1]
                lm = self.cache.get(cm)
                for out, n, secs in stream(cm, lm, text, s):
                    hists[side][-1]["content"] = out
                    stats[side] = f"{n} tokens, {n / secs:.1f} tokens/s ({lm.device}; prompt: {cm.fmt})" if secs else ""
                    yield hists[0], hists[1], stats[0], stats[1]
            except Exception as e:  # noqa: BLE001 - a model that fails is one line in the page; the app serves on
                msg = str(e) if isinstance(e, QuantuneError) else f"{label}: {type(e).__name__}: {e}".splitlines()[0]
                hists[side][-1]["content"] = f"error: {msg}"
                stats[side] = f"error: {msg}"
                yield hists[0], hists[1], stats[0], stats[1]

    # ------------------------------------------------------------ compare
    def targets_table(self, stage: str, sort_by: str, descending: bool):
        """Every built target (metrics.json), one row each: name, stage, its numbers; filtered and sorted."""
        import pandas as pd

        from .report import discover

        built = [t for t in discover(self.results, self.recipes).values() if t.built]
        if stage and stage != "all":
            built = [t for t in built if t.stage == stage]
        rows = []
        for t in built:
            nums = {k: v for k, v in t.metrics.items()
                    if isinstance(v, NUMBER_KINDS) and not isinstance(v, bool) and not k.startswith("version_")}
            rows.append({"target": t.name, "stage": t.stage, "scale": t.metrics.get("scale", ""), **nums})
        df = pd.DataFrame(rows)
        if df.empty:
            return df
        head = ["target", "stage", "scale"]
        counts = df.notna().sum().sort_values(ascending=False, kind="stable")
        keep = [c for c in counts.index if c not in head]
        if not stage or stage == "all":  # across stages: the numbers two or more stages record
            keep = [c for c in keep if df.loc[df[c].notna(), "stage"].nunique() >= 2]
        df = df[head + keep]
        if sort_by in df.columns:
            df = df.sort_values(sort_by, ascending=not descending, na_position="last", kind="stable")
        return df.map(_cell)

    def runs_with_losses(self) -> list[str]:
        return sorted(str(p.parent.relative_to(self.results)) for p in self.results.glob("*/**/tb")
                      if (p.parent / "metrics.json").is_file())

    def loss_plot(self, runs: list[str]):
        from .lib.plots import plot_losses
        from .lib.tb import read_scalars

        series = {}
        for r in runs or []:
            d = (self.results / r).resolve()
            if self.results.resolve() in d.parents:
                series[r] = read_scalars(d / "tb").get("train/loss", [])
        if not any(series.values()):
            return None
        path = Path(tempfile.mkdtemp(prefix="quantune-webui-")) / "losses.png"
        plot_losses({k: v for k, v in series.items() if v}, path, "optimizer step", "training loss (TensorBoard)")
        return str(path)

    def stage_files(self, stage: str, md: str, png: str) -> tuple[str, str | None]:
        """The Markdown table and plot that the targets of one stage wrote (quant_compare, qlora_compare)."""
        texts, image = [], None
        names = sorted(n for n, r in self.recipes.items() if r["stage"] == stage)
        for name in names:
            d = self.results / name
            if (d / md).is_file():
                texts.append(f"### {name}\n\n" + (d / md).read_text(encoding="utf-8"))
                image = image or (str(d / png) if (d / png).is_file() else None)
        return "\n\n".join(texts) or f"nothing built yet: build it with `snakemake {' '.join(names)}`", image

    # ------------------------------------------------------------ recipes
    def recipe_form(self, name: str) -> tuple[dict, str, list]:
        """A recipe file as its form shows it: its keys, its stage, and the stage's fields in the file's order."""
        from .lib.recipe_form import fields_of, ordered, recipe_file

        path = recipe_file(name, self.recipes_dir)
        if not path.is_file():
            raise fail(str(path), "no such recipe", f"choose one of the recipes in {self.recipes_dir}")
        raw = load_yaml(path)
        raw = raw if isinstance(raw, dict) else {}
        stage = raw.get("stage")
        if stage not in known_stages():
            raise fail(f"{path}: key stage", f"unknown stage {stage!r}", f"use one of: {', '.join(known_stages())}")
        return raw, stage, ordered(fields_of(stage), raw)

    def check_form(self, stage, fields, name, values) -> tuple[dict | None, str]:
        from .lib.recipe_form import check, recipe_from_form

        where = str(self.recipes_dir / f"{name}.yaml")
        try:
            recipe = recipe_from_form(stage, fields, values, where)
        except QuantuneError as e:
            return None, f"quantune: error: {e}"
        err = check(recipe, name, self.cfg, self.recipes_dir, self.recipes)
        return (None, err) if err else (recipe, "")

    def save_form(self, stage, fields, name, overwrite, values) -> str:
        from .lib.recipe_form import save

        recipe, err = self.check_form(stage, fields, name, values)
        if err:
            return err
        try:
            path = save(recipe, name, self.recipes_dir, bool(overwrite))
        except QuantuneError as e:
            return f"quantune: error: {e}"
        self.reload()
        return f"saved {path} (target `{name}`)"


def _cell(v):
    """A table cell: floats to 4 significant digits, a number the target does not record empty."""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else v


def _progress_html(frac: float) -> str:
    pct = int(round(100 * frac))
    return (f'<div id="launch-progress-box"><progress id="launch-progress" max="100" value="{pct}" '
            f'style="width:100%"></progress> <span id="launch-progress-text">{pct}%</span></div>')


def _chat_tab(app: App) -> None:
    import gradio as gr

    labels = list(app.models)
    gr.Markdown("Each prompt is answered on its own, in the prompt format each model's recipe trained with.")
    with gr.Row():
        cols = []
        for side, default in (("left", labels[0] if labels else None), ("right", None)):
            with gr.Column():
                dd = gr.Dropdown(labels, value=default, label=f"{side} model", elem_id=f"chat-{side}-model")
                bot = gr.Chatbot(label=side, elem_id=f"chat-{side}", height=360, render_markdown=False)
                stat = gr.Markdown(elem_id=f"chat-{side}-stats")
                cols.append((dd, bot, stat))
    prompt = gr.Textbox(label="prompt", elem_id="chat-prompt", lines=2)
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id="chat-send")
        clear = gr.Button("Clear", elem_id="chat-clear")
        refresh = gr.Button("Refresh models", elem_id="chat-refresh")
    with gr.Accordion("Generation settings", open=False):
        mode = gr.Radio(["greedy", "sampled"], value="greedy", label="decoding")
        temp = gr.Slider(0.05, 2.0, value=0.7, label="temperature")
        top_p = gr.Slider(0.05, 1.0, value=0.9, label="top_p")
        max_new = gr.Slider(1, 512, value=48, step=1, label="max new tokens", elem_id="chat-max-new")
        seed = gr.Number(0, precision=0, label="seed")
    (ldd, lbot, lstat), (rdd, rbot, rstat) = cols
    send.click(app.chat, [prompt, ldd, rdd, mode, temp, top_p, max_new, seed, lbot, rbot],
               [lbot, rbot, lstat, rstat])
    clear.click(lambda: ([], [], "", ""), None, [lbot, rbot, lstat, rstat])

    def refresh_models():
        app.reload()
        return gr.update(choices=list(app.models)), gr.update(choices=list(app.models))

    refresh.click(refresh_models, None, [ldd, rdd])



def _compare_tab(app: App) -> None:
    import gradio as gr

    first = app.targets_table("all", "target", False)
    stages = ["all"] + sorted({r["stage"] for r in app.recipes.values()} | {"tiny_world"})
    with gr.Row():
        stage = gr.Dropdown(stages, value="all", label="stage", elem_id="compare-stage")
        sort_by = gr.Dropdown(list(first.columns), value="target", label="sort by column",
                              allow_custom_value=True, elem_id="compare-sort")
        desc = gr.Checkbox(False, label="descending")
        show = gr.Button("Show", elem_id="compare-show")
    table = gr.Dataframe(first, elem_id="compare-table", wrap=True, max_height=4000)
    show.click(app.targets_table, [stage, sort_by, desc], table)
    runs = gr.Dropdown(app.runs_with_losses(), multiselect=True, label="loss curves of (TensorBoard train/loss)",
                       elem_id="compare-runs")
    losses = gr.Image(label="training loss", type="filepath", elem_id="compare-losses")
    runs.change(app.loss_plot, runs, losses)
    qmd, qpng = app.stage_files("quantize_compare", "compare.md", "compare.png")
    with gr.Accordion("Quantization", open=False):
        gr.Markdown(qmd, elem_id="compare-quant")
        gr.Image(qpng, label="quantization", type="filepath", visible=qpng is not None)
    lmd, lpng = app.stage_files("lora_compare", "comparison.md", "loss_curves.png")
    with gr.Accordion("QLoRA side by side (BLEU-4 / ROUGE-L)", open=False):
        gr.Markdown(lmd, elem_id="compare-lora")
        gr.Image(lpng, label="loss curves", type="filepath", visible=lpng is not None)



def _recipe_tab(app: App):
    """The recipe picker and the form made from its stage's schema; returns the status line the form writes."""
    import gradio as gr

    from .lib.recipe_form import UNSET, form_value

    names = sorted(set(app.recipes) | set(app.recipe_errors))
    pick = gr.Dropdown(names, value=names[0] if names else None, label="recipe", elem_id="recipe-pick")
    status = gr.Markdown(elem_id="recipe-status")

    @gr.render(inputs=pick)
    def form(name):
        if not name:
            return
        try:
            raw, stage_name, fs = app.recipe_form(name)
        except QuantuneError as e:
            gr.Markdown(f"quantune: error: {e}")
            return
        gr.Markdown(f"stage **{stage_name}**" + (f"; as it is, this file fails: {app.recipe_errors[name]}"
                                                 if name in app.recipe_errors else ""))
        comps = []
        with gr.Column(elem_id="recipe-form"):
            for f in fs:
                v, eid, key = form_value(f, raw), f"recipe-field-{f.key}", f"{name}:{f.key}"
                if f.kind in ("bool", "enum"):
                    ch = [UNSET] + (["true", "false"] if f.kind == "bool" else f.choices)
                    comps.append(gr.Dropdown(ch, value=v, label=f.key, info=f.help or None, elem_id=eid,
                                             interactive=True, key=key))
                else:  # numbers too: an empty box leaves the key unset
                    comps.append(gr.Textbox(v, label=f.key, info=f.help or None, elem_id=eid, interactive=True, key=key,
                                            lines=3 if f.kind == "yaml" and "\n" in (v or "") else 1))
        with gr.Row():
            save_as = gr.Textbox(name, label="save as (recipes/<name>.yaml; the target's name)",
                                 elem_id="recipe-save-as", interactive=True)
            overwrite = gr.Checkbox(False, label="overwrite an existing file", elem_id="recipe-overwrite",
                                    interactive=True)
            check_b = gr.Button("Validate", elem_id="recipe-validate")
            save_b = gr.Button("Save", variant="primary", elem_id="recipe-save")

        def on_check(new, *vals):
            return app.check_form(stage_name, fs, new, list(vals))[1] or f"valid: recipes/{new}.yaml"

        check_b.click(on_check, [save_as, *comps], status)
        save_b.click(lambda new, ow, *vals: app.save_form(stage_name, fs, new, ow, list(vals)),
                     [save_as, overwrite, *comps], status)

    pick.change(lambda: "", None, status)
    return status


def _launch_panel(app: App, status) -> None:
    import gradio as gr

    gr.Markdown("### Launch a target through Snakemake (one run at a time)")
    with gr.Row():
        target = gr.Dropdown(sorted(app.recipes), label="target", elem_id="launch-target",
                             allow_custom_value=False)
        launch = gr.Button("Launch", variant="primary", elem_id="launch-start")
        cancel = gr.Button("Cancel", variant="stop", elem_id="launch-cancel")
    progress = gr.HTML(_progress_html(0), elem_id="launch-progress-html")
    lstatus = gr.Markdown(elem_id="launch-status")
    log = gr.Textbox(label="Snakemake log", lines=16, max_lines=16, autoscroll=True, elem_id="launch-log")
    launch.click(lambda t: app.launcher.start(t or "", sorted(app.recipes)), target, lstatus)
    cancel.click(lambda: app.launcher.cancel(), None, lstatus)

    def poll():
        st = app.launcher.status()
        return app.launcher.log(), _progress_html(app.launcher.fraction()), st

    gr.Timer(1.0).tick(poll, None, [log, progress, lstatus])
    status.change(lambda: gr.update(choices=sorted(app.recipes)), None, target)



def build(app: App):
    import gradio as gr

    with gr.Blocks(title="quantune", analytics_enabled=False) as demo:
        gr.Markdown(f"# quantune\nscale **{app.cfg['scale']}**, results in `{app.results}`")
        with gr.Tab("Chat", id="chat"):
            _chat_tab(app)
        with gr.Tab("Compare", id="compare"):
            _compare_tab(app)
        with gr.Tab("Recipes", id="recipes"):
            _launch_panel(app, _recipe_tab(app))
        with gr.Tab("Docs", id="docs"):
            gr.Markdown((ROOT / "README.md").read_text(encoding="utf-8"), elem_id="docs")
    return demo


def serve(a) -> None:
    if a.host not in LOOPBACK:
        print(f"quantune.webui: warning: serving on {a.host}: anyone who reaches this machine's port {a.port} can chat "
              "with the models and launch targets (no authentication)", file=sys.stderr)
    cfg = config_from_args(a)
    app = App(cfg, _parse_set(a.set), a.max_models, a.cores)
    print(f"quantune.webui: {len(app.models)} models to chat with, {len(app.recipes)} recipes, results {app.results}")
    build(app).queue(default_concurrency_limit=1).launch(server_name=a.host, server_port=a.port, share=False,
                                                          inbrowser=False, show_error=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantune.webui", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to serve on (default %(default)s: this machine only; any other prints a warning)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-models", type=int, default=2, help="models kept loaded at once (least recently used go)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="--cores of a launched Snakemake run")
    add_config_args(p)
    p.set_defaults(func=serve)
    return p


def main(argv=None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
