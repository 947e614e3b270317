"""The quantize stage's token data: the calibration windows GPTQ and AWQ calibrate on, and the evaluation token
stream perplexity and KL are measured on."""
from __future__ import annotations

from .common import fail


def calibration_samples(cfg: dict, recipe: dict, tokenizer, where: str) -> dict:
    """`calibration_samples` windows of `calibration_seq_len` tokens: documents of the calibration split in a
    seeded random order, tokenized and concatenated, cut into consecutive windows, of which a seeded random
    choice without replacement is kept (the GPTQ paper: 128 random 2048-token C4 segments)."""
    import random

    from .config import resolve_dataset
    from .data import load_split

    n, seq = recipe["calibration_samples"], recipe["calibration_seq_len"]
    ds = resolve_dataset(cfg, recipe["calibration_dataset"], where, "calibration_dataset")
    split = recipe["calibration_split"]
    rows = load_split(ds, split)
    docs = [r["text"] for r in rows if r["text"].strip()]
    rng = random.Random(recipe["seed"])
    rng.shuffle(docs)
    want = 4 * n * seq  # a pool four times what is kept, so that the windows come from many documents
    stream: list[int] = []
    for i in range(0, len(docs), 256):
        for ids in tokenizer([d + "\n\n" for d in docs[i:i + 256]], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
        if len(stream) >= want:
            break
    windows = len(stream) // seq
    if windows < n:
        raise fail(f"{where}: key calibration_samples",
                   f"the calibration text ({ds['source']}, split {split}) has {len(stream)} tokens, fewer than "
                   f"{n} x {seq}", "lower calibration_samples or calibration_seq_len, or give more text")
    picks = sorted(rng.sample(range(windows), n))
    return {"input_ids": [stream[k * seq:(k + 1) * seq] for k in picks], "pool_tokens": len(stream),
            "source": ds["source"], "split": split}


def eval_ids(cfg: dict, recipe: dict, tokenizer, where: str):
    """The evaluation split's text, joined and tokenized (at most the recipe's max_eval_tokens)."""
    from .config import resolve_dataset
    from .data import join_text, load_split
    from .measure import token_stream

    ds = resolve_dataset(cfg, recipe["eval_dataset"], where, "eval_dataset")
    return token_stream(tokenizer, join_text(load_split(ds, recipe["eval_split"])),
                        recipe.get("max_eval_tokens"))
