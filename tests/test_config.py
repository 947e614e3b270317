import copy

import pytest

from quantune.lib.common import QuantuneError
from quantune.lib.config import (ROOT, check_config, load_config, load_recipe, load_recipes, resolve_dataset,
                             resolve_model, _set_dotted)


def test_shipped_config_and_recipes_are_valid_at_both_scales():
    for scale in ("tiny", "full"):
        cfg = load_config(overrides={"scale": scale})
        recipes = load_recipes(cfg)
        assert recipes, "no recipes found"
        assert all(r["scale"] == scale for r in recipes.values())


@pytest.mark.parametrize("key,value,message", [
    ("scale", "huge", r"key scale: value 'huge' is not allowed; fix: use one of: tiny, shape, full"),
    ("tiny_world.pretrain.stepz", 3, r"key tiny_world\.pretrain\.stepz: unknown key 'stepz'"),
    ("tiny_world.pretrain.steps", "many", r"key tiny_world\.pretrain\.steps: value 'many' has the wrong type"),
    ("models.opt-2.7b.path", "/no/such/dir", r"key models\.opt-2\.7b\.path: /no/such/dir does not exist"),
    ("models.opt-2.7b.tiny", "bert", r"key models\.opt-2\.7b\.tiny: value 'bert' is not allowed"),
    ("tiny_data.bogus", {"train": 1}, r"key tiny_data\.bogus: unknown key 'bogus'"),  # beside pattern-declared keys
])
def test_bad_config_is_one_clear_line(cfg, key, value, message):
    bad = copy.deepcopy(cfg)
    _set_dotted(bad, key, value)
    with pytest.raises(QuantuneError, match=message) as e:
        check_config(bad, "config/config.yaml")
    assert "\n" not in str(e.value) and "fix:" in str(e.value)


def _recipe(tmp_path, name, text):
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return p


BASE = (ROOT / "recipes" / "eval_opt67b.yaml").read_text()


def test_recipe_tiny_block_scales_the_same_recipe(cfg, tmp_path):
    p = _recipe(tmp_path, "eval_x", BASE)
    tiny = load_recipe(p, cfg)
    full = load_recipe(p, {**cfg, "scale": "full"})
    assert tiny["context"] == 128 and full["context"] == 2048
    assert tiny["name"] == full["name"] == "eval_x"


@pytest.mark.parametrize("extra,message", [
    ("foo: 1\n", r"eval_x\.yaml: key foo: unknown key 'foo'"),
    ("max_eval_tokens: lots\n", r"key max_eval_tokens: value 'lots' has the wrong type"),
])
def test_bad_recipe_key_is_one_clear_line(cfg, tmp_path, extra, message):
    p = _recipe(tmp_path, "eval_x", BASE.replace("tiny:\n", extra + "tiny:\n"))
    with pytest.raises(QuantuneError, match=message):
        load_recipe(p, cfg)


@pytest.mark.parametrize("value", ["many", -1])
def test_bad_worker_count_names_what_the_key_takes(cfg, tmp_path, value):
    """An anyOf key (a constant or a bounded integer) says which values it takes, not the schema's own wording."""
    text = (ROOT / "recipes" / "qwen3_deepspeed_sft.yaml").read_text(encoding="utf-8")
    p = tmp_path / "qwen3_deepspeed_sft.yaml"
    p.write_text(text.replace("\nspeed: ", f"\ndataloader_num_workers: {value}\nspeed: ", 1), encoding="utf-8")
    with pytest.raises(QuantuneError, match=rf"qwen3_deepspeed_sft\.yaml: key dataloader_num_workers: value "
                                            rf"'?{value}'? is not allowed; fix: give auto or an integer >= 0$"):
        load_recipe(p, cfg)


def test_unknown_key_inside_tiny_block_is_caught(cfg, tmp_path):
    p = _recipe(tmp_path, "eval_x", BASE + "  contxt: 64\n")
    with pytest.raises(QuantuneError, match=r"\(tiny block\): key contxt: unknown key"):
        load_recipe(p, cfg)


