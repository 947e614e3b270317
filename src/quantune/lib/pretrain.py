"""Pretraining of the tiny base models (quantune.tiny_world pretrain): a short causal-LM (or, for the
seq2seq family, prefix -> continuation) run on the tiny corpus that gives each model real structure,
checkpointed and resumable.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

from .common import atomic_dir, fail, progress, seed_everything, write_metrics


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Checkpointer:
    """Saves model + optimizer + step + RNG state atomically; a rerun resumes from the last save, unless that save
    was made with other settings (steps, learning rate, model spec ...): it then starts again from step 0."""

    def __init__(self, path: str | Path, settings: dict | None = None):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings or {}, sort_keys=True))

    def save(self, step: int, model, optim, gen=None) -> None:
        import torch

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"step": step, "settings": self.settings, "model": model.state_dict(), "optim": optim.state_dict(),
                    "rng": torch.get_rng_state(), "gen": gen.get_state() if gen is not None else None}, tmp)
        os.replace(tmp, self.path)

    def load(self, model, optim, gen=None) -> int:
        import torch

        if not self.path.is_file():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("settings") != self.settings:
            print(f"checkpoint {self.path} (step {state['step']}) was saved with other settings; starting from step 0",
                  flush=True)
            return 0
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        torch.set_rng_state(state["rng"])
        if gen is not None and state.get("gen") is not None:
            gen.set_state(state["gen"])
        return int(state["step"])

    def clear(self) -> None:
        if self.path.is_file():
            self.path.unlink()


class StopOnSignal:
    """SIGTERM (SLURM's time limit, preemption, scancel) becomes a request to stop after the current step:
    the loop saves a checkpoint and exits 143 (128 + SIGTERM), and the rerun resumes from that checkpoint."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.received = None
        self._old = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def checkpoint_and_exit(self, step: int, start: int, steps: int, ckpt, model, optim, gen, tb) -> None:
        if step > start:
            ckpt.save(step, model, optim, gen)
        tb.close()
        self.restore()
        held = step if step > start else start
        print(f"{self.received} at step {step}/{steps}: " + (f"checkpoint {ckpt.path} holds step {held}; the rerun "
              "resumes from it" if held else "no step done yet, nothing to save"), flush=True)
        raise SystemExit(143)


def _stream(tokenizer, texts: list[str]):
    import torch

    ids: list[int] = []
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for e in enc:
        ids.extend(e)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _heldout_ppl(model, ids, seq_len: int, seq2seq: bool) -> float:
    from .measure import perplexity, seq2seq_perplexity

    return (seq2seq_perplexity(model, ids, seq_len) if seq2seq else perplexity(model, ids, seq_len, seq_len))["ppl"]


def _step(model, optim, lr: float, train_ids, gen, seq: int, bs: int, seq2seq: bool) -> tuple[float, float]:
    """One optimizer step on bs random windows of the corpus (prefix -> continuation for seq2seq); loss, grad norm."""
    import torch

    for g in optim.param_groups:
        g["lr"] = lr
    starts = torch.randint(0, train_ids.numel() - seq - 1, (bs,), generator=gen)
    batch = torch.stack([train_ids[s:s + seq] for s in starts])
    if seq2seq:
        half = seq // 2
        loss = model(input_ids=batch[:, :half].contiguous(), labels=batch[:, half:].contiguous()).loss
    else:
        loss = model(input_ids=batch, labels=batch).loss
    optim.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
    optim.step()
    return loss.item(), gnorm


def pretrain(family: str, spec: dict, hp: dict, tokenizer_dir: str, corpus_dir: str, out: str,
             stop_after: int | None = None) -> dict:
    import torch

    from .models import SEQ2SEQ_FAMILIES, corpus_texts, count_parameters, init_model, set_cpu_threads
    from .tb import TBWriter, peak_memory_mb

    seed_everything(hp["seed"])
    set_cpu_threads()
    model, tok = init_model(family, spec, tokenizer_dir, seed=hp["seed"])
    seq2seq = family in SEQ2SEQ_FAMILIES
    train_ids = _stream(tok, corpus_texts(corpus_dir, "train"))
    test_ids = _stream(tok, corpus_texts(corpus_dir, "test"))[: hp["eval_tokens"]]
    val_ids = _stream(tok, corpus_texts(corpus_dir, "validation"))[: hp["eval_tokens"] // 4]
    seq, bs, steps = hp["seq_len"], hp["batch_size"], hp["steps"]
    if train_ids.numel() < seq * bs + 1:
        raise fail(corpus_dir, "training corpus is shorter than one batch", "lower seq_len or batch_size")

    ppl_untrained = _heldout_ppl(model, test_ids, seq, seq2seq)
    optim = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=0.01, betas=(0.9, 0.95))
    ckpt = Checkpointer(Path(out).parent / ".checkpoints" / f"{Path(out).name}.pt",
                        {"family": family, "spec": spec, "hp": hp})
    gen = torch.Generator().manual_seed(hp["seed"])
    start = ckpt.load(model, optim, gen)
    if start:
        print(f"resuming {family} from step {start}")
    tb = TBWriter(Path(out).parent / ".tb" / Path(out).name)
    t0, tokens_seen, loss_first, loss_last = time.time(), 0, None, None
    model.train()
    bar = progress(range(start, steps), total=steps, initial=start, desc=f"pretrain {family}", unit="step")
    stop = StopOnSignal()  # SIGTERM: checkpoint now, exit 143; the rerun resumes
    for step in bar:
        if stop.received:
            stop.checkpoint_and_exit(step, start, steps, ckpt, model, optim, gen, tb)
        lr = lr_at(step, steps, hp["warmup_steps"], hp["lr"])
        loss_last, gnorm = _step(model, optim, lr, train_ids, gen, seq, bs, seq2seq)
        tokens_seen += seq * bs
        loss_first = loss_last if loss_first is None else loss_first
        if step % 10 == 0 or step == steps - 1:
            el = time.time() - t0
            tb.scalars({"train/loss": loss_last, "train/lr": lr, "train/grad_norm": gnorm,
                        "system/tokens_per_s": tokens_seen / max(el, 1e-9)}, step)
            bar.set_postfix(loss=f"{loss_last:.3f}", refresh=False)
        if (step + 1) % 100 == 0 or step == steps - 1:
            val = _heldout_ppl(model, val_ids, seq, seq2seq)
            tb.scalars({"eval/ppl": val, "eval/loss": math.log(val)}, step)
            model.train()
        if (step + 1) % hp["checkpoint_every"] == 0 and step + 1 < steps:
            ckpt.save(step + 1, model, optim, gen)
        if stop_after is not None and step + 1 >= stop_after:  # used by the resume test
            stop.restore()
            tb.close()
            return {"stopped_at": step + 1}
    stop.restore()
    train_s = time.time() - t0
    ppl = _heldout_ppl(model, test_ids, seq, seq2seq)
    metrics = {"target": f"tiny_{family}", "stage": "pretrain", "family": family, "steps": steps,
               "resumed_from_step": start, "seq_len": seq, "batch_size": bs, "lr": hp["lr"],
               "train_loss_first": loss_first, "train_loss_last": loss_last,
               "ppl_heldout_untrained": ppl_untrained, "ppl_heldout": ppl,
               "heldout_tokens": int(test_ids.numel()), "train_seconds": train_s,
               "tokens_per_s": tokens_seen / max(train_s, 1e-9), "peak_mem_mb": peak_memory_mb(),
               "vocab_size": len(tok), **count_parameters(model)}
    tb.final(metrics, steps)
    tb.close()
    model.eval()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_metrics(tmp / "metrics.json", metrics)
        # TensorBoard run lives with the model: results/tiny_world/models/<family>/tb
        os.replace(Path(out).parent / ".tb" / Path(out).name, tmp / "tb")
    ckpt.clear()
    return metrics
