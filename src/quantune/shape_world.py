"""The shape world: what every target runs on at scale shape. The real architectures and sizes (the hub config.json
files in config/hub_configs/) with random weights, a tokenizer of each model's real vocabulary size, and data sets
in the real formats at the real row counts and token lengths, all built from text that ships with the machine.
Quality numbers at this scale mean nothing; speed, memory and whether a recipe runs at all are the real ones.

    python -m quantune.shape_world tokenizer --corpus results/tiny_world/data/tiny_text --vocab-size 32000 --out DIR
    python -m quantune.shape_world model --config config/hub_configs/opt-6.7b.json --tokenizer DIR --out DIR
    python -m quantune.shape_world dataset advertisegen --spec JSON --tokenizer DIR --corpus DIR --out DIR
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from .lib.common import atomic_dir, fail, run_cli, write_json, write_jsonl
from .lib.data import SPLITS
from .lib.models import SPECIAL, corpus_texts, model_class, train_bpe_tokenizer

FILLER = "<|shape_{}|>"  # vocabulary entries past the corpus-trained merges: real ids no text ever produces


def build_tokenizer(corpus: str, vocab_size: int, out: str) -> dict:
    """The byte-level BPE every shape model shares (same merges, so a row has the same length for every model)."""
    texts = corpus_texts(corpus)
    with atomic_dir(out) as tmp:
        tok = train_bpe_tokenizer(texts, vocab_size, 2)
        tok.model_max_length = 1_000_000
        tok.save_pretrained(tmp)
        stats = {"vocab_size": len(tok)}
        write_json(tmp / "tokenizer_stats.json", stats)
    return stats


def padded_tokenizer(tokenizer_dir: str, vocab_size: int):
    """The shared tokenizer with filler entries appended to its BPE vocabulary up to `vocab_size` (a model's real
    vocabulary): ids a model's embedding and LM head have, which no merge ever produces."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    base = len(vocab) + sum(1 for t in spec.get("added_tokens", []) if t["content"] not in vocab)
    if base > vocab_size:
        raise fail(f"{tokenizer_dir}: vocab_size", f"the shared tokenizer has {base} tokens, more than the model's "
                   f"{vocab_size}", "lower shape_world.tokenizer_vocab in config/config.yaml")
    for i in range(vocab_size - base):
        vocab[FILLER.format(i)] = base + i
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                  model_max_length=1_000_000, **SPECIAL)
    assert len(tok) == vocab_size, (len(tok), vocab_size)
    return tok


def read_hub_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise fail(f"{path}", "hub config.json not found", "copy the model's config.json into config/hub_configs/")
    return json.loads(p.read_text(encoding="utf-8"))


def build_model(config_json: str, tokenizer_dir: str, out: str, device: str = "auto", seed: int = 0) -> dict:
    """A model of the hub config's architecture and size with random weights (the model's own initialisation),
    in the dtype the hub checkpoint ships (`torch_dtype`), saved as safetensors with its tokenizer."""
    import torch
    from transformers import AutoConfig

    hub = read_hub_config(config_json)
    dtype_name = hub.get("torch_dtype") or hub.get("dtype") or "float32"
    dtype = getattr(torch, dtype_name)
    tok = padded_tokenizer(tokenizer_dir, int(hub["vocab_size"]))
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        keep = {k: v for k, v in hub.items() if k not in ("_name_or_path", "transformers_version", "auto_map")}
        (tmp / "config.json").write_text(json.dumps(keep), encoding="utf-8")
        cfg = AutoConfig.from_pretrained(str(tmp))
        ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
        for k, v in ids.items():
            setattr(cfg, k, v)
        if getattr(cfg, "is_encoder_decoder", False):
            cfg.decoder_start_token_id = tok.pad_token_id
        torch.manual_seed(seed)
        with torch.device(dev):
            model = model_class(cfg).from_config(cfg, dtype=dtype)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp, max_shard_size="5GB")
        tok.save_pretrained(tmp)
        stats = {"hub_config": str(config_json), "model_type": cfg.model_type, "params": n_params,
                 "dtype": dtype_name, "vocab_size": len(tok), "device": dev, "seed": seed,
                 "build_seconds": round(time.perf_counter() - t0, 2)}
        write_json(tmp / "shape_model.json", stats)
    return stats


