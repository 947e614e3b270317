"""The wheels (and the few sdists) a GPU machine without a package registry needs to run one group of shape-scale
targets (scripts/gpu_check.sh): the closure of the group's packages at the versions this checkout's .venv holds
(requirements.lock), less what the GPU image already has (scripts/gpu_image_packages.txt, one name a line),
downloaded for CPython 3.12 on x86-64 Linux into a git-ignored folder.

    .venv/bin/python scripts/gpu_wheels.py quantize --out .whl      # on a machine that reaches PyPI
    .venv/bin/python scripts/gpu_wheels.py qlora --minus lora --out .whl   # what a machine that ran lora lacks
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
BASE = ["snakemake", "jsonschema", "pyyaml", "datasets"]
TEXT = ["jieba", "nltk", "rouge-chinese"]  # BLEU / ROUGE of generations (lora_compare, lora_sweep)
GROUPS = {  # the packages each group's stages import beyond the image's torch / transformers / peft
    "lora": BASE + TEXT,
    "qlora": BASE + TEXT + ["bitsandbytes"],
    "quantize": BASE + ["llmcompressor"],
    "bnb": BASE + ["bitsandbytes"],
    "sft": BASE + ["deepspeed"],
    "data": BASE + ["datasketch"],
    "gguf": BASE + ["llama-cpp-python", "gguf"],  # llama-cpp-python: its sdist, built there with CUDA
}
# packages the CPU venv does not hold (their kernels need a GPU), downloaded without dependencies: the image has
# what they need (torch, triton); the pins are the envs' (envs/finetune.yaml, envs/deepspeed.yaml)
GPU_ONLY = {"qlora": {"liger-kernel": "0.8.5"}, "lora": {"liger-kernel": "0.8.5"}, "sft": {"liger-kernel": "0.8.5"}}
SKIP = {"pulp"}  # snakemake's ILP scheduler only (16 MB): scripts/gpu_check.sh runs --scheduler greedy
SDIST_ONLY = {"deepspeed",  # its wheel-less build needs torch: installed there with DS_BUILD_OPS=0
              "llama-cpp-python"}  # PyPI has no wheel; built there for the GPU (scripts/gpu_check.sh)
# What a build of the llama-cpp-python sdist never reads (the submodule's git objects, llama.cpp's docs, the
# vocabularies its tests load, the server's web UI): left out so that the sdist fits the device tool's 64 MiB carry
SDIST_TRIM = {"llama-cpp-python": [".git", "vendor/llama.cpp/docs", "vendor/llama.cpp/models", "vendor/llama.cpp/benches",
                                   "vendor/llama.cpp/tools/ui"]}
# Native libraries of a wheel that the GPU image never loads, left out (like SDIST_TRIM, to fit the 64 MiB carry):
# bitsandbytes ships one library per CUDA and ROCm release (43 MB); the image's CUDA major (its nvidia-*-cuNN
# packages) picks one. A library whose name matches the pattern is kept only if it names that major or the CPU.
WHEEL_TRIM = {"bitsandbytes": re.compile(r"libbitsandbytes_(cuda|rocm|xpu)\w*\.so$")}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> dict[str, str]:
    """name -> installed version for the roots and everything they require (no extras)."""
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if norm(name) in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            sys.exit(f"gpu_wheels: {name} is not installed in {sys.prefix}; fix: run scripts/setup.sh first")
        seen[norm(name)] = dist.version
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def trim(sdist: Path, drop: list[str]) -> None:
    """Rewrite an sdist without the given folders (paths below its top folder)."""
    import tarfile

    top = sdist.name[: -len(".tar.gz")]
    tmp = sdist.with_suffix(".tmp")
    with tarfile.open(sdist) as src, tarfile.open(tmp, "w:gz") as dst:
        for m in src:
            rel = m.name[len(top) + 1:]
            if not any(rel == d or rel.startswith(d + "/") for d in drop):
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    tmp.replace(sdist)


def image_cuda_major(image: set[str]) -> str | None:
    """The GPU image's CUDA major from its nvidia-*-cuNN package names ("13"), or None."""
    majors = {m.group(1) for n in image if (m := re.match(r"nvidia-[a-z-]+-cu(\d+)$", n))}
    return majors.pop() if len(majors) == 1 else None


def trim_wheel(wheel: Path, pattern, keep) -> list[str]:
    """Rewrite a wheel without the members whose name matches `pattern` unless `keep(name)`; RECORD loses their
    lines. Returns the dropped names."""
    import zipfile

    tmp = wheel.with_suffix(".tmp")
    dropped = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if pattern.search(info.filename) and not keep(info.filename):
                dropped.append(info.filename)
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(ln for ln in data.decode().splitlines(keepends=True)
                               if ln.split(",", 1)[0] not in dropped).encode()
            dst.writestr(info, data)
    tmp.replace(wheel)
    return dropped


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("group", choices=sorted(GROUPS))
    p.add_argument("--out", default=str(ROOT / ".whl"))
    p.add_argument("--minus", action="append", default=[], choices=sorted(GROUPS),
                   help="leave out what this group's wheels already installed there (a later group on a kept machine)")
    a = p.parse_args()
    image = {norm(x) for x in (ROOT / "scripts" / "gpu_image_packages.txt").read_text().splitlines()
             if x.strip() and not x.startswith("#")}
    have = set().union(*(closure(GROUPS[g]) for g in a.minus)) if a.minus else set()
    need = {n: v for n, v in closure(GROUPS[a.group]).items() if n not in image | SKIP | have}
    need.update({n: v for n, v in GPU_ONLY.get(a.group, {}).items() if n not in have})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(out)]
    plat = [x for p_ in PLATFORMS for x in ("--platform", p_)]
    binary = pip + ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", *plat]
    for n, v in sorted(need.items()):  # a wheel for CPython 3.12 on x86-64, else the sdist (built there)
        spec = f"{n}=={v}"
        if n in SDIST_ONLY or subprocess.run(binary + [spec], capture_output=True).returncode != 0:
            # deepspeed's metadata needs this environment's torch; llama-cpp-python's needs scikit-build-core
            if subprocess.run(pip + ["--no-binary=:all:", "--no-build-isolation", spec]).returncode != 0:
                subprocess.run(pip + ["--no-binary=:all:", spec], check=True)
            if n in SDIST_TRIM:
                trim(next(out.glob(f"{n.replace('-', '_')}-{v}.tar.gz")), SDIST_TRIM[n])
        elif n in WHEEL_TRIM and (major := image_cuda_major(image)):
            wheel = next(out.glob(f"{n.replace('-', '_')}-{v}-*.whl"))
            trim_wheel(wheel, WHEEL_TRIM[n], lambda name: re.search(rf"_cuda{major}\d*\.so$", name) is not None)
    print(f"gpu_wheels: {a.group}: {len(need)} packages in {out}: {', '.join(sorted(need))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
