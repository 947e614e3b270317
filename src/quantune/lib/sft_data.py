"""The sft stage's data: (prompt, chosen) pairs of a preference data set, deduplicated, split 90/10 with the
recipe's seed, tokenized as `<template with the prompt><chosen><eos>` with labels (the prompt masked by the
recipe's `mask_prompt`, padding always), dynamically padded by the collator; and the eval loss of a model over
such a split, computed as the Trainer computes it."""
from __future__ import annotations

from .common import fail
from .prompts import IGNORE_INDEX as IGNORE  # the label the loss skips (-100)


def dedupe_pairs(rows: list[dict]) -> list[dict]:
    """SFT trains on (prompt, chosen) only: preference data often repeats a pair with several rejected answers
    (the tiny set: 300 rows, 169 pairs). Keep each pair once, so no eval example is also a train example."""
    seen, out = set(), []
    for r in rows:
        k = (r["prompt"], r["chosen"])
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def split_rows(rows: list[dict], eval_fraction: float, seed: int):
    """The seed's 90/10 split: `datasets` train_test_split with the recipe's seed."""
    import datasets

    parts = datasets.Dataset.from_list(rows).train_test_split(test_size=eval_fraction, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def encode_pair(tok, prompt: str, response: str, template: str, max_len: int, mask_prompt: bool) -> dict:
    """Token ids and labels of one example: `<template head><prompt><template tail><response><eos>`.

    The pieces are tokenized separately, so the prompt ends exactly where an inference prompt ends
    ("... Assistant: ") and the prompt/response boundary is exact. Too long: the prompt is cut at its end
    (its head, with the instruction, stays; the template's tail always stays), the response keeps at least
    half of the tokens left beside the template's tail; a cut response gets no eos. Labels: the ids, with the
    prompt set to -100 when mask_prompt (padding is the collator's)."""
    head, tail = template.split("{prompt}", 1)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    a, b, c = enc(head + prompt), enc(tail), enc(response)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False) else []
    budget = max_len - len(bos) - len(b)
    if budget < 4:
        raise fail("recipe: key max_seq_len", f"{max_len} leaves no room after the prompt template",
                   "raise max_seq_len or shorten prompt_template")
    truncated = len(a) + len(c) + 1 > budget
    if truncated:
        need_c = len(c) + 1
        r = min(need_c, max(budget - len(a), budget // 2))
        cut_response = r < need_c
        c = c[:r] if cut_response else c
        a = a[:budget - len(c) - (0 if cut_response else 1)]
    else:
        cut_response = False
    resp = c + ([] if cut_response else [tok.eos_token_id])
    prompt_ids = bos + a + b
    ids = prompt_ids + resp
    labels = ([IGNORE] * len(prompt_ids) if mask_prompt else list(prompt_ids)) + list(resp)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "truncated": int(truncated)}


def tokenize(ds, tok, recipe: dict):
    cols = ds.column_names

    def fn(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": [], "truncated": []}
        for p, c in zip(batch["prompt"], batch["chosen"]):
            e = encode_pair(tok, p, c, recipe["prompt_template"], recipe["max_seq_len"], recipe["mask_prompt"])
            for k in out:
                out[k].append(e[k])
        return out

    return ds.map(fn, batched=True, remove_columns=cols, desc="tokenize")


def collator(tok, pad_to_multiple_of: int | None = None, packed: bool = False, max_length: int | None = None,
             packed_multiple_of: int = 0):
    """Dynamic padding (to the longest in the batch): ids with pad, attention 0, labels -100. packed: the batch's
    rows end to end in one padding-free row (lib.varlen.packed_collator: position ids restarting at each row, the
    row boundaries for lib.varlen's attention, each row's first label -100, so no row is predicted from the one
    before it; with packed_multiple_of, a filler row rounds its length up to a multiple of it). max_length: every
    row padded to it (seed 003)."""
    from transformers import DataCollatorForSeq2Seq

    from .varlen import packed_collator

    if packed:
        return packed_collator(packed_multiple_of, tok.pad_token_id or 0)
    return DataCollatorForSeq2Seq(tok, padding="max_length" if max_length else "longest", max_length=max_length,
                                  label_pad_token_id=IGNORE, pad_to_multiple_of=pad_to_multiple_of,
                                  return_tensors="pt")


def prepare_data(cfg: dict, recipe: dict, tok):
    """The recipe's train and eval splits, tokenized, and what became of the rows (metrics.json's rows_*)."""
    from .config import resolve_dataset
    from .data import load_split

    loaded = load_split(resolve_dataset(cfg, recipe["dataset"]), recipe["split"], recipe["max_rows"])
    rows = dedupe_pairs(loaded) if recipe["dedupe"] else loaded
    train, evl = split_rows(rows, recipe["eval_fraction"], recipe["seed"])
    train, evl = tokenize(train, tok, recipe), tokenize(evl, tok, recipe)
    stats = {"rows_split": len(loaded), "rows_duplicate_pairs_dropped": len(loaded) - len(rows),
             "rows_train": len(train), "rows_eval": len(evl),
             "rows_truncated_train": int(sum(train["truncated"])),
             "tokens_mean_train": sum(map(len, train["input_ids"])) / max(len(train), 1),
             "label_tokens_train": sum(sum(1 for x in lab if x != IGNORE) for lab in train["labels"])}
    return train.remove_columns("truncated"), evl.remove_columns("truncated"), stats


def dataset_loss(model, ds, coll, batch_size: int) -> float:
    """Eval loss as the Trainer computes it: each batch's mean token loss, averaged over examples."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            feats = [ds[j] for j in range(i, min(i + batch_size, len(ds)))]
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in coll(feats).items()}
            loss = model(**batch, use_cache=False).loss.float().item()
            total += loss * len(feats)
            n += len(feats)
    return total / max(n, 1)
