"""The report stage: REPORT.md and the HTML page from whatever is built.

Synthetic result directories (in a temp dir) test only the layout: which section a target lands in, "not
built" for targets without a metrics.json, "not measured" in seed 001's table, the HTML page. The numbers
the report shows for real targets are checked against the targets built now (the `tiny_world` fixture and
whatever else exists under the test results directory)."""
from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import ROOT, snakemake
from quantune.report import build_report, fmt, read_recipes, recipe_stages

PNG = b"\x89PNG\r\n\x1a\n"


def write(d: Path, name: str, metrics: dict, **files: str) -> Path:
    t = d / name
    t.mkdir(parents=True, exist_ok=True)
    (t / "metrics.json").write_text(json.dumps({"target": name, "scale": "tiny", "git_commit": "abc123",
                                                "version_torch": "2.13.0+cpu", **metrics}))
    for fname, text in files.items():
        (t / fname.replace("__", ".")).write_text(text)
    return t


@pytest.fixture()
def synthetic(tmp_path) -> Path:
    """Result dirs shaped like the stages' outputs (their declared keys), with made-up numbers (layout only)."""
    from quantune.lib.tb import TBWriter

    res = tmp_path / "results"
    common = {"model": "opt-6.7b", "eval_context": 128, "eval_stride": 128}
    write(res, "eval_opt67b", {"stage": "evaluate", "eval_ppl": 200.0, "dataset": "wikitext2", "split": "test",
                               **common})
    write(res, "gptq_opt67b", {"stage": "quantize", "method": "gptq", "bits": 4, "group_size": 128, "ppl_base": 199.5,
                               "ppl_quant": 212.5, "ppl_delta": 13.0, "size_bytes": int(3.25 * 2**20),
                               "size_ratio": 0.25, "eval_dataset": "wikitext2", "eval_split": "test", **common})
    write(res, "bnb_int8_opt27b", {"stage": "quantize", "method": "bnb_int8", "bits": 8, "model": "opt-2.7b",
                                   "ppl_base": 100.0, "ppl_quant": 101.5, "ppl_delta": 1.5, "size_bytes": 2**21,
                                   "size_bytes_base": 2**22, "size_ratio": 0.5, "quant_peak_mem_mb": 512.0})
    write(res, "quant_compare", {"stage": "quantize_compare", "n_targets": 2, "n_anchors": 0},
          compare__md="# Quantization comparison (tiny scale)\n\n| model | ppl |\n| --- | --- |\n| x | 1.5 |\n",
          compare__csv="target,ppl\nx,1.5\n")
    for name, sched, last in [("qlora_chatglm_linear", "linear", 2.25), ("qlora_chatglm_cosine", "cosine", 2.5)]:
        t = write(res, name, {"stage": "lora_sft", "quantization": "nf4", "lr_scheduler_type": sched,
                              "train_loss_first": 3.5, "train_loss_last": last, "eval_ppl": 9.875,
                              "params_trainable_pct": 1.5, "params_total": 1000})
        with TBWriter(t / "tb") as tb:
            for step in range(0, 40, 10):
                tb.scalars({"train/loss": 3.5 - step / 40, "train/lr": 1e-3 * (1 - step / 40)}, step)
    rows = [{"prompt": "类型#裙*颜色#黑色", "reference": "一条黑色的裙子",
             "generations": {s: {"greedy": {"text": f"{s} greedy text"}, "sampled": {"text": f"{s} sampled"}}
                             for s in ("base", "linear", "cosine")}}]
    write(res, "qlora_compare", {"stage": "lora_compare", "num_prompts": 1, "dataset": "advertisegen",
                                 "adapters": {"linear": "qlora_chatglm_linear", "cosine": "qlora_chatglm_cosine"},
                                 "scores": {"base": {"greedy": {"bleu4": 1.25}}, "cosine": {"greedy": {"bleu4": 6.5}},
                                            "linear": {"greedy": {"bleu4": 7.125, "rougeL": 20.5}}}},
          comparison__json=json.dumps({"rows": rows}))
    write(res, "qwen3_deepspeed_sft", {"stage": "sft", "eval_loss_epoch0": 3.0, "eval_ppl_epoch0": 20.09,
                                       "eval_loss_epoch1": 2.5, "eval_ppl_epoch1": 12.18, "best_epoch": 1,
                                       "epochs_run": 1})
    write(res, "gguf_eval", {"stage": "gguf_evaluate", "hf_ppl": 50.0, "gguf_f16_qwen_file_bytes": 4 * 2**20,
                             "gguf_f16_qwen_ppl": 50.25, "gguf_q4_0_file_bytes": 2**20, "gguf_q4_0_ppl": 61.5,
                             "gguf_q4_0_ppl_ratio_vs_gguf_f16_qwen": 1.224, "gguf_f16_qwen_ppl_ratio_vs_hf": 1.005,
                             "gguf_q4_0_tg_tokens_per_s": 333.0})
    write(res, "sweep_x", {"stage": "lora_sweep", "runs": {"16": {"params_trainable": 2048, "eval_loss": 2.5},
                                                           "4": {"params_trainable": 512, "eval_loss": 2.75}}})
    write(res, "distill_x", {"stage": "distill", "kl": 0.125})  # a stage without a declaration
    (res / "qlora_chatglm_steps100").mkdir()  # started, no metrics.json yet
    (res / "broken").mkdir()
    (res / "broken" / "metrics.json").write_text("{not json")
    return res


