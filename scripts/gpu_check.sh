#!/usr/bin/env bash
# Run one group of targets at scale shape on this machine's GPU, through the targets' own rules, and write
# bench/results/shape_<group>.md and .json (scripts/shape_summary.py; GROUP: lora, qlora, quantize, quantize_w3,
# bnb, sft, gguf, data, awq).
#
#   scripts/gpu_check.sh GROUP [OUTDIR]
#
# The machine needs the project's Python stack. Where it reaches no package registry, the group's wheels travel
# with the checkout in .whl/ (made where PyPI is reachable: .venv/bin/python scripts/gpu_wheels.py GROUP) and are
# installed into $QUANTUNE_SITE (default /tmp/quantune-site; kept, so later groups on the same machine reuse it;
# what it holds at the same version is not installed again). The gguf group's llama-cpp-python travels as its
# sdist and is built there with CUDA for the machine's GPU, its converter extracted beside it.
# The tiny world's corpus (results/tiny_world/data/tiny_text: Debian's fortunes-zh is not there) and the shape
# tokenizer may travel too; what is missing is built. Results stay in results/shape/ for the next group.
# QUANTUNE_TARGETS="t1 t2" runs part of a group; QUANTUNE_TIMEOUT=SECONDS stops Snakemake in time for the summary.
set -uo pipefail
GROUP=${1:?usage: scripts/gpu_check.sh GROUP [OUTDIR]}
OUTDIR=${2:-bench/results}
cd "$(dirname "$0")/.."
SITE=${QUANTUNE_SITE:-/tmp/quantune-site}
PY=${PYTHON:-python3}
WHEELS=${QUANTUNE_WHEELS:-.whl}
NEW=()  # what $SITE lacks at that version (a kept machine installs nothing twice)
for f in "$WHEELS"/*; do
  [ -f "$f" ] || continue
  b=$(basename "$f"); b=${b%.tar.gz}; name=${b%%-*}; rest=${b#*-}; ver=${rest%%-*}; ver=${ver%.whl}
  [ -d "$SITE/$name-$ver.dist-info" ] || NEW+=("$f")
done
if [ ${#NEW[@]} -gt 0 ]; then
  # llama-cpp-python's sdist is built for this machine's GPU (CUDA, its compute capability only; minutes)
  CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .)
  if [ -z "${CMAKE_ARGS:-}" ] && [ -n "$CAP" ] && command -v nvcc >/dev/null; then
    export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$CAP -DGGML_NATIVE=OFF"
  fi
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation \
    --no-compile --upgrade --target "$SITE" "${NEW[@]}" || { echo "gpu_check: installing into $SITE failed" >&2; exit 2; }
fi
# llama.cpp's converter, from the llama-cpp-python sdist that travelled (as scripts/install_llamacpp.sh installs it)
for sd in "$WHEELS"/llama_cpp_python-*.tar.gz; do
  [ -f "$sd" ] || continue
  v=$(basename "$sd" .tar.gz); v=${v#llama_cpp_python-}; conv="$SITE/share/llama.cpp"
  if [ "$(cat "$conv/VERSION" 2>/dev/null)" != "llama-cpp-python==$v" ]; then
    tmp=$(mktemp -d); src="llama_cpp_python-$v/vendor/llama.cpp"
    tar -xzf "$sd" -C "$tmp" "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$src/LICENSE" || exit 2
    echo "llama-cpp-python==$v" > "$tmp/$src/VERSION"; rm -rf "$conv"; mkdir -p "$SITE/share"; mv "$tmp/$src" "$conv"
  fi
done
[ -d "$SITE/share/llama.cpp" ] && export QUANTUNE_LLAMACPP_DIR="$SITE/share/llama.cpp"
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
[ "${NGPU:-0}" -gt 0 ] || { echo "gpu_check: error: no CUDA GPU visible to $PY; fix: run it on a GPU machine" >&2; exit 2; }
TARGETS=${QUANTUNE_TARGETS:-$("$PY" scripts/shape_summary.py "$GROUP" --targets)} || exit 2  # QUANTUNE_TARGETS: part of a group
mkdir -p "$OUTDIR"
# --resources gpu: one job per GPU at a time, so a job's wall time is its own; --scheduler greedy: Snakemake's ILP
# scheduler needs pulp, which the wheels leave out
${QUANTUNE_TIMEOUT:+timeout $QUANTUNE_TIMEOUT} "$PY" -m snakemake --cores all --resources gpu="$NGPU" --scheduler greedy --keep-going --rerun-triggers mtime input \
  --config scale=shape -- $TARGETS 2>&1 | tee "$OUTDIR/shape_${GROUP}.snakemake.log" | grep -E "^(rule|localrule|Finished|Error|\[)" | tail -40
"$PY" scripts/shape_summary.py "$GROUP" --results results/shape --out "$OUTDIR"
rc=$?
tar czf "$OUTDIR/shape_${GROUP}.logs.tgz" results/shape/logs results/shape/shape_world/logs 2>/dev/null
exit $rc
