import json
import re

import pytest

from quantune.lib.common import QuantuneError
from quantune.lib.data import FORMATS, build_corpus, generate, load_split, read_json_records, split_of


@pytest.mark.parametrize("kind,fmt", [("advertisegen", "advertisegen"), ("alpaca", "alpaca"),
                                      ("summary_pref", "pref")])
def test_generators_write_the_real_formats(tmp_path, kind, fmt):
    counts = {"train": 40, "validation": 5, "test": 5}
    generate(kind, tmp_path / kind, counts, seed=3)
    seen = set()
    for split, n in counts.items():
        rows = read_json_records(tmp_path / kind / f"{split}.jsonl", fmt)
        assert len(rows) == n
        assert all(set(r) == set(FORMATS[fmt]) for r in rows)
        keys = {json.dumps(r, sort_keys=True) for r in rows}
        assert not keys & seen, "splits share rows"
        seen |= keys
    again = tmp_path / "again"
    generate(kind, again, counts, seed=3)
    assert (again / "train.jsonl").read_text() == (tmp_path / kind / "train.jsonl").read_text()


def test_advertisegen_rows_look_like_advertisegen(tmp_path):
    generate("advertisegen", tmp_path / "a", {"train": 30, "validation": 1, "test": 1}, seed=0)
    for r in read_json_records(tmp_path / "a" / "train.jsonl", "advertisegen"):
        assert re.fullmatch(r"类型#[^*#]+(\*[^*#]+#[^*#]+)+", r["content"]), r["content"]
        # every attribute value of the content is reflected in the copy's phrases or garment
        assert r["summary"].endswith("。") and len(r["summary"]) > 15


def test_corpus_split_is_by_document_and_deterministic(tmp_path):
    fortunes = tmp_path / "f"
    fortunes.write_text("\n%\n".join(f"\x1b[32m第{i}首\x1b[m\n床前明月光，疑是地上霜。{i}" for i in range(200)))
    stats = build_corpus(tmp_path / "c", pydoc=True, fortunes=[str(fortunes)], heldout=0.1, validation=0.1)
    assert stats["docs_test"] > 0 and stats["docs_validation"] > 0 and stats["docs_train"] > stats["docs_test"]
    ids = {s: {json.loads(l)["id"] for l in (tmp_path / "c" / f"{s}.jsonl").read_text().splitlines()}
           for s in ("train", "validation", "test")}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["validation"]
    assert all(split_of(i, 0.1, 0.1) == "test" for i in ids["test"])
    text = (tmp_path / "c" / "train.jsonl").read_text()
    assert "\\u001b" not in text and "\x1b" not in text  # colour escapes stripped


def test_loader_reads_json_array_jsonl_and_directories(tmp_path):
    rows = [{"content": "类型#裙", "summary": "好看", "extra": 1}]
    (tmp_path / "a.json").write_text(json.dumps(rows, ensure_ascii=False))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "validation.jsonl").write_text(json.dumps(rows[0], ensure_ascii=False) + "\n\n")
    want = [{"content": "类型#裙", "summary": "好看"}]
    assert load_split({"format": "advertisegen", "source": str(tmp_path / "a.json"), "local": True}, "train") == want
    assert load_split({"format": "advertisegen", "source": str(tmp_path / "d"), "local": True}, "validation") == want


def test_loader_reads_through_datasets_with_the_same_checks(tmp_path):
    """The hub branch: `datasets.load_dataset` (here its json builder) gives rows the same checks."""
    p = tmp_path / "train.jsonl"
    p.write_text('{"instruction": "i", "input": "", "output": "o"}\n')
    ds = {"format": "alpaca", "source": "json", "local": False, "data_files": {"train": str(p)}, "hub_config": None}
    assert load_split(ds, "train") == [{"instruction": "i", "input": "", "output": "o"}]
    ds["format"] = "advertisegen"
    with pytest.raises(QuantuneError, match=r"json\[train\] row 0: missing field 'content'"):
        load_split(ds, "train")


@pytest.mark.parametrize("line,message", [
    ('{"content": "a", "summary": ', r"bad\.jsonl:2: malformed JSON row"),
    ('{"content": "a"}', r"bad\.jsonl:2: missing field 'summary'"),
    ('{"content": "a", "summary": 3}', r"bad\.jsonl:2: field 'summary' is int, not a string"),
    ('["a", "b"]', r"bad\.jsonl:2: row is a list"),
])
def test_bad_rows_are_one_line_naming_file_line_and_field(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"content": "ok", "summary": "ok"}\n' + line + "\n")
    with pytest.raises(QuantuneError, match=message) as e:
        read_json_records(p, "advertisegen")
    assert "\n" not in str(e.value) and "fix:" in str(e.value)


def test_missing_split_is_a_clear_error(tmp_path):
    with pytest.raises(QuantuneError, match=r"no test\.jsonl or test\.json"):
        load_split({"format": "text", "source": str(tmp_path), "local": True}, "test")