def md_row(md: str, target: str) -> list[str]:
    lines = [ln for ln in md.splitlines() if ln.startswith(f"| `{target}` |")]
    assert lines, f"no table row for {target}"
    return [c.strip() for c in lines[0].strip("|").split(" | ")]


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.imgs, self.missing_cells, self._td = [], [], 0, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "td" and a.get("class") == "missing":
            self.missing_cells += 1


def test_at_scale_shape_quality_columns_are_greyed_and_cost_columns_are_not(synthetic, tmp_path):
    out = build_report(synthetic, read_recipes(ROOT / "recipes"), tmp_path / "REPORT.md",
                       tmp_path / "report" / "index.html", tmp_path / "report" / "figures", scale="shape")
    assert "gptq_opt67b" in out["built"]
    html = (tmp_path / "report" / "index.html").read_text()
    assert "Scale shape" in html and "mean nothing" in html
    own = re.sub(r'<div class="embedded">.*?</div>', "", html, flags=re.S)  # a target's own Markdown, embedded
    assert html.count("the quality numbers below mean nothing") == html.count('<div class="embedded">') > 0
    heads = re.findall(r"<th( class=\"shape-quality\"[^>]*)?>([^<]*)</th>", own)
    greyed = {h for cls, h in heads if cls}
    plain = {h for cls, h in heads if not cls}
    assert any("ppl" in h for h in greyed) and not [h for h in plain if "ppl" in h], [h for h in plain if "ppl" in h]
    assert any("size" in h.lower() for h in plain) and not any("size" in h.lower() for h in greyed)
    md = (tmp_path / "REPORT.md").read_text()
    assert "*212.5*" in md_row(md, "gptq_opt67b")  # ppl_quant, italic in Markdown
    tiny = build_report(synthetic, read_recipes(ROOT / "recipes"), tmp_path / "t.md", tmp_path / "t.html",
                        tmp_path / "tf", scale="tiny")
    assert tiny["built"] == out["built"] and 'class="shape-quality"' not in (tmp_path / "t.html").read_text()


