"""data_clean on generated raw data with known counts of each defect."""
import copy
import json

import pytest

from conftest import ROOT, snakemake
from quantune.clean_data import REASONS, run
from quantune.tiny_world import make_raw
from quantune.lib.common import QuantuneError
from quantune.lib.config import load_config


@pytest.fixture()
def raw_cfg(tmp_path, tiny_world):
    cfg = load_config(overrides={"results": {"tiny": str(tiny_world.parent), "full": str(tiny_world.parent / "full")}})
    expected = make_raw(tmp_path / "raw", seed=7)
    cfg = copy.deepcopy(cfg)
    cfg["datasets"]["zh_instructions_raw"]["path"] = str(tmp_path / "raw")
    return cfg, expected, tmp_path


def test_every_defect_is_counted_and_nothing_is_lost(raw_cfg):
    cfg, exp, tmp = raw_cfg
    m = run(str(ROOT / "recipes" / "data_clean.yaml"), str(tmp / "out"), cfg)
    want = {"malformed": exp["malformed_json"] + exp["missing_field"], "empty_output": exp["empty_output"],
            "output_is_input": exp["output_is_input"], "wrong_script": exp["wrong_script"],
            "too_short": exp["too_short"], "too_long": exp["too_long"],
            "exact_duplicate": exp["exact_duplicate"], "near_duplicate": exp["near_duplicate"]}
    got = {r: m[f"rejected_{r}"] for r in REASONS}
    assert got == want, f"rejections per reason {got} != injected defects {want}"
    assert m["rows_kept"] == 200 and m["rows_raw"] == exp["rows"]
    rejects = [json.loads(l) for l in (tmp / "out" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == m["rows_rejected"] and all(r["reason"] in REASONS and r["raw"] for r in rejects)
    kept = [json.loads(l) for s in ("train", "validation", "test")
            for l in (tmp / "out" / f"{s}.jsonl").read_text().splitlines()]
    assert len(kept) == 200 and (m["rows_train"], m["rows_validation"], m["rows_test"]) == (160, 20, 20)
    assert len({json.dumps(r, sort_keys=True) for r in kept}) == 200
    raw_lines = [l for l in (tmp / "raw" / "train.jsonl").read_text().splitlines() if l.strip()]
    assert sorted(raw_lines) == sorted([r["raw"] for r in rejects] + [json.dumps(r, ensure_ascii=False) for r in kept])
    assert m["before_tokens_max"] > m["after_tokens_max"]
    assert "| near_duplicate | 5 |" in (tmp / "out" / "report.md").read_text()


def test_unparseable_json_array_is_one_clear_line(raw_cfg):
    cfg, _, tmp = raw_cfg
    bad = tmp / "bad.json"
    bad.write_text('[{"instruction": "a", "input": "", "output": "b"},\n {oops}]')
    cfg["datasets"]["zh_instructions_raw"]["path"] = str(bad)
    with pytest.raises(QuantuneError, match=r"bad\.json:2: the JSON array does not parse .*fix: fix the file or convert it to JSONL"):
        run(str(ROOT / "recipes" / "data_clean.yaml"), str(tmp / "out2"), cfg)
    assert not (tmp / "out2").exists()


@pytest.mark.slow
def test_data_clean_target_runs_through_snakemake(tiny_world, results_root):
    snakemake("data_clean", results=results_root)
    m = json.loads((results_root / "data_clean" / "metrics.json").read_text())
    exp = json.loads((tiny_world / "data" / "zh_instructions_raw" / "expected.json").read_text())
    assert m["rejected_near_duplicate"] == exp["near_duplicate"] and m["rows_kept"] == exp["good"]