# ---------------------------------------------------------------- data at the real lengths

def _stream(corpus: str, tok) -> list[int]:
    ids: list[int] = []
    for row in tok(corpus_texts(corpus), add_special_tokens=False)["input_ids"]:
        ids.extend(row)
    return ids


def _piece(rng: random.Random, stream: list[int], tok, lo: int, hi: int) -> str:
    """Real corpus text of a length drawn uniformly from [lo, hi] tokens (a slice of the tokenized corpus)."""
    n = rng.randint(lo, hi)
    start = rng.randrange(0, len(stream) - n)
    return tok.decode(stream[start:start + n]).strip("\ufffd")


def _row(fmt: str, spec: dict, rng: random.Random, piece) -> dict:
    L = spec["lengths"]
    if fmt == "advertisegen":
        return {"content": piece(*L["prompt"]), "summary": piece(*L["answer"])}
    if fmt == "alpaca":
        has_input = rng.random() < spec.get("input_fraction", 0.0)
        return {"instruction": piece(*L["prompt"]), "input": piece(*L["input"]) if has_input else "",
                "output": piece(*L["answer"])}
    if fmt == "pref":
        return {"prompt": piece(*L["prompt"]), "chosen": piece(*L["answer"]), "rejected": piece(*L["answer"])}
    return {"text": piece(*L["document"])}


def build_dataset(kind: str, spec: dict, tokenizer_dir: str, corpus: str, out: str, seed: int) -> dict:
    """Rows of the real format with token lengths drawn from `spec["lengths"]` (uniform [lo, hi] per field, in the
    shared tokenizer's tokens) and the real set's row counts (`spec["rows"]`, per split)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    stream = _stream(corpus, tok)
    rng = random.Random(f"{kind}:{seed}")
    piece = lambda lo, hi: _piece(rng, stream, tok, lo, hi)  # noqa: E731
    stats: dict = {"format": spec["format"], "seed": seed, "lengths": spec["lengths"]}
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            n = spec["rows"].get(split, 0)
            if not n:
                continue
            rows = [_row(spec["format"], spec, rng, piece) for _ in range(n)]
            write_jsonl(tmp / f"{split}.jsonl", rows)
            stats[f"rows_{split}"] = n
        write_json(tmp / "stats.json", stats)
    return stats


# ---------------------------------------------------------------- CLI

def _cmd_tokenizer(a) -> None:
    print(json.dumps(build_tokenizer(a.corpus, a.vocab_size, a.out)))


def _cmd_model(a) -> None:
    print(json.dumps(build_model(a.config, a.tokenizer, a.out, a.device, a.seed)))


def _cmd_dataset(a) -> None:
    print(json.dumps(build_dataset(a.kind, json.loads(a.spec), a.tokenizer, a.corpus, a.out, a.seed)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantune.shape_world", description=__doc__.splitlines()[0])
    sub = p.add_subparsers()
    t = sub.add_parser("tokenizer", help="the shared byte-level BPE trained on the corpus")
    t.add_argument("--corpus", required=True)
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True)
    t.set_defaults(func=_cmd_tokenizer)
    m = sub.add_parser("model", help="a random-weight model of a hub config's architecture and size")
    m.add_argument("--config", required=True, help="a hub config.json (config/hub_configs/)")
    m.add_argument("--tokenizer", required=True, help="the shared tokenizer's directory")
    m.add_argument("--out", required=True)
    m.add_argument("--device", default="auto", help="where the weights are initialised: auto (a GPU if any), cpu")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=_cmd_model)
    d = sub.add_parser("dataset", help="a data set in a real format at the real row counts and token lengths")
    d.add_argument("kind")
    d.add_argument("--spec", required=True, help="the config's shape_world.data.<kind> entry, as JSON")
    d.add_argument("--tokenizer", required=True)
    d.add_argument("--corpus", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_dataset)
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
