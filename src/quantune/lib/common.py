"""Shared plumbing: one-line errors, atomic writes, metrics.json, command-line entry points."""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[3]  # the workflow directory (the checkout)


class QuantuneError(Exception):
    """A user-facing error: printed as one line, never as a traceback."""


def fail(where: str, what: str, fix: str) -> QuantuneError:
    """Build the project's one-line error: '<file/field>: <what is wrong>; fix: <how>'."""
    return QuantuneError(f"{where}: {what}; fix: {fix}")


# ---------------------------------------------------------------- atomic output

def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_savefig(fig, path: str | os.PathLike, **savefig_kw) -> None:
    """Save a matplotlib figure through a temporary sibling renamed into place, then close the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, **savefig_kw)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def write_jsonl(path: str | os.PathLike, rows) -> int:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- provenance

KEY_LIBRARIES = (
    "torch", "transformers", "tokenizers", "peft", "accelerate", "datasets", "tensorboard",
    "bitsandbytes", "llmcompressor", "compressed-tensors", "deepspeed", "llama_cpp_python", "gguf",
)


def library_versions() -> dict[str, str]:
    out = {}
    for name in KEY_LIBRARIES:
        try:
            out[f"version_{name.replace('-', '_')}"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    out["version_python"] = sys.version.split()[0]
    return out


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here,
                           capture_output=True, text=True, timeout=10)
        if r.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return r.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _metric_value(key: str, v: Any) -> Any:
    """A metrics.json value: a number or a string, or an object of them (declared per stage); bools become 0/1,
    numpy / torch scalars plain numbers, None is left out."""
    if isinstance(v, bool):
        return int(v)
    if hasattr(v, "item") and callable(v.item):
        return v.item()
    if isinstance(v, dict):
        return {str(k): x for k, x in ((k, _metric_value(f"{key}.{k}", x)) for k, x in v.items()) if x is not None}
    if v is None or isinstance(v, (int, float, str)):
        return v
    raise TypeError(f"metrics.json holds numbers, strings and objects of them: key {key!r} has a {type(v).__name__}")


def write_metrics(path: str | os.PathLike, metrics: dict[str, Any]) -> dict[str, Any]:
    """Write metrics.json (numbers, strings, and objects of them where the stage declares one) with the library
    versions and the git commit."""
    out = {k: v for k, v in ((k, _metric_value(k, v)) for k, v in metrics.items()) if v is not None}
    out.update(library_versions())
    out["git_commit"] = git_commit()
    out["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(path, out)
    return out


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise fail(str(path), "file not found", "build the target that writes it first") from None
    except json.JSONDecodeError as e:
        raise fail(f"{path}:{e.lineno}", f"invalid JSON ({e.msg})", "repair or delete the file") from None


# ---------------------------------------------------------------- entry points

def run_cli(build: Callable[[], argparse.ArgumentParser], argv: list[str] | None = None) -> int:
    """Parse args and call `args.func(args)`; a QuantuneError becomes one line on stderr, exit 2."""
    parser = build()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except QuantuneError as e:
        print(f"quantune: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # out of GPU memory: one line naming the recipe, what it needed and what to change
        if type(e).__name__ != "OutOfMemoryError":
            raise
        print(f"quantune: error: {out_of_memory_line(getattr(args, 'recipe', None) or parser.prog, e)}",
              file=sys.stderr)
        return 3
    return 0


def out_of_memory_line(where: str, err: Exception) -> str:
    """torch.cuda.OutOfMemoryError as one line: the peak the run reached (the most it measurably needed), the
    device's total, and the recipe keys that lower activation memory. Nothing of a finished target is touched:
    every output is written atomically after the work is done."""
    import torch

    peak = total = None
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    first = str(err).strip().splitlines()[0][:160] if str(err).strip() else "CUDA out of memory"
    have = f" (peak {peak:.1f} GiB allocated of the GPU's {total:.1f} GiB)" if peak is not None else ""
    return str(fail(where, f"out of GPU memory{have}: {first}",
                    "lower per_device_train_batch_size (raise gradient_accumulation_steps to keep the rows per "
                    "optimizer step), shorten max_input_length / max_output_length / max_seq_len, or set "
                    "gradient_checkpointing: true"))


def progress(iterable=None, *, total: int | None = None, initial: int = 0, desc: str = "", unit: str = "it"):
    """A tqdm progress bar on stderr (a step's log under Snakemake), redrawn at most every
    QUANTUNE_PROGRESS_INTERVAL seconds (default 5) so logs stay short; QUANTUNE_PROGRESS=0 turns it off."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, ascii=True,
                ncols=100, mininterval=float(os.environ.get("QUANTUNE_PROGRESS_INTERVAL", "5")),
                disable=os.environ.get("QUANTUNE_PROGRESS", "1") == "0")


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """A training target's checkpoints live beside its output, never inside it: results/.checkpoints/<target>/."""
    out = Path(out)
    return out.parent / ".checkpoints" / out.name


def free_port() -> int:
    """A free TCP port on localhost (for a launcher's rendezvous or a local server)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