def test_unknown_stage_and_model_are_named(cfg, tmp_path):
    with pytest.raises(QuantuneError, match=r"key stage: unknown stage 'evaluat'"):
        load_recipe(_recipe(tmp_path, "a", BASE.replace("stage: evaluate", "stage: evaluat")), cfg)
    with pytest.raises(QuantuneError, match=r"b\.yaml: key model: unknown model 'opt-9b'"):
        load_recipe(_recipe(tmp_path, "b", BASE.replace("model: opt-6.7b", "model: opt-9b")), cfg)


def test_broken_yaml_names_the_line(cfg, tmp_path):
    with pytest.raises(QuantuneError, match=r"c\.yaml:\d+: invalid YAML"):
        load_recipe(_recipe(tmp_path, "c", "stage: evaluate\n  bad: [\n"), cfg)


def test_logical_names_resolve_per_scale_and_local_path_wins(cfg, tmp_path):
    tiny = resolve_model(cfg, "opt-6.7b")
    assert tiny["source"].endswith("tiny_world/models/opt") and tiny["local"]
    full = resolve_model({**cfg, "scale": "full"}, "opt-6.7b")
    assert full == {"source": "facebook/opt-6.7b", "family": "opt", "trust_remote_code": False, "local": False,
                    "hub_config": str(ROOT / "config" / "hub_configs" / "opt-6.7b.json")}
    assert resolve_model({**cfg, "scale": "full"}, "chatglm3-6b")["trust_remote_code"] is True
    assert resolve_model(cfg, "chatglm3-6b")["trust_remote_code"] is False  # only the real model needs it
    shape = resolve_model({**cfg, "scale": "shape"}, "chatglm3-6b")  # the shape world's native GLM
    assert shape["source"].endswith("results/shape/shape_world/models/chatglm3-6b") and not shape["trust_remote_code"]
    local = copy.deepcopy(cfg)
    local["models"]["opt-6.7b"]["path"] = str(tmp_path)
    for scale in ("tiny", "full"):
        assert resolve_model({**local, "scale": scale}, "opt-6.7b")["source"] == str(tmp_path)
    ds = resolve_dataset({**cfg, "scale": "full"}, "wikitext2")
    assert ds["source"] == "Salesforce/wikitext" and ds["hub_config"] == "wikitext-2-raw-v1"
    assert resolve_dataset(cfg, "advertisegen")["source"].endswith("tiny_world/data/advertisegen")
    assert resolve_dataset({**cfg, "scale": "shape"}, "c4")["source"].endswith("shape_world/data/c4")


def test_shape_scale_runs_the_full_recipe_with_only_steps_and_rows_capped(cfg, tmp_path):
    """Scale shape: the full recipe's values (batch, lengths, calibration, bits) on the shape world; the config's
    caps lower only the keys a stage has (a smaller recipe value stays); a recipe's shape block caps only."""
    shape = {**cfg, "scale": "shape"}
    gptq = load_recipe(ROOT / "recipes" / "gptq_opt67b.yaml", shape)
    full = load_recipe(ROOT / "recipes" / "gptq_opt67b.yaml", {**cfg, "scale": "full"})
    assert {k: gptq[k] for k in ("calibration_samples", "calibration_seq_len", "context", "bits", "group_size",
                                 "dtype")} == {k: full[k] for k in ("calibration_samples", "calibration_seq_len",
                                                                    "context", "bits", "group_size", "dtype")}
    assert (gptq["calibration_samples"], gptq["calibration_seq_len"]) == (128, 2048)
    caps = cfg["shape_world"]["caps"]
    assert gptq["max_eval_tokens"] == caps["max_eval_tokens"] and "max_eval_tokens" not in full
    assert gptq["gen_tokens"] == min(full["gen_tokens"], caps["gen_tokens"])
    cosine = load_recipe(ROOT / "recipes" / "qlora_chatglm_cosine.yaml", shape)
    assert cosine["max_steps"] == caps["max_steps"] and cosine["per_device_train_batch_size"] == 24
    assert (cosine["max_input_length"], cosine["max_output_length"], cosine["lora_r"]) == (1024, 2048, 8)
    assert "max_steps" not in load_recipe(ROOT / "recipes" / "qwen3_deepspeed_sft.yaml", shape)  # sft: no such key
    own = BASE + "shape:\n  gen_tokens: 8\n"
    assert load_recipe(_recipe(tmp_path, "d", own), shape)["gen_tokens"] == 8
    small = BASE.replace("gen_tokens: 128", "gen_tokens: 5")  # below the cap: the recipe's value stays
    assert load_recipe(_recipe(tmp_path, "f", small), shape)["gen_tokens"] == 5
    with pytest.raises(QuantuneError, match=r"e\.yaml: key shape\.context: scale shape runs the full recipe"):
        load_recipe(_recipe(tmp_path, "e", BASE + "shape:\n  context: 128\n"), shape)