def test_layout_sections_not_built_and_html_from_synthetic_results(synthetic, tmp_path):
    out = build_report(synthetic, read_recipes(ROOT / "recipes"), tmp_path / "REPORT.md",
                       tmp_path / "report" / "index.html", tmp_path / "report" / "figures")
    sec = out["sections"]
    assert "gptq_opt67b" in sec["quantization"] and "eval_opt67b" in sec["evaluate"]
    assert {"qlora_chatglm_linear", "qlora_chatglm_cosine", "qlora_compare"} <= set(sec["qlora"])
    assert "gguf_eval" in sec["gguf"] and "qwen3_deepspeed_sft" in sec["sft"]
    assert {"sweep_x", "lora_rank_sweep"} <= set(sec["rank-sweep"])  # by stage, whatever the name
    assert sec["clean_data"] == ["data_clean"]  # a declared stage without a section of its own
    assert {"distill_x", "broken"} <= set(sec["other"])
    assert "awq_opt67b" in out["not_built"] and "broken" in out["not_built"]
    md = (tmp_path / "REPORT.md").read_text()

    # a target without metrics.json is "not built", with empty cells: never a zero
    for name in ("awq_opt67b", "bnb_nf4_opt27b", "lora_rank_sweep"):
        row = md_row(md, name)
        assert row[1].startswith("not built") and all(c == "" for c in row[2:]), row
    assert md_row(md, "qlora_chatglm_steps100")[1].startswith("not built (no metrics.json yet")
    assert md_row(md, "broken")[1].startswith("unreadable")
    assert md_row(md, "tiny_world")[1].startswith("not built")  # named by its stage's declaration

    # quantize's own numbers (same ids before and after), beside the evaluate target of the same setting
    gptq = md_row(md, "gptq_opt67b")
    assert gptq[2:12] == ["gptq", "4", "128", "212.5", "199.5", "13", "—", "`eval_opt67b`: 200", "3.25", "0.25"], gptq
    assert md_row(md, "bnb_int8_opt27b")[2:10] == ["bnb_int8", "8", "—", "101.5", "100", "1.5", "—", "—"]

    # seed 001's table: methods by their declared values; measured where a built target measures it
    seed = md[md.index("## Seed 001"):md.index("## Base-model evaluation")]
    gptq_line = next(ln for ln in seed.splitlines() if ln.startswith("| GPTQ"))
    assert "`gptq_opt67b` (4-bit)" in gptq_line and "ppl 212.5 (Δ 13 vs baseline 199.5)" in gptq_line
    assert "3.25 MiB, ratio 0.25" in gptq_line
    for meth in ("SmoothQuant", "Pruning + quantization"):
        line = next(ln for ln in seed.splitlines() if ln.startswith(f"| {meth}"))
        assert "not measured (no target in this project)" in line
    awq = next(ln for ln in seed.splitlines() if ln.startswith("| AutoAWQ"))
    assert "not measured (its targets are not built" in awq and "`awq_opt67b`, `awq_opt67b_w3` (not built)" in awq
    int8 = next(ln for ln in seed.splitlines() if ln.startswith("| LLM.int8"))
    assert "`bnb_int8_opt27b` (8-bit)" in int8 and "ppl 101.5 (Δ 1.5 vs baseline 100)" in int8
    assert "2 MiB, ratio 0.5" in int8 and "peak 512 MiB" in int8
    qlora = [ln for ln in seed.splitlines() if ln.startswith("| QLoRA")]
    assert len(qlora) == 2 and any("`qlora_chatglm_linear`" in ln and "BLEU-4 7.125" in ln for ln in qlora)

    # quant_compare's own table is embedded (headings moved down), its CSV linked
    assert "#### Quantization comparison (tiny scale)" in md and "| x | 1.5 |" in md
    assert "[`compare.csv`](results/quant_compare/compare.csv)" in md  # relative to REPORT.md

    # QLoRA comparison (scores.<system>.<mode>.<score>), side-by-side generations; SFT per epoch; GGUF table;
    # the rank sweep (runs.<rank>.<field>, ranks in numeric order); an undeclared stage in full
    assert re.search(r"\| linear \| greedy \| 7\.125 \| — \| — \| 20\.5 \|", md)
    assert "adapters linear = `qlora_chatglm_linear`, cosine = `qlora_chatglm_cosine`" in md
    assert "linear greedy text" in md and "一条黑色的裙子" in md
    assert re.search(r"\| 1 \| 2\.5 \| 12\.18 \|", md)
    assert re.search(r"\| `gguf_q4_0` \| 1 \| 61\.5 \| 1\.224 \| — \| 333 \|", md)
    assert re.search(r"\| 4 \| — \| 512 \|", md) and md.index("| 4 | — | 512 |") < md.index("| 16 | — | 2048 |")
    assert "| kl | 0.125 |" in md

    # figures the report drew from the targets' numbers and TensorBoard events
    figs = {Path(f).name for f in out["figures"]}
    assert {"lora_train_loss.png", "lora_train_lr.png", "sft_eval_ppl.png", "gguf_eval_ppl_vs_size.png",
            "quantization_ppl_vs_size.png"} <= figs
    for f in out["figures"]:
        assert Path(f).read_bytes().startswith(PNG)
        assert f"]({Path(f).relative_to(tmp_path)})" in md  # linked relative to REPORT.md

    # the HTML page: self-contained (images embedded), one anchor per section, "not built" cells marked
    page = Page()
    page.feed((tmp_path / "report" / "index.html").read_text())
    assert {"overview", "seed001", "quantization", "qlora", "sft", "gguf", "rank-sweep", "other",
            "provenance"} <= set(page.ids)
    assert len(page.imgs) == len(out["figures"]) and all(s.startswith("data:image/png;base64,") for s in page.imgs)
    assert base64.b64decode(page.imgs[0].split(",", 1)[1]).startswith(PNG)
    assert page.missing_cells >= len(out["not_built"])


