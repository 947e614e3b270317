"""The web page (python -m quantune.webui) over a tiny-scale results tree: its parts called directly, then the page
itself driven by headless Chromium (Selenium): chat side by side, the compare table, the recipe form's errors,
a launch that builds a target; a screenshot of each tab is kept in the test's tmp_path."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, snakemake

TRIGGERS = ("--rerun-triggers", "mtime", "params", "input")
GLM_BASE, LINEAR = "base: chatglm3-6b", "qlora_chatglm_linear (LoRA adapter)"
PROMPT = "类型#裙*颜色#白色*风格#简约"
LAUNCHED = "eval_opt27b_webui"  # a copy of eval_opt27b saved from the form, then launched


def overrides(results_root: Path, recipes_dir: Path | None = None) -> dict:
    out = {"results": {"tiny": str(results_root), "shape": str(results_root / "shape"),
                       "full": str(results_root / "full")}}
    return {**out, "recipes_dir": str(recipes_dir)} if recipes_dir else out


@pytest.fixture(scope="module")
def linear(tiny_world, results_root):
    snakemake("qlora_chatglm_linear", *TRIGGERS, results=results_root, timeout=3000)
    return results_root / "qlora_chatglm_linear"


@pytest.fixture()
def app(linear, results_root, tmp_path):
    from quantune.lib.config import load_config
    from quantune.webui import App

    rdir = tmp_path / "recipes"
    shutil.copytree(ROOT / "recipes", rdir)
    ov = overrides(results_root, rdir)
    return App(load_config(overrides=ov), ov, max_models=1, cores=2)


def test_the_glm_base_and_the_linear_adapter_chat_in_their_formats(app):
    from quantune.lib.chat import Settings, stream

    assert {GLM_BASE, LINEAR} <= set(app.models), sorted(app.models)
    base, lin = app.models[GLM_BASE], app.models[LINEAR]
    assert (base.kind, base.fmt) == ("hf", "raw text")
    assert lin.kind == "lora" and lin.fmt.startswith("advertisegen") and lin.render(PROMPT) == PROMPT
    answers = {}
    for cm in (base, lin):
        lm = app.cache.get(cm)
        steps = list(stream(cm, lm, PROMPT, Settings(max_new_tokens=12)))
        text, n, secs = steps[-1]
        assert 0 < n <= 12 and secs > 0 and text.strip()
        assert all(a[1] <= b[1] for a, b in zip(steps, steps[1:]))  # streamed: the count only grows
        answers[cm.label] = text
    assert answers[GLM_BASE] != answers[LINEAR]  # the adapter changes the answer
    assert list(app.cache.models) == [LINEAR]  # max_models=1: the base was dropped for the adapter


def test_the_gguf_and_the_merged_model_chat_in_the_adapters_template(app, results_root, tmp_path):
    """A GGUF file (llama-cpp-python, in a process of its own) and the merged model it came from both render the
    prompt as lora_sft_qwen trained, found through the recipes' references, and both stream an answer; a GGUF that
    does not load is one line."""
    from quantune.lib.chat import ChatModel, GGUFProcess, Settings, stream
    from quantune.lib.common import QuantuneError

    snakemake("gguf_q4_0", *TRIGGERS, results=results_root, timeout=3000)
    app.reload()
    gguf, merged = app.models["gguf_q4_0 (GGUF model-Q4_0)"], app.models["merge_lora_qwen (merge)"]
    adapter = app.models["lora_sft_qwen (LoRA adapter)"]
    assert gguf.kind == "gguf" and merged.kind == "hf"
    assert gguf.fmt == merged.fmt == adapter.fmt and gguf.render("hi") == adapter.render("hi") != "hi"
    for cm in (gguf, merged):
        text, n, secs = list(stream(cm, app.cache.get(cm), "Give three tips for staying healthy.",
                                    Settings(max_new_tokens=8)))[-1]
        assert 0 < n <= 8 and secs > 0, (cm.label, text, n)
    # the GGUF runs in a process of its own (no torch beside llama.cpp), closed when the cache drops it
    served = app.cache.get(gguf).model
    assert isinstance(served, GGUFProcess) and served.proc.is_alive() and served.proc.pid != os.getpid()
    served.close()
    assert not served.proc.is_alive()
    app.cache.models.pop(gguf.label)
    broken = ChatModel("broken gguf", "gguf", str(tmp_path / "nothing.gguf"), gguf.fmt, gguf.render)
    with pytest.raises(QuantuneError) as e:
        app.cache.get(broken)
    assert str(e.value).startswith(f"broken gguf: could not load {tmp_path / 'nothing.gguf'} (RuntimeError: ")


def test_a_model_that_fails_to_load_is_one_line_and_the_next_still_answers(app, tmp_path):
    from quantune.lib.chat import ChatModel

    app.models["broken"] = ChatModel("broken", "hf", str(tmp_path / "nowhere"))
    out = list(app.chat(PROMPT, "broken", GLM_BASE, "greedy", 0.7, 0.9, 4, 0, [], []))
    left, right, lstat, rstat = out[-1]
    assert lstat.startswith(f"error: {tmp_path / 'nowhere'}: no model here") and "\n" not in lstat, lstat
    assert left[-1]["content"] == lstat and right[-1]["content"].strip() and "tokens/s" in rstat


def test_compare_table_lists_every_built_target_with_its_numbers(app, results_root):
    built = {p.parent.name for p in results_root.glob("*/metrics.json")}
    df = app.targets_table("all", "target", False)
    assert built <= set(df["target"]), built - set(df["target"])
    lin = app.targets_table("lora_sft", "train_loss", True)
    assert set(lin["stage"]) == {"lora_sft"} and "train_loss" in lin.columns
    losses = [float(x) for x in lin["train_loss"] if x != ""]
    assert losses == sorted(losses, reverse=True)
    m = json.loads((results_root / "qlora_chatglm_linear" / "metrics.json").read_text())
    assert lin.set_index("target").loc["qlora_chatglm_linear", "train_loss"] == f"{m['train_loss']:.4g}"
    png = app.loss_plot(["qlora_chatglm_linear", "../../etc"])  # a path outside results/ is skipped
    assert png and Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(png).stat().st_size > 10_000
    assert app.loss_plot(["../../etc"]) is None


def test_the_form_gives_the_workflows_one_line_error_and_saves_only_new_valid_files(app, tmp_path):
    from quantune.lib.common import QuantuneError
    from quantune.lib.recipe_form import form_value

    raw, stage, fs = app.recipe_form("qlora_chatglm_linear")
    own = [k for k in raw if k != "stage"]
    assert stage == "lora_sft" and [f.key for f in fs][:len(own)] == own  # the file's keys first, in its order
    values = [form_value(f, raw) for f in fs]
    assert app.check_form("lora_sft", fs, "qlora_chatglm_linear", values) [1] == ""  # the file as it is: valid
    bad = [("0" if f.key == "lora_r" else v) for f, v in zip(fs, values)]
    err = app.check_form("lora_sft", fs, "qlora_chatglm_linear", bad)[1]
    # the workflow's own check of the same file gives the same line
    copy = tmp_path / "check"
    shutil.copytree(app.recipes_dir, copy)
    r = yaml.safe_load((copy / "qlora_chatglm_linear.yaml").read_text())
    (copy / "qlora_chatglm_linear.yaml").write_text(yaml.safe_dump({**r, "lora_r": 0}, allow_unicode=True))
    p = subprocess.run([sys.executable, "-m", "quantune.lib.config", "check", "--recipes", str(copy)],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert p.returncode != 0 and err == p.stderr.strip().replace(str(copy), str(app.recipes_dir)), (err, p.stderr)
    assert "key lora_r" in err and "\n" not in err
    assert "exists already" in app.save_form("lora_sft", fs, "qlora_chatglm_linear", False, values)
    assert "not a target name" in app.save_form("lora_sft", fs, "../evil", False, values)
    assert not (app.recipes_dir.parent / "evil.yaml").exists()
    (app.recipes_dir / "no_stage.yaml").write_text("model: opt-6.7b\n")  # a form is made only for a known stage
    with pytest.raises(QuantuneError, match=r"no_stage.yaml: key stage: unknown stage None; fix: use one of: "):
        app.recipe_form("no_stage")
    with pytest.raises(QuantuneError, match="is not a target name"):
        app.recipe_form("../recipes/qlora_chatglm_linear")
    assert app.save_form("lora_sft", fs, "qlora_chatglm_linear_r8", False, bad).startswith("quantune: error:")
    r8 = [("8" if f.key == "lora_r" else v) for f, v in zip(fs, values)]
    assert app.save_form("lora_sft", fs, "qlora_chatglm_linear_r8", False, r8).startswith("saved ")
    saved = yaml.safe_load((app.recipes_dir / "qlora_chatglm_linear_r8.yaml").read_text())
    assert saved["lora_r"] == 8 and saved["tiny"] == raw["tiny"] and "qlora_chatglm_linear_r8" in app.recipes


def test_one_run_at_a_time_and_a_foreign_lock_is_a_clear_message(tmp_path, monkeypatch):
    from quantune.lib.launcher import Launcher

    ln = Launcher(1, {"scale": "tiny"}, workdir=tmp_path)
    assert ln.start("rm -rf /", ["a"]).startswith("error: 'rm -rf /' is not a target")
    monkeypatch.setattr(ln, "command", lambda t: [sys.executable, "-c", "import time; print('1 of 4 steps (25%) done', "
                                                   "flush=True); time.sleep(60)"])
    assert ln.start("a", ["a"]) == "running: snakemake a"
    assert ln.start("a", ["a"]).startswith("error: a run is in progress (a)")
    deadline = time.time() + 20
    while ln.fraction() == 0 and time.time() < deadline:
        time.sleep(0.1)
    assert ln.fraction() == 0.25 and "1 of 4 steps" in ln.log()
    assert ln.cancel().startswith("cancelled") and ln.wait(20) is not None and ln.status() == "cancelled: snakemake a"
    (tmp_path / ".snakemake" / "locks").mkdir(parents=True)
    (tmp_path / ".snakemake" / "locks" / "0.input.lock").write_text("x")
    assert "holds this directory's lock" in ln.start("a", ["a"])


def test_a_launch_that_fails_ends_with_the_workflows_one_line_error():
    from quantune.lib.launcher import Launcher

    ln = Launcher(1, {"scale": "nope"})  # a real Snakemake run, stopped by the config check at parse time
    assert ln.start("eval_opt27b", ["eval_opt27b"]) == "running: snakemake eval_opt27b"
    assert ln.wait(120) not in (None, 0)
    st = ln.status()
    assert st.startswith("failed (1): quantune: error: config/config.yaml") and "key scale" in st, st


def test_a_host_other_than_this_machine_prints_a_warning(results_root, tmp_path):
    cmd = [sys.executable, "-m", "quantune.webui", "--host", "0.0.0.0", "--port", "1", "--set", "scale=nope"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert p.stderr.startswith("quantune.webui: warning: serving on 0.0.0.0: anyone who reaches")
    assert p.returncode == 2 and "quantune: error:" in p.stderr  # a bad config stops it before it serves
    p = subprocess.run([sys.executable, "-m", "quantune.webui", "--help"], cwd=ROOT, capture_output=True, text=True,
                       env=env)
    assert "--host" in p.stdout and "127.0.0.1" in p.stdout


# ---------------------------------------------------------------- the page in a browser


@pytest.fixture()
def server(linear, results_root, tmp_path):
    from quantune.lib.common import free_port

    rdir = tmp_path / "recipes"
    shutil.copytree(ROOT / "recipes", rdir)
    port = free_port()
    cmd = [sys.executable, "-m", "quantune.webui", "--port", str(port), "--cores", "2"]
    for k, v in overrides(results_root, rdir).items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    log = open(tmp_path / "webui.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"the page did not come up: {(tmp_path / 'webui.log').read_text()[-3000:]}")
                time.sleep(1)
        yield url, rdir
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        for p in (results_root / LAUNCHED, results_root / "logs" / f"{LAUNCHED}.log",
                  results_root / "benchmarks" / f"{LAUNCHED}.tsv"):  # the launched target is this test's alone
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _tab(d, name):
    from selenium.webdriver.common.by import By

    next(b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == name).click()
    time.sleep(1.5)


def _type(d, el, text):
    from selenium.webdriver.common.keys import Keys

    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
    el.click()
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(text)


def _pick(d, elem_id, option):
    from selenium.webdriver.common.by import By

    _type(d, d.find_element(By.CSS_SELECTOR, f"#{elem_id} input"), option)
    time.sleep(0.5)
    items = d.find_elements(By.CSS_SELECTOR, "ul[role=listbox] li")
    next(li for li in items if li.text.strip().endswith(option)).click()
    time.sleep(1)


def _wait(cond, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_the_page_chats_compares_checks_and_launches_in_a_browser(server, results_root, tmp_path):
    from selenium.webdriver.common.by import By

    from quantune.lib.browser import headless_chromium

    url, rdir = server
    shots = []
    with headless_chromium(1400, 1800) as d:
        d.get(url)
        _wait(lambda: d.find_elements(By.ID, "chat-send"), 60, "the page")
        # Chat: the tiny GLM base and the linear adapter, side by side, the same prompt
        _pick(d, "chat-left-model", GLM_BASE)
        _pick(d, "chat-right-model", LINEAR)
        _type(d, d.find_element(By.CSS_SELECTOR, "#chat-prompt textarea"), PROMPT)
        d.find_element(By.ID, "chat-send").click()
        sides = ("left", "right")
        stats = _wait(lambda: (lambda st: st if all("tokens/s" in x for x in st) else None)(
            [d.find_element(By.ID, f"chat-{s}-stats").text for s in sides]), 300, "two answers")
        answers = [d.find_elements(By.CSS_SELECTOR, f"#chat-{s} .message.bot")[-1].text.strip() for s in sides]
        shots.append(tmp_path / "webui_chat.png")
        d.save_screenshot(str(shots[-1]))
        assert all(answers) and answers[0] != answers[1], (answers, stats)
        assert "prompt: raw text" in stats[0] and "prompt: advertisegen" in stats[1]

        # Compare: every built target in the table
        _tab(d, "Compare")
        table = d.find_element(By.ID, "compare-table").text
        shots.append(tmp_path / "webui_compare.png")
        d.save_screenshot(str(shots[-1]))
        built = {p.parent.name for p in results_root.glob("*/metrics.json")}
        assert all(t in table for t in built), sorted(t for t in built if t not in table)

        # Recipes: a bad value is the workflow's one-line error; a saved copy is a target that launches and builds
        _tab(d, "Recipes")
        _pick(d, "recipe-pick", "qlora_chatglm_linear")
        _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#recipe-field-lora_r textarea"), 30, "the form")
        _type(d, d.find_element(By.CSS_SELECTOR, "#recipe-field-lora_r textarea"), "0")
        d.find_element(By.ID, "recipe-validate").click()
        status = _wait(lambda: d.find_element(By.ID, "recipe-status").text.strip(), 30, "the form's check")
        shots.append(tmp_path / "webui_recipes.png")
        d.save_screenshot(str(shots[-1]))
        assert status.startswith("quantune: error: ") and "key lora_r" in status and "minimum of 1" in status, status

        _pick(d, "recipe-pick", "eval_opt27b")
        _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#recipe-field-gen_tokens textarea"), 30, "the form")
        _type(d, d.find_element(By.CSS_SELECTOR, "#recipe-save-as textarea"), LAUNCHED)
        d.find_element(By.ID, "recipe-save").click()
        _wait(lambda: "saved" in d.find_element(By.ID, "recipe-status").text, 30, "the save")
        assert (rdir / f"{LAUNCHED}.yaml").is_file()
        _pick(d, "launch-target", LAUNCHED)
        d.find_element(By.ID, "launch-start").click()
        final = _wait(lambda: (lambda s: s if s.startswith(("done", "failed", "error", "cancelled")) else None)(
            d.find_element(By.ID, "launch-status").text.strip()), 600, "the launched run")
        log = d.find_element(By.CSS_SELECTOR, "#launch-log textarea").get_attribute("value")
        shots.append(tmp_path / "webui_launch.png")
        d.save_screenshot(str(shots[-1]))
        assert final == f"done: {LAUNCHED} is built", (final, log[-2000:])
        assert "steps (100%) done" in log and d.find_element(By.ID, "launch-progress").get_attribute("value") == "100"
        assert (results_root / LAUNCHED / "metrics.json").is_file()

        _tab(d, "Docs")
        shots.append(tmp_path / "webui_docs.png")
        d.save_screenshot(str(shots[-1]))
        assert "snakemake" in d.find_element(By.ID, "docs").text.lower()
    print("\nweb page screenshots: " + ", ".join(map(str, shots)))
