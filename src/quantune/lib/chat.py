"""The models the web page can chat with, found under results/ at the configured scale, each with the prompt
format its recipe trained with; loaded once (a bounded LRU cache) and streamed token by token with its speed.

Kinds: a base model of config/config.yaml that is on disk (the tiny or shape world, or a local `path:`), a LoRA
adapter on its base (a lora_sft target or one run of a rank sweep), a saved model (quantized, merged, SFT), and
a GGUF file (llama-cpp-python)."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .common import ROOT, QuantuneError, fail, read_json
from .measure import release_memory

# the data format's field a chat message fills (the other fields of its template stay empty)
CHAT_FIELD = {"advertisegen": "content", "alpaca": "instruction"}
CHAIN = ("merge", "gguf_convert", "gguf_quantize")  # stages whose prompt format is the adapter's they come from


@dataclass
class ChatModel:
    label: str
    kind: str  # hf | lora | gguf
    path: str  # model directory, adapter directory or .gguf file
    fmt: str = "raw text"  # the prompt format, in words
    render: Callable[[str], str] = field(default=lambda text: text, repr=False)
    max_input: int = 512
    trained: dict = field(default_factory=dict, repr=False)  # a LoRA adapter's recipe.json


def _lora_format(tr: dict, where: str) -> tuple[str, Callable[[str], str]]:
    from .prompts import TEMPLATE_FIELDS, render_prompt, template_of

    fmt = tr["data_format"]
    template = template_of(tr, fmt, where)
    fields = TEMPLATE_FIELDS[fmt]

    def render(text: str) -> str:
        return render_prompt({f: (text if f == CHAT_FIELD[fmt] else "") for f in fields}, fmt, template)

    return f"{fmt} template {tr['prompt_template']!r}", render


def prompt_format(results: Path, recipes: dict[str, dict], name: str, run_dir: Path | None = None):
    """(format in words, render, max input tokens, the adapter's recipe.json) of a target: a LoRA run as trained
    (its recipe.json), an SFT recipe's template, a merged model or GGUF through the adapter it came from."""
    from .config import referenced_targets

    d = run_dir or results / name
    if (d / "recipe.json").is_file():
        tr = read_json(d / "recipe.json")
        if "prompt_template" in tr and "data_format" in tr:
            fmt, render = _lora_format(tr, str(d / "recipe.json"))
            return fmt, render, int(tr.get("max_input_length") or 512), tr
    r = recipes.get(name) or {}
    if r.get("stage") == "sft":
        head, tail = r["prompt_template"].split("{prompt}", 1)
        return f"sft template {r['prompt_template']!r}", (lambda text: head + text + tail), int(r["max_seq_len"]), {}
    if r.get("stage") in CHAIN:
        for ref in referenced_targets(r):
            return prompt_format(results, recipes, ref)
    return "raw text", (lambda text: text), 512, {}


def catalogue(cfg: dict, recipes: dict[str, dict]) -> dict[str, ChatModel]:
    """Every model the page can load now, by label: base models on disk, then each built target's."""
    from .config import resolve_model, results_dir

    results = Path(results_dir(cfg))
    out: dict[str, ChatModel] = {}
    by_source: dict[str, list[str]] = {}
    for name in sorted(cfg["models"]):
        m = resolve_model(cfg, name)
        if m["local"] and (Path(m["source"]) / "config.json").is_file():
            by_source.setdefault(m["source"], []).append(name)
    for source, names in by_source.items():
        label = f"base: {', '.join(names)}"
        out[label] = ChatModel(label, "hf", source)
    for name in sorted(recipes):
        d = results / name
        if not (d / "metrics.json").is_file():
            continue
        stage = recipes[name]["stage"]
        runs = [(name, d)] + [(f"{name}/{r.name}", r) for r in sorted(d.iterdir()) if r.is_dir()]
        for label, run in runs:
            if (run / "adapter" / "adapter_config.json").is_file() and (run / "recipe.json").is_file():
                fmt, render, max_in, tr = prompt_format(results, recipes, name, run)
                label = f"{label} (LoRA adapter)"
                out[label] = ChatModel(label, "lora", str(run / "adapter"), fmt, render, max_in, tr)
        saved = [(f"{name} ({stage})", "hf", d / "model")] if (d / "model" / "config.json").is_file() else []
        saved += [(f"{name} (GGUF {g.stem})", "gguf", g) for g in sorted(d.glob("*.gguf"))]
        if saved:  # a saved model or GGUF file: the prompt format of the target (or the adapter it came from)
            fmt, render, max_in, _ = prompt_format(results, recipes, name)
            for label, kind, path in saved:
                out[label] = ChatModel(label, kind, str(path), fmt, render, max_in)
    return out


@dataclass
class Loaded:
    model: Any
    tok: Any = None
    seq2seq: bool = False
    device: str = "cpu"


def load(cm: ChatModel, cfg: dict) -> Loaded:
    """The model of a catalogue entry, on the GPU when there is one (GGUF: every layer offloaded if the build can)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cm.kind == "gguf":
        llm = GGUFProcess(cm.path, want_gpu=device == "cuda")
        return Loaded(llm, device="cuda" if llm.gpu else "cpu")
    if cm.kind == "lora":
        from peft import PeftModel

        from .config import resolve_model
        from .lora import load_base

        tr = cm.trained
        m = resolve_model(cfg, tr["model"], where=cm.label, must_exist=True)
        if (ROOT / m["source"]).resolve() != (ROOT / tr["model_source"]).resolve():
            raise fail(cm.label, f"adapter was trained on {tr['model_source']}, config resolves {tr['model']} to "
                       f"{m['source']}", "chat at the scale and with the model paths it was trained with")
        base, tok = load_base(m, tr, device, training=False)
        model = PeftModel.from_pretrained(base, cm.path).eval()
        return Loaded(model, tok, tr["task_type"] == "SEQ_2_SEQ_LM", device)
    from .models import load_model

    model, tok = load_model(cm.path, device_map={"": 0} if device == "cuda" else None)
    return Loaded(model.eval(), tok, bool(getattr(model.config, "is_encoder_decoder", False)), device)


class GGUFProcess:
    """A GGUF model in a process of its own (multiprocessing's spawn; lib.gguf.serve_llama, no torch there: see
    lib.gguf.import_llama_cpp), with llama-cpp-python's streaming create_completion as its interface."""

    def __init__(self, path: str, want_gpu: bool):
        import multiprocessing

        from .gguf import serve_llama

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve_llama, args=(child, path, want_gpu), daemon=True)
        self.proc.start()
        child.close()
        kind, info = self._recv()
        if kind == "error":
            self.close()
            raise RuntimeError(info)
        self.gpu = bool(info)

    def _recv(self):
        try:
            return self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise RuntimeError(f"the llama.cpp process ended (exit code {self.proc.exitcode})") from None

    def create_completion(self, prompt: str, **kw):
        self.conn.send((prompt, kw))
        while True:
            kind, x = self._recv()
            if kind == "end":
                return
            if kind == "error":
                raise RuntimeError(x)
            yield x

    def close(self) -> None:
        try:
            self.conn.send("close")
        except (OSError, ValueError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()


class ModelCache:
    """At most `limit` loaded models; the least recently used one is dropped first."""

    def __init__(self, cfg: dict, limit: int = 2):
        self.cfg, self.limit = cfg, max(1, limit)
        self.models: OrderedDict[str, Loaded] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, cm: ChatModel) -> Loaded:
        with self.lock:
            if cm.label in self.models:
                self.models.move_to_end(cm.label)
                return self.models[cm.label]
            while len(self.models) >= self.limit:
                _, dropped = self.models.popitem(last=False)
                if isinstance(dropped.model, GGUFProcess):
                    dropped.model.close()
                release_memory()
            try:
                loaded = load(cm, self.cfg)
            except QuantuneError:
                raise
            except Exception as e:  # noqa: BLE001 - any loader failure is one line in the page
                first = str(e).splitlines()[0] if str(e) else ""
                raise fail(cm.label, f"could not load {cm.path} ({type(e).__name__}: {first})",
                           "check that the target finished (its metrics.json) and that this env has its libraries"
                           ) from None
            self.models[cm.label] = loaded
            return loaded