def test_the_report_reads_declared_keys_and_names_no_target():
    """Every key the report reads is declared by the target's stage (config/schemas/metrics/), its sections and
    seed 001's methods are stages and values those declarations name, and its code names no recipe."""
    from quantune.lib.metrics import declared_stages
    from quantune.lib.report_seed001 import SEED001
    from quantune.lib.report_targets import Target, UndeclaredKey, declared_values
    from quantune.report import SECTIONS

    t = Target("q", ROOT, {"stage": "quantize", "ppl_quant": 2.5, "w_bits": 4})
    assert t.get("ppl_quant") == 2.5 and t.get("version_torch") is None
    with pytest.raises(UndeclaredKey, match="'w_bits' of target q, which config/schemas/metrics/quantize.schema.yaml"):
        t.get("w_bits")
    assert Target("g", ROOT, {"stage": "gguf_evaluate", "x_ppl": 3.0}).get("x_ppl") == 3.0  # patternProperties
    with pytest.raises(UndeclaredKey):
        Target("d", ROOT, {"stage": "distill"}).get("kl")  # no declaration: only common.schema.yaml's keys
    assert {st for s in SECTIONS for st in s.stages} <= set(declared_stages())
    for _, _, sel in SEED001:
        assert sel is None or sel[2] in declared_values(sel[0], sel[1]), sel
    code = "\n".join(p.read_text() for p in [ROOT / "src" / "quantune" / "report.py",
                                             *sorted((ROOT / "src" / "quantune" / "lib").glob("report_*.py"))])
    for name in recipe_stages(ROOT / "recipes"):
        assert not re.search(rf"\b{name}\b", code), f"the report's code names target {name}"


def test_report_rule_builds_nothing_else_and_reruns_when_results_change(tmp_path):
    res = tmp_path / "results"
    write(res, "eval_opt67b", {"stage": "evaluate", "eval_ppl": 200.0})
    r = snakemake("report", results=res)
    out = r.stdout + r.stderr
    assert re.search(r"^(local)?rule report:", out, re.M)
    jobs = set(re.findall(r"^(?:local)?rule (\w+):", out, re.M))
    assert jobs == {"report"}, f"asking for the report ran {jobs}"
    md = (res / "REPORT.md").read_text()
    assert md_row(md, "eval_opt67b")[1] == "built" and "| 200 |" in md
    assert md_row(md, "tiny_world")[1].startswith("not built")
    assert (res / "report" / "index.html").is_file()
    assert "Nothing to be done" in (lambda r: r.stdout + r.stderr)(snakemake("-n", "report", results=res))
    write(res, "eval_opt67b", {"stage": "evaluate", "eval_ppl": 201.0})  # a target rebuilt
    r = snakemake("-n", "report", results=res)
    assert re.search(r"^(local)?rule report:", r.stdout, re.M) and "Updated input files" in r.stdout, r.stdout


@pytest.mark.slow
def test_report_on_the_targets_built_now(tiny_world, results_root):
    """`snakemake report` on the real results: every built target is reported with its own numbers, every
    recipe without a metrics.json is "not built", and a rerun has nothing to do."""
    r = snakemake("report", results=results_root)
    assert "rule tiny_pretrain" not in r.stdout + r.stderr
    md = (results_root / "REPORT.md").read_text()
    tw = json.loads((tiny_world / "metrics.json").read_text())
    for fam in ("opt", "glm", "qwen3", "llama", "mt5", "gpt2"):
        assert f"| {fam} | {fmt(tw[f'{fam}_params_total'])} | {fmt(tw[f'{fam}_ppl_heldout_untrained'])} | " \
               f"{fmt(tw[f'{fam}_ppl_heldout'])} |" in md
    built = [d for d in results_root.iterdir() if (d / "metrics.json").is_file()]
    for d in built:
        m = json.loads((d / "metrics.json").read_text())
        row = [ln for ln in md.splitlines() if ln.startswith(f"| `{d.name}` | ")]
        assert row, f"{d.name} is built but not in the report"
        if m.get("stage") == "evaluate":
            assert fmt(m["eval_ppl"]) in md_row(md, d.name), (d.name, m["eval_ppl"])
    for name in recipe_stages(ROOT / "recipes"):
        if not (results_root / name / "metrics.json").is_file():
            assert md_row(md, name)[1].startswith("not built"), name
    html = (results_root / "report" / "index.html").read_text()
    assert html.count("data:image/png;base64,") >= 1  # at least the tiny world's pretraining curves
    r = snakemake("-n", "report", results=results_root)
    assert "Nothing to be done" in r.stdout + r.stderr
