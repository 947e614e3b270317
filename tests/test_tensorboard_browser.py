"""TensorBoard as a user sees it: `tensorboard --logdir <results>` on localhost, opened in headless Chromium
(Debian's chromium + chromium-driver through Selenium; scripts/install_browser.sh installs them).

Checks that every run is listed under its directory path, that the scalar tags of a finished tiny run (the
tiny OPT's pretraining) are listed in the time-series dashboard and that its train/loss chart renders the
values in the event file. Screenshots are kept in the test's tmp dir (printed with -s / shown by -rA).
The TensorBoard server (and its data server) and Chromium (and chromedriver) started here are stopped by
the fixtures; everything is on 127.0.0.1."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from quantune.lib.browser import TensorBoard, colored_fraction, headless_chromium, scalar_cards, timeseries_url
from quantune.lib.tb import read_scalars

RUN = "tiny_world/models/opt/tb"
TAGS = {"train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/ppl", "system/tokens_per_s",
        "system/peak_mem_mb", "system/wall_s"}


def number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def event_runs(logdir: Path) -> set[str]:
    """Run names TensorBoard gives: each directory holding event files, relative to the logdir."""
    return {str(p.parent.relative_to(logdir)) for p in logdir.rglob("events.out.tfevents.*")
            if not any(part.startswith(".") for part in p.relative_to(logdir).parts)}


@pytest.fixture(scope="module")
def tensorboard(tiny_world, results_root, tmp_path_factory):
    tb = TensorBoard(results_root, log=tmp_path_factory.mktemp("tensorboard") / "tensorboard.log")
    tb.start()
    try:
        yield tb
    finally:
        tb.stop()
    assert tb.proc.poll() is not None, "TensorBoard is still running"


@pytest.fixture(scope="module")
def chromium():
    with headless_chromium(1600, 2000) as driver:
        yield driver


def test_tensorboard_lists_every_run_by_its_directory(tensorboard, results_root):
    expected = event_runs(results_root)
    assert RUN in expected
    listed = tensorboard.wait_for_runs(expected)
    assert expected <= set(listed), f"runs missing from TensorBoard: {sorted(expected - set(listed))}"
    tags = tensorboard.scalar_tags()
    assert TAGS <= set(tags[RUN]), sorted(tags[RUN])
    for run in expected & set(tags):  # every run's tags follow the scheme of quantune.lib.tb
        assert all(t.split("/")[0] in {"train", "eval", "quant", "system", "final"} for t in tags[run]), (run, tags[run])


def test_tiny_run_tags_are_listed_and_its_loss_chart_renders(tensorboard, chromium, tiny_world, tmp_path):
    tensorboard.wait_for_runs({RUN})
    chromium.get(timeseries_url(tensorboard.url, f"^{RUN}$", "^(train|eval|system)/"))
    cards = scalar_cards(chromium, timeout=90, min_cards=len(TAGS))
    shot = tmp_path / "tensorboard_timeseries.png"
    chromium.save_screenshot(str(shot))
    print(f"\nTensorBoard screenshot: {shot}")
    assert TAGS <= set(cards), f"cards shown: {sorted(cards)} (screenshot {shot})"

    # the train/loss card: one row for the run, at the last logged step, with the value in the event file
    events = sorted(dict(read_scalars(tiny_world / "models" / "opt" / "tb")["train/loss"]).items())
    last_step, last_loss = events[-1]
    rows = cards["train/loss"]["rows"]
    assert len(rows) == 1 and rows[0][0] == RUN, rows
    shown = [c for c in rows[0][1:] if c]
    assert str(last_step) in [c.replace(",", "") for c in shown], (rows, last_step)  # TensorBoard shows "2,399"
    assert any(v is not None and abs(v - last_loss) < 1e-3 for v in map(number, shown)), (rows, last_loss)

    # the chart itself is drawn: the plotted line's color covers part of the chart area (grid and text are gray)
    chart = cards["train/loss"]["element"].find_element("css selector", "line-chart")
    png = chart.screenshot_as_png
    (tmp_path / "train_loss_chart.png").write_bytes(png)
    assert colored_fraction(png) > 0.002, f"no plotted series in the train/loss chart ({tmp_path / 'train_loss_chart.png'})"


def test_html_report_renders_in_chromium(chromium, results_root, tiny_world, tmp_path):
    """The report page built from the results that exist now: sections, embedded plots that decode."""
    from conftest import ROOT
    from quantune.report import build_report, recipe_stages

    out = build_report(results_root, recipe_stages(ROOT / "recipes"), tmp_path / "REPORT.md",
                       tmp_path / "report" / "index.html", tmp_path / "report" / "figures")
    chromium.get((tmp_path / "report" / "index.html").as_uri())
    heads = [h.text for h in chromium.find_elements("css selector", "h2")]
    assert heads[:2] == ["Overview", "Seed 001: quantization methods, measured"] and "Provenance" in heads
    widths = chromium.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")
    assert len(widths) == len(out["figures"]) >= 1 and all(w > 100 for w in widths), widths
    missing = chromium.find_elements("css selector", "td.missing")
    assert len(missing) >= len(out["not_built"])
    shot = tmp_path / "report.png"
    chromium.save_screenshot(str(shot))
    print(f"\nreport screenshot: {shot}")
    assert shot.stat().st_size > 10000


def test_workflow_screenshot_rule_and_report_embed_it(tiny_world, tmp_path):
    """`snakemake tensorboard_screenshot report` on a results dir holding the tiny OPT run: the screenshot
    lands in results/report/tensorboard.png and the HTML report embeds it."""
    from conftest import snakemake

    res = tmp_path / "results"
    shutil.copytree(tiny_world / "models" / "opt" / "tb", res / "tiny_world" / "models" / "opt" / "tb")
    snakemake("tensorboard_screenshot", results=res)
    png = res / "report" / "tensorboard.png"
    assert png.read_bytes().startswith(b"\x89PNG") and colored_fraction(png.read_bytes()) > 0.002
    snakemake("report", results=res)
    html = (res / "report" / "index.html").read_text()
    assert "TensorBoard&#x27;s time-series view" in html or "TensorBoard's time-series view" in html
    assert "tensorboard.png" in (res / "REPORT.md").read_text()
    print(f"\nworkflow TensorBoard screenshot: {png}")
