"""Prompts and padding for instruction data: the prompt templates of the data formats, prompt/answer
tokenization with labels -100 on the prompt, the right-padding training collator, and batched generation
(left-padded for decoder-only models)."""
from __future__ import annotations

import string
from typing import Any

from .common import fail


IGNORE_INDEX = -100


ANSWER_FIELD = {"advertisegen": "summary", "alpaca": "output"}


# Built-in prompt templates. `advertisegen`: the attribute string alone, what the seed notebooks trained on
# (prompt_text '' + content). `alpaca`: Stanford Alpaca's two templates (with and without an input).
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


TEMPLATES = {"advertisegen": {"advertisegen": "{content}"},
             "alpaca": {"alpaca": (ALPACA_INPUT, ALPACA_NO_INPUT)}}


TEMPLATE_FIELDS = {"advertisegen": {"content"}, "alpaca": {"instruction", "input"}}


def template_of(recipe: dict, fmt: str, where: str):
    """The prompt template: a built-in name or a format string whose fields belong to the data format."""
    t = recipe["prompt_template"]
    if "{" not in t:
        if t not in TEMPLATES.get(fmt, {}):
            raise fail(f"{where}: key prompt_template", f"{t!r} is not a built-in template for format {fmt}",
                       f"use one of: {', '.join(TEMPLATES.get(fmt, {}))}, or a string with "
                       f"{', '.join('{' + f + '}' for f in sorted(TEMPLATE_FIELDS[fmt]))}")
        return TEMPLATES[fmt][t]
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(t) if f is not None}
    except ValueError as e:
        raise fail(f"{where}: key prompt_template", f"not a valid format string ({e})", "escape braces as {{ }}") from None
    bad = fields - TEMPLATE_FIELDS[fmt]
    if bad or not fields:
        raise fail(f"{where}: key prompt_template", f"placeholder(s) {sorted(bad) or '(none)'} do not fit format {fmt}",
                   f"use {', '.join('{' + f + '}' for f in sorted(TEMPLATE_FIELDS[fmt]))}")
    return t


def render_prompt(row: dict, fmt: str, template) -> str:
    if fmt == "alpaca" and isinstance(template, tuple):
        with_input, no_input = template
        return (with_input if row["input"].strip() else no_input).format(**row)
    return template.format(**row)


def tokenize_example(tok, prompt: str, answer: str, max_in: int, max_out: int, seq2seq: bool) -> dict:
    """Prompt and answer tokenized separately and truncated separately; labels -100 on the prompt.

    Decoder-only: input = prompt (with the tokenizer's own special tokens, e.g. ChatGLM3's [gMASK] sop) + answer
    + eos, at most max_in + max_out tokens. Encoder-decoder: encoder input = prompt (+ eos), labels = answer + eos.
    """
    return tokenize_examples(tok, [prompt], [answer], max_in, max_out, seq2seq)[0]


