"""The gguf_convert stage: a merged transformers model converted to GGUF (f16 / bf16 / f32 / q8_0) with
llama.cpp's own convert_hf_to_gguf.py, and a check that llama.cpp and transformers tokenize the same texts alike.

    python -m quantune.gguf_convert --recipe recipes/gguf_f16_qwen.yaml --out results/gguf_f16_qwen

The converter (from the llama.cpp tree inside the pinned llama-cpp-python sdist) is installed by
scripts/install_llamacpp.sh into <venv>/share/llama.cpp/; QUANTUNE_LLAMACPP_DIR overrides. --merged DIR converts
another model directory instead of the recipe's `merged` target.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .lib.common import fail, run_cli, write_json, write_metrics
from .lib.gguf import converter_dir, import_llama_cpp, read_gguf, target_dir
from .lib.gguf import tensor_summary, write_tb


def special_tokens_added(ids_plain: list[int], ids_special: list[int], bos: int | None, eos: int | None) -> dict:
    """Which special tokens a runtime adds around a text: its ids with special tokens against its ids without."""
    extra = len(ids_special) - len(ids_plain)
    adds_bos = int(extra > 0 and bos is not None and ids_special[:1] == [bos]
                   and ids_special[1:1 + len(ids_plain)] == ids_plain)
    adds_eos = int(extra > 0 and eos is not None and ids_special[-1:] == [eos]
                   and len(ids_special) == len(ids_plain) + adds_bos + 1)
    return {"adds_bos": adds_bos, "adds_eos": adds_eos}


def hf_special_tokens(tok) -> dict:
    """What the transformers tokenizer the model was trained and scored with adds to a text (BOS, EOS)."""
    probe = "a b"
    return special_tokens_added(tok(probe, add_special_tokens=False)["input_ids"], tok(probe)["input_ids"],
                                tok.bos_token_id, tok.eos_token_id)


# BPE pre-tokenizers that transformers fixes by tokenizer class, whatever the vocabulary, by llama.cpp's name for
# them: used when the converter does not know the vocabulary's hash (lib/llamacpp_convert.py)
PRE_TOKENIZER_OF_CLASS = {"Qwen2Tokenizer": "qwen2"}


def pre_tokenizer_fallback(tok) -> str | None:
    return PRE_TOKENIZER_OF_CLASS.get(type(tok).__name__)


@contextlib.contextmanager
def converter_view(src: Path, special: dict):
    """The model directory as the converter reads it: every file linked, and tokenizer_config.json stating
    add_bos_token / add_eos_token as the transformers tokenizer behaves. Where the file leaves them out, the
    converter and llama.cpp fall back to the vocabulary type's default (BOS added for SentencePiece), and a
    model served by llama.cpp would see a token it never saw in training."""
    with tempfile.TemporaryDirectory(prefix="gguf-src-") as d:
        view = Path(d) / src.name
        view.mkdir()
        for f in src.iterdir():
            if f.name != "tokenizer_config.json":
                (view / f.name).symlink_to(f.resolve())
        tc_path = src / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
        tc.update(add_bos_token=bool(special["adds_bos"]), add_eos_token=bool(special["adds_eos"]))
        (view / "tokenizer_config.json").write_text(json.dumps(tc, indent=2), encoding="utf-8")
        yield view


def hf_vs_llamacpp_tokens(gguf_path: str | Path, hf, texts: list[str]) -> dict:
    """Tokenize the same texts as each runtime feeds them to the model, special tokens included: transformers'
    tokenizer and llama.cpp's (from the GGUF's vocab and its add_bos / add_eos flags). A wrong vocab mapping
    (e.g. a pre-tokenizer forced onto an unknown hash) or a BOS only one of them adds changes the ids silently."""
    llama_cpp = import_llama_cpp()
    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    agree, first_diff = 0, ""
    n_tokens = 0
    for t in texts:
        a = hf(t)["input_ids"]
        b = llm.tokenize(t.encode("utf-8"), add_bos=True, special=False)  # add_bos: llama.cpp's add_special
        n_tokens += len(a)
        if a == b:
            agree += 1
        elif not first_diff:
            i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            first_diff = f"text {texts.index(t)} token {i}: hf {a[i:i + 5]} llama.cpp {b[i:i + 5]}"
    probe = b"a b"
    ll = special_tokens_added(llm.tokenize(probe, add_bos=False, special=False),
                              llm.tokenize(probe, add_bos=True, special=False), llm.token_bos(), llm.token_eos())
    llm.close()
    return {"tokenizer_check_texts": len(texts), "tokenizer_check_agree": agree,
            "tokenizer_check_tokens": n_tokens, "tokenizer_check_first_diff": first_diff or "none",
            "llamacpp_adds_bos": ll["adds_bos"], "llamacpp_adds_eos": ll["adds_eos"]}


def check_texts(cfg: dict, recipe: dict, n: int) -> list[str]:
    from .lib.config import resolve_dataset
    from .lib.data import load_split

    rows = load_split(resolve_dataset(cfg, recipe["check_dataset"], key="check_dataset"),
                      recipe.get("check_split", "test"))
    return [r["text"] for r in rows if r["text"].strip()][:n]


def convert(recipe_path: str, out: str, cfg: dict, merged: str | None = None) -> dict:
    from transformers import AutoTokenizer

    from .lib.config import load_recipe

    recipe = load_recipe(recipe_path, cfg)
    src = Path(merged) if merged else target_dir(cfg, recipe["merged"]) / "model"
    if not (src / "config.json").is_file():
        raise fail(str(src), "no transformers model here (config.json missing)",
                   f"build {recipe['merged']} first (snakemake {recipe['merged']}) or pass --merged DIR")
    conv = converter_dir()
    texts = check_texts(cfg, recipe, recipe["check_texts"])
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    final = outp / f"model-{recipe['outtype']}.gguf"
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=outp)
    os.close(fd)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(src))  # what the model was trained and is scored with
    special = hf_special_tokens(tok)
    pre = pre_tokenizer_fallback(tok)
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter's own gguf-py
    with converter_view(src, special) as view:
        run = ([sys.executable, "-m", "quantune.lib.llamacpp_convert", str(conv), pre] if pre
               else [sys.executable, str(conv / "convert_hf_to_gguf.py")])
        cmd = [*run, str(view), "--outfile", tmp, "--outtype", recipe["outtype"]]
        print("+", " ".join(cmd), flush=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stdout.write(r.stdout[-20000:])
    sys.stdout.write(r.stderr[-20000:])
    if r.returncode != 0:
        os.unlink(tmp)
        last = next((l for l in reversed((r.stderr or r.stdout).strip().splitlines()) if l.strip()), "")
        raise fail(str(src), f"convert_hf_to_gguf.py failed ({r.returncode}): {last[:300]}",
                   "see the log above; the model's architecture and tokenizer must be ones the converter accepts")
    convert_s = time.time() - t0
    try:  # checked before the file takes its final name: a failed check leaves no GGUF behind
        info = read_gguf(tmp)
        tokcheck = hf_vs_llamacpp_tokens(tmp, tok, texts)
        bad = tokcheck["tokenizer_check_texts"] - tokcheck["tokenizer_check_agree"]
        if bad and recipe["require_same_tokens"]:
            raise fail(f"{recipe_path}: key require_same_tokens", f"llama.cpp tokenizes {bad} of "
                       f"{tokcheck['tokenizer_check_texts']} held-out texts differently from transformers "
                       f"({tokcheck['tokenizer_check_first_diff']})",
                       "give the model a tokenizer the converter maps exactly (a SentencePiece tokenizer.model "
                       "beside tokenizer.json, or a BPE whose pre-tokenizer hash llama.cpp knows)")
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    write_json(outp / "tensor_types.json", info)
    metrics = {"target": recipe["name"], "stage": "gguf_convert", "scale": cfg["scale"], "merged": str(src),
               "outtype": recipe["outtype"], "gguf_path": str(final), "converter": str(conv),
               "converter_release": (conv / "VERSION").read_text().strip(), "convert_seconds": convert_s,
               **tensor_summary(info, final), **tokcheck,
               "hf_adds_bos": special["adds_bos"], "hf_adds_eos": special["adds_eos"],
               "pre_tokenizer_fallback": pre or "none"}
    write_tb(outp, {"quant/gguf_file_mb": metrics["gguf_file_bytes"] / 2**20,
                     "quant/bits_per_weight": metrics["gguf_bits_per_weight"]}, metrics)
    return write_metrics(outp / "metrics.json", metrics)


def _cmd(a) -> None:
    from .lib.config import config_from_args

    m = convert(a.recipe, a.out, config_from_args(a), merged=a.merged)
    print(f"{m['target']}: {m['gguf_path']} ({m['gguf_file_bytes']} bytes, {m['gguf_tensors']} tensors); "
          f"tokenizer check {m['tokenizer_check_agree']}/{m['tokenizer_check_texts']} texts identical")


def build_parser() -> argparse.ArgumentParser:
    from .lib.config import stage_parser

    p = stage_parser("quantune.gguf_convert", __doc__, _cmd)
    p.add_argument("--merged", default=None, help="a transformers model directory to convert instead of the recipe's target's")
    return p


def main(argv=None) -> int:
    return run_cli(build_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