@dataclass
class Settings:
    sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 64
    seed: int = 0


def stream(cm: ChatModel, lm: Loaded, text: str, s: Settings) -> Iterator[tuple[str, int, float]]:
    """(text so far, tokens generated, seconds) after each new token of the answer to one prompt."""
    prompt = cm.render(text)
    if cm.kind == "gguf":
        yield from _stream_gguf(lm.model, prompt, s)
    else:
        yield from _stream_hf(lm, prompt, cm.max_input, s)


def _stream_gguf(llm, prompt: str, s: Settings):
    t0, n, out = time.perf_counter(), 0, ""
    kw = dict(max_tokens=s.max_new_tokens, stream=True, seed=s.seed, repeat_penalty=1.0)
    kw.update(temperature=s.temperature, top_p=s.top_p) if s.sample else kw.update(temperature=0.0, top_k=1)
    for chunk in llm.create_completion(prompt, **kw):
        c = chunk["choices"][0]
        out += c["text"]
        n += 1 if c["text"] or c.get("finish_reason") is None else 0  # the closing chunk holds no token
        yield out, n, time.perf_counter() - t0


def _stream_hf(lm: Loaded, prompt: str, max_input: int, s: Settings):
    import torch
    from transformers import TextIteratorStreamer, set_seed

    from .prompts import prompt_ids

    tok, model = lm.tok, lm.model

    class Counting(TextIteratorStreamer):
        """Counts the tokens generated (a seq2seq decoder's start token aside)."""

        n = -1 if lm.seq2seq else 0

        def put(self, value):
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.n += int(value.numel())
            super().put(value)

    ids = prompt_ids(tok, [prompt], max_input, lm.seq2seq)[0]
    streamer = Counting(tok, skip_prompt=not lm.seq2seq, skip_special_tokens=True, timeout=600)
    dev = next(model.parameters()).device
    kw: dict[str, Any] = dict(input_ids=torch.tensor([ids], device=dev),
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=dev),
                              max_new_tokens=s.max_new_tokens, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id, streamer=streamer)
    if s.sample:
        set_seed(s.seed)
        kw.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
    else:
        kw.update(do_sample=False, num_beams=1)
    err: list[BaseException] = []

    def run():
        try:
            with torch.no_grad():
                model.generate(**kw)
        except BaseException as e:  # noqa: BLE001 - reported in the page after the stream ends
            err.append(e)
            streamer.end()

    t0, out = time.perf_counter(), ""
    th = threading.Thread(target=run, daemon=True)
    th.start()
    for piece in streamer:
        out += piece
        yield out, max(streamer.n, 0), time.perf_counter() - t0
    th.join()
    if err:
        raise err[0]
    yield out, max(streamer.n, 0), time.perf_counter() - t0
