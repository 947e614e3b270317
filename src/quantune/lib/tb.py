"""The shared TensorBoard writer: every training or quantization step logs through it.

Tags follow one scheme so that `tensorboard --logdir results` lines runs up:
  train/loss, train/lr, train/grad_norm, eval/loss, eval/ppl, quant/..., system/tokens_per_s,
  system/peak_mem_mb, system/wall_s, and final/<metric> for the numbers that end up in metrics.json.
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU run, else the peak RSS. torch is read only where
    this process imported it (a llama.cpp stage never does: lib.gguf.import_llama_cpp says why)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class TBWriter:
    """TensorBoard events through tensorboard's own event-file writer (what torch's SummaryWriter wraps; no torch
    import, so the llama.cpp stages log without it), with wall time and peak memory added to every log.

    TensorBoard names a run by its directory relative to --logdir (`tensorboard --logdir results` shows
    e.g. `eval_opt67b/tb`, `tiny_world/models/opt/tb`, `gguf_eval/tb/gguf_q4_0`): put each run in its own
    directory under results/<target>/tb. `run_name` is kept for callers' readability; the directory names the run."""

    def __init__(self, log_dir: str | Path, run_name: str | None = None):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(self.log_dir))
        self.t0 = time.time()

    def _event(self, summary, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self.writer.add_event(Event(summary=summary, step=int(step), wall_time=time.time()))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._event(Summary(value=[Summary.Value(tag=tag, simple_value=float(value))]), step)

    def scalars(self, values: dict[str, Any], step: int, system: bool = True) -> None:
        for tag, v in values.items():
            if v is None or isinstance(v, str):
                continue
            self.add_scalar(tag, float(v), step)
        if system:
            self.add_scalar("system/wall_s", time.time() - self.t0, step)
            self.add_scalar("system/peak_mem_mb", peak_memory_mb(), step)

    def final(self, metrics: dict[str, Any], step: int = 0) -> None:
        """Log the numbers of metrics.json once, under final/."""
        self.scalars({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step, system=False)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._event(text_pb(tag, text), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Read back every scalar under log_dir (used by tests and reports)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for ev in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(ev.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def trainer_callback(writer: TBWriter):
    """A transformers TrainerCallback that sends the Trainer's logs through the shared writer."""
    from transformers import TrainerCallback

    class _CB(TrainerCallback):
        def __init__(self):
            self.last_t, self.last_tokens = time.time(), 0

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            out = {}
            for k, v in logs.items():
                if not isinstance(v, (int, float)):
                    continue
                if k.startswith("eval_"):
                    out[f"eval/{k[5:]}"] = v
                elif k in ("loss", "learning_rate", "grad_norm"):
                    out[{"loss": "train/loss", "learning_rate": "train/lr", "grad_norm": "train/grad_norm"}[k]] = v
                elif k in ("train_runtime", "total_flos", "train_loss"):
                    out[f"final/{k}"] = v
            tokens = getattr(state, "num_input_tokens_seen", 0) or 0
            now = time.time()
            if tokens and now > self.last_t and tokens > self.last_tokens:
                out["system/tokens_per_s"] = (tokens - self.last_tokens) / (now - self.last_t)
            self.last_t, self.last_tokens = now, tokens
            writer.scalars(out, state.global_step)

    return _CB()
