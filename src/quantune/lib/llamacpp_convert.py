"""llama.cpp's convert_hf_to_gguf.py, run with one addition: a BPE pre-tokenizer name for a tokenizer whose hash
the converter does not know.

    python -m quantune.lib.llamacpp_convert CONVERTER_DIR PRE_TOKENIZER [convert_hf_to_gguf.py arguments ...]

The converter identifies a byte-level BPE's pre-tokenizer by hashing the ids of a probe text and refuses
hashes it has not recorded, which every vocabulary trained here has (scale shape). Where transformers itself
fixes the pre-tokenizer by tokenizer class (Qwen2Tokenizer applies Qwen's regex whatever the vocabulary:
gguf_convert.PRE_TOKENIZER_OF_CLASS), that name is the right one; a known hash still wins, and gguf_convert
compares both runtimes' token ids on held-out text afterwards.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    conv, pre, args = Path(argv[0]), argv[1], argv[2:]
    sys.path[:0] = [str(conv), str(conv / "gguf-py")]
    from conversion import base  # the converter's own package (llama.cpp tree)

    known = base.TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            print(f"llamacpp_convert: pre-tokenizer hash not in the converter's list; using {pre!r}", flush=True)
            return pre

    base.TextModel.get_vocab_base_pre = vocab_base_pre
    sys.argv = [str(conv / "convert_hf_to_gguf.py"), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