def test_a_key_two_stages_share_is_written_once_and_read_whole(tmp_path, monkeypatch):
    """A recipe schema's property that points into another stage's schema (`$ref: lora_sft.schema.yaml#/...`) is
    that stage's definition, keywords beside the `$ref` winning and the `$defs` it uses brought along: the validator,
    the defaults and the web form read it whole; a `$ref` to nothing is one line naming the schema and key."""
    from quantune.lib import config

    sweep, sft = (config._schema(f"recipes/{n}.schema.yaml")["properties"] for n in ("lora_sweep", "lora_sft"))
    assert sweep["liger_kernel"] == sft["liger_kernel"] and "enum" in sweep["liger_kernel"]
    assert config._schema("recipes/sft.schema.yaml")["properties"]["torch_compile"] == sft["torch_compile"]
    assert sweep["eval_prompts_split"]["default"] == "test" and sweep["eval_prompts_split"]["pattern"]
    with pytest.raises(QuantuneError, match="key liger_kernel.*value 'yes' is not allowed"):
        config.validate({"liger_kernel": "yes"}, "recipes/lora_sweep.schema.yaml", "r.yaml")

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "a.schema.yaml").write_text(
        "$defs: {split: {type: string, pattern: '^train'}}\n"
        "properties: {s: {$ref: '#/$defs/split', default: train}}\n")
    (tmp_path / "recipes" / "b.schema.yaml").write_text(
        "additionalProperties: false\n"
        "properties: {s: {$ref: 'a.schema.yaml#/properties/s', description: mine}, t: {type: integer}}\n")
    (tmp_path / "recipes" / "c.schema.yaml").write_text("properties: {s: {$ref: 'a.schema.yaml#/properties/x'}}\n")
    (tmp_path / "recipes" / "d.schema.yaml").write_text("properties: {s: {$ref: 'a.schema.yaml#/properties/s'}}\n"
                                                        "$defs: {split: {type: integer}}\n")
    (tmp_path / "recipes" / "e.schema.yaml").write_text("properties: {s: {$ref: '#/$defs/gone'}}\n")
    (tmp_path / "recipes" / "f.schema.yaml").write_text("properties: {s: {$ref: 'e.schema.yaml#/properties/s'}}\n")
    monkeypatch.setattr(config, "SCHEMA_DIR", tmp_path)
    config._schema.cache_clear()
    try:
        b = config._schema("recipes/b.schema.yaml")
        assert b["properties"]["s"] == {"$ref": "#/$defs/split", "default": "train", "description": "mine"}
        assert b["$defs"] == {"split": {"type": "string", "pattern": "^train"}}
        assert config.fill_defaults({"t": 1}, b) == {"t": 1, "s": "train"}
        with pytest.raises(QuantuneError, match="key s.*does not match"):
            config.validate({"s": "test"}, "recipes/b.schema.yaml", "r.yaml")
        with pytest.raises(QuantuneError) as e:
            config._schema("recipes/c.schema.yaml")
        assert str(e.value).count("\n") == 0 and "c.schema.yaml: key s" in str(e.value)
        assert "points at nothing" in str(e.value)
        for bad, what in (("d", "$defs 'split' differs from a.schema.yaml's"),
                          ("f", "e.schema.yaml has no $defs 'gone'")):
            with pytest.raises(QuantuneError) as e:
                config._schema(f"recipes/{bad}.schema.yaml")
            assert str(e.value).count("\n") == 0 and f"{bad}.schema.yaml: key s: {what}" in str(e.value), str(e.value)
    finally:
        config._schema.cache_clear()
