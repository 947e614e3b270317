import json

import pytest

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


def test_metrics_are_flat_and_carry_provenance(tmp_path):
    m = write_metrics(tmp_path / "m.json", {"ppl": 12.5, "name": "x", "ok": True, "skip": None})
    on_disk = json.loads((tmp_path / "m.json").read_text())
    assert on_disk == m
    assert on_disk["ppl"] == 12.5 and on_disk["ok"] == 1 and "skip" not in on_disk
    assert on_disk["version_torch"].startswith("2.13")
    assert "git_commit" in on_disk
    with pytest.raises(TypeError, match="flat"):
        write_metrics(tmp_path / "bad.json", {"nested": {"a": 1}})


def test_read_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{oops")
    with pytest.raises(QuantuneError, match=r"x\.json:1: invalid JSON"):
        read_json(bad)
