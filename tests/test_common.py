import json

import pytest

from conftest import ROOT
from quantune.lib.common import atomic_dir, atomic_write_text, read_json, write_metrics, QuantuneError


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path, monkeypatch):
    p = tmp_path / "metrics.json"
    atomic_write_text(p, "old")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(p, "new")
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_atomic_dir_keeps_finished_output_on_failure(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as d:
        (d / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            (d / "weights").write_text("partial")
            raise RuntimeError("killed")
    assert (out / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_metrics_hold_numbers_strings_and_objects_and_carry_provenance(tmp_path):
    m = write_metrics(tmp_path / "m.json", {"ppl": 12.5, "name": "x", "ok": True, "skip": None,
                                            "runs": {"4": {"loss": 1.5, "gone": None, "best": False}}})
    on_disk = json.loads((tmp_path / "m.json").read_text())
    assert on_disk == m
    assert on_disk["ppl"] == 12.5 and on_disk["ok"] == 1 and "skip" not in on_disk
    assert on_disk["runs"] == {"4": {"loss": 1.5, "best": 0}}
    assert on_disk["version_torch"].startswith("2.13")
    assert "git_commit" in on_disk
    with pytest.raises(TypeError, match="key 'runs.4.curve' has a list"):
        write_metrics(tmp_path / "bad.json", {"runs": {"4": {"curve": [1, 2]}}})


def test_read_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{oops")
    with pytest.raises(QuantuneError, match=r"x\.json:1: invalid JSON"):
        read_json(bad)


def test_out_of_gpu_memory_is_one_line_naming_the_recipe_and_the_keys(capsys):
    """A step that runs out of GPU memory ends with one line (recipe, what happened, the keys to change), exit 3."""
    import argparse

    import torch

    from quantune.lib.common import run_cli

    def boom(a):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB\nmore detail")

    def build():
        p = argparse.ArgumentParser(prog="python -m quantune.lora_sft")
        p.add_argument("--recipe")
        p.set_defaults(func=boom)
        return p

    assert run_cli(build, ["--recipe", "recipes/qlora_chatglm_cosine.yaml"]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("quantune: error: recipes/qlora_chatglm_cosine.yaml: out of GPU memory")
    assert "Tried to allocate 3.00 GiB" in err and "fix: lower per_device_train_batch_size" in err


def test_compare_metrics_leaves_out_run_to_run_keys_and_finds_changed_values():
    """scripts/compare_metrics.py: timings, peaks and provenance may differ; values, renamed or not, may not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_metrics", ROOT / "scripts" / "compare_metrics.py")
    cm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cm)
    before = {"stage": "x", "ppl": 10.5, "tokens_per_s": 100.0, "peak_mem_mb": 5.0, "git_commit": "a",
              "r4_eval_loss": 2.0, "version_torch": "1"}
    after = {"stage": "x", "ppl": 10.5, "tokens_per_s": 90.0, "peak_mem_mb": 6.0, "git_commit": "b",
             "runs": {"4": {"eval_loss": 2.0}}, "version_torch": "2"}
    assert cm.compare(before, after) == []
    assert cm.compare(before, {**after, "ppl": 10.6}) == ["ppl: 10.5 -> 10.6"]
    assert "renamed keys differ" in cm.compare(before, {**after, "runs": {"4": {"eval_loss": 2.5}}})[0]


def test_gpu_wheels_keeps_only_the_image_cuda_libraries_of_bitsandbytes(tmp_path):
    """scripts/gpu_wheels.py: bitsandbytes' wheel loses the libraries of other CUDA, ROCm and XPU releases than the
    GPU image's (its nvidia-*-cuNN packages), and RECORD their lines, so the qlora group fits the device carry."""
    import importlib.util
    import zipfile

    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "scripts" / "gpu_wheels.py")
    gw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gw)
    assert gw.image_cuda_major({"torch", "nvidia-cudnn-cu13", "nvidia-nccl-cu13"}) == "13"
    assert gw.image_cuda_major({"nvidia-cudnn-cu12", "nvidia-nccl-cu13"}) is None  # two majors: no choice
    libs = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2025"]
    whl = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    record = "".join(f"bitsandbytes/libbitsandbytes_{x}.so,sha256=x,1\n" for x in libs)
    with zipfile.ZipFile(whl, "w") as z:
        for x in libs:
            z.writestr(f"bitsandbytes/libbitsandbytes_{x}.so", b"\0" * 64)
        z.writestr("bitsandbytes/__init__.py", "")
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record + "bitsandbytes/__init__.py,,\n")
    dropped = gw.trim_wheel(whl, gw.WHEEL_TRIM["bitsandbytes"], lambda n: n.endswith(("_cuda130.so", "_cuda132.so")))
    assert sorted(dropped) == sorted(f"bitsandbytes/libbitsandbytes_{x}.so" for x in libs
                                     if x not in ("cpu", "cuda130", "cuda132"))
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        kept_record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert names == {"bitsandbytes/__init__.py", "bitsandbytes-0.50.2.dist-info/RECORD",
                     *(f"bitsandbytes/libbitsandbytes_{x}.so" for x in ("cpu", "cuda130", "cuda132"))}
    assert {ln.split(",")[0] for ln in kept_record.splitlines()} == names - {"bitsandbytes-0.50.2.dist-info/RECORD"}