def tokenize_examples(tok, prompts: list[str], answers: list[str], max_in: int, max_out: int,
                      seq2seq: bool) -> list[dict]:
    """tokenize_example of each (prompt, answer) pair, the texts handed to the tokenizer as two lists (a fast
    tokenizer encodes a list in parallel; each text is encoded as it is alone)."""
    eos = tok.eos_token_id
    answer_ids = [a[: max_out - 1] + [eos] for a in tok(answers, add_special_tokens=False)["input_ids"]]
    if seq2seq:
        return [{"input_ids": ids, "labels": a} for ids, a in zip(prompt_ids(tok, prompts, max_in, seq2seq=True),
                                                                   answer_ids)]
    prompt_tokens = tok(prompts, add_special_tokens=True, truncation=True, max_length=max_in)["input_ids"]
    return [{"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a} for p, a in zip(prompt_tokens, answer_ids)]


class SFTCollator:
    """Right-pads a batch to its longest row (or to a fixed length): input_ids with the pad id, attention_mask 0,
    labels -100. The seed notebooks' DataCollatorForChatGLM, generalised (attention mask, encoder-decoder, fixed
    length for comparison). Written here rather than DataCollatorForSeq2Seq: that one pads through the tokenizer's
    `_pad`, whose signature ChatGLM3's remote tokenizer breaks on transformers >= 4.45, and before 4.45 it pads
    labels only to the longest label under padding='max_length'."""

    def __init__(self, pad_id: int, padding: str = "longest", max_length: int | None = None,
                 max_label_length: int | None = None, seq2seq: bool = False):
        self.pad_id, self.padding, self.seq2seq = pad_id, padding, seq2seq
        self.max_length, self.max_label_length = max_length, max_label_length

    def __call__(self, rows: list[dict]) -> dict:
        def fixed(n):
            return n if self.padding == "max_length" and n else None

        ids, mask = pad_batch([r["input_ids"] for r in rows], self.pad_id, length=fixed(self.max_length))
        labels, _ = pad_batch([r["labels"] for r in rows], IGNORE_INDEX,
                              length=fixed(self.max_label_length if self.seq2seq else self.max_length))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build_split(tok, rows: list[dict], fmt: str, template, recipe: dict, seq2seq: bool, chunk: int = 4096):
    import datasets

    ans = ANSWER_FIELD[fmt]
    feats = []
    for i in range(0, len(rows), chunk):  # lists of a few thousand texts a tokenizer call
        part = rows[i:i + chunk]
        feats += tokenize_examples(tok, [render_prompt(r, fmt, template) for r in part], [r[ans] for r in part],
                                   recipe["max_input_length"], recipe["max_output_length"], seq2seq)
    return datasets.Dataset.from_list(feats)


def prompt_ids(tok, prompts: list[str], max_in: int, seq2seq: bool) -> list[list[int]]:
    """Prompts as the model is trained on them: with the tokenizer's special tokens, cut to max_in tokens; an
    encoder's input always ends with EOS (a T5 / mT5 tokenizer adds it only to a text it did not cut)."""
    out = []
    for p in prompts:
        ids = tok(p, add_special_tokens=True, truncation=True, max_length=max_in)["input_ids"]
        if seq2seq and (not ids or ids[-1] != tok.eos_token_id):
            ids = ids[: max_in - 1] + [tok.eos_token_id]
        out.append(ids)
    return out


def pad_batch(seqs: list[list[int]], value: int, side: str = "right", length: int | None = None):
    """Sequences padded with `value` on one side to `length` (default: the longest; longer ones are cut), and
    their attention mask, as two long tensors."""
    import torch

    n = length or max(len(s) for s in seqs)
    cut = [list(s[:n]) for s in seqs]
    if side == "left":
        ids = [[value] * (n - len(s)) + s for s in cut]
        mask = [[0] * (n - len(s)) + [1] * len(s) for s in cut]
    else:
        ids = [s + [value] * (n - len(s)) for s in cut]
        mask = [[1] * len(s) + [0] * (n - len(s)) for s in cut]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def generate_all(model, tok, prompts_ids: list[list[int]], *, batch_size: int, max_new_tokens: int,
                 seq2seq: bool, sample: dict | None) -> list[str]:
    import torch

    device = next(p for p in model.parameters()).device
    outs: list[str] = []
    if sample is not None:
        from transformers import set_seed

        set_seed(sample["seed"])  # the same random stream for every model
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)
    if sample is None:
        kw.update(do_sample=False, num_beams=1)
    else:
        kw.update(do_sample=True, temperature=sample["temperature"], top_p=sample["top_p"])
    for i in range(0, len(prompts_ids), batch_size):
        chunk = prompts_ids[i:i + batch_size]
        # an encoder's inputs pad on the right; a decoder's prompts on the left, so generation continues them
        ids, mask = pad_batch(chunk, tok.pad_token_id, "right" if seq2seq else "left")
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)
        new = gen if seq2seq else gen[:, ids.shape[1]:]
        outs.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
    return outs
