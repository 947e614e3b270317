import json

import pytest
import torch

from quantune.lib.common import QuantuneError
from quantune.lib.config import load_config
from quantune.lib.data import build_corpus
from quantune.lib.models import SEQ2SEQ_FAMILIES, build_tokenizer, init_model, load_model
from quantune.lib.pretrain import lr_at, pretrain


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    fortunes = d / "zh"
    fortunes.write_text("\n%\n".join(f"春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。第{i}" for i in range(300)))
    build_corpus(d / "corpus", pydoc=True, fortunes=[str(fortunes)], heldout=0.05, validation=0.05)
    stats = {k: build_tokenizer(k, str(d / "corpus"), str(d / k), 1000, 2) for k in ("bpe", "spm")}
    return d, stats


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_tokenizers_round_trip_english_and_chinese(small_world, kind):
    d, stats = small_world
    assert stats[kind]["roundtrip_ok"] and stats[kind]["vocab_size"] == 1000
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d / kind)
    for text in ["The power operator binds tightly.", "春眠不觉晓，处处闻啼鸟。", "mixed 中文 and 𠀀 rare"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1


@pytest.mark.parametrize("family", ["opt", "glm", "qwen3", "llama", "mt5", "gpt2"])
def test_every_family_builds_from_config_and_runs(small_world, family):
    d, _ = small_world
    spec = load_config()["tiny_world"]["families"][family]
    tokdir = d / ("spm" if family == "llama" else "bpe")
    model, tok = init_model(family, spec, str(tokdir))
    ids = tok(["hello world", "春眠"], padding=True, return_tensors="pt")
    with torch.no_grad():
        if family in SEQ2SEQ_FAMILIES:
            out = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], labels=ids["input_ids"])
        else:
            out = model(**ids, labels=ids["input_ids"])
    assert out.logits.shape[-1] >= len(tok) and torch.isfinite(out.loss)
    assert model.config.model_type == family


def test_load_model_names_a_missing_directory(tmp_path):
    with pytest.raises(QuantuneError, match=r"no model here \(config.json missing\); fix: build the tiny world"):
        load_model(str(tmp_path / "nothing"))


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] >= 0.1


HP = {"steps": 6, "batch_size": 2, "seq_len": 16, "lr": 3e-3, "warmup_steps": 1, "seed": 0,
      "eval_tokens": 256, "checkpoint_every": 2}
SPEC = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}


def test_interrupted_pretraining_resumes_to_the_same_weights(small_world, tmp_path):
    d, _ = small_world
    whole = pretrain("gpt2", SPEC, HP, str(d / "bpe"), str(d / "corpus"), str(tmp_path / "a" / "m"))
    assert whole["resumed_from_step"] == 0
    stopped = pretrain("gpt2", SPEC, HP, str(d / "bpe"), str(d / "corpus"), str(tmp_path / "b" / "m"), stop_after=5)
    assert stopped == {"stopped_at": 5}
    assert (tmp_path / "b" / ".checkpoints" / "m.pt").is_file() and not (tmp_path / "b" / "m").exists()
    resumed = pretrain("gpt2", SPEC, HP, str(d / "bpe"), str(d / "corpus"), str(tmp_path / "b" / "m"))
    assert resumed["resumed_from_step"] == 4  # last checkpoint before the interruption
    assert not (tmp_path / "b" / ".checkpoints" / "m.pt").exists()
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "m" / "model.safetensors")
    b = load_file(tmp_path / "b" / "m" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "m" / "metrics.json").read_text())["ppl_heldout"] == pytest.approx(
        whole["ppl_heldout"])
    # a checkpoint saved with other settings is not resumed: the schedule it was part of is not this one's
    pretrain("gpt2", SPEC, HP, str(d / "bpe"), str(d / "corpus"), str(tmp_path / "c" / "m"), stop_after=5)
    fresh = pretrain("gpt2", SPEC, {**HP, "lr": HP["lr"] / 2}, str(d / "bpe"), str(d / "corpus"),
                     str(tmp_path / "c" / "m"))
    assert fresh["resumed_from_step"] == 0
