#!/usr/bin/env bash
# Q4_0 vs f16 generation speed on a CUDA GPU: build llama-cpp-python with CUDA on a bare CUDA machine,
# then run bench/gguf_speed.py with every layer offloaded, on a model of Qwen2.5-1.5B's sizes.
#
#   bench/gguf_gpu.sh WHEELHOUSE OUTDIR [WAIT_SECONDS]
#
# WHEELHOUSE holds llama_cpp_python-<pinned>.tar.gz (the sdist; scripts/install_llamacpp.sh pins the version),
# and wheels of what the machine lacks (diskcache, gguf). The machine needs nvcc, cmake, ninja,
# scikit-build-core, torch, transformers and sentencepiece (a CUDA image with PyTorch has them).
# The CUDA build takes minutes: it runs in its own process session, so a call of this script that ends before
# the build does (a time-limited remote command) leaves it running, and the next call waits for it
# (WAIT_SECONDS, default 540) and then benchmarks. Results: OUTDIR/gguf_gpu.json, OUTDIR/build.log.
set -uo pipefail
cd "$(dirname "$0")/.."
WH=$(realpath "$1"); OUTDIR=$(realpath -m "$2"); WAIT=${3:-540}
SITE=/tmp/quantune-gguf-site; BUILD=/tmp/quantune-gguf-build
VERSION=$(sed -n 's/^LLAMA_CPP_PYTHON=\([0-9.]*\).*/\1/p' scripts/install_llamacpp.sh)
mkdir -p "$OUTDIR" "$BUILD"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} QUANTUNE_LLAMACPP_DIR=$BUILD/llama.cpp

if [ ! -e "$BUILD/started" ]; then
  touch "$BUILD/started"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WH"/*.whl || exit 1
  # the converter of the same release, as scripts/install_llamacpp.sh installs it
  tar -xzf "$WH/llama_cpp_python-$VERSION.tar.gz" -C "$BUILD"
  src="$BUILD/llama_cpp_python-$VERSION/vendor/llama.cpp"
  mkdir -p "$QUANTUNE_LLAMACPP_DIR"
  cp -r "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$src/LICENSE" "$QUANTUNE_LLAMACPP_DIR/"
  echo "llama-cpp-python==$VERSION" > "$QUANTUNE_LLAMACPP_DIR/VERSION"
  # sm_90 only (H100/H200): all architectures would take several times longer to compile
  setsid bash -c "CMAKE_ARGS='-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF' \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python3 -m pip install -v --no-index --no-deps --no-build-isolation \
    --target $SITE $WH/llama_cpp_python-$VERSION.tar.gz > $BUILD/build.log 2>&1; echo \$? > $BUILD/rc" \
    < /dev/null > /dev/null 2>&1 &
fi

t0=$(date +%s)
while [ ! -e "$BUILD/rc" ] && [ $(( $(date +%s) - t0 )) -lt "$WAIT" ]; do sleep 5; done
tail -c 200000 "$BUILD/build.log" > "$OUTDIR/build.log" 2>/dev/null
if [ ! -e "$BUILD/rc" ]; then
  echo "gguf_gpu: the CUDA build is still running after ${WAIT}s (call again to wait for it)"
  grep -c "Building CUDA object" "$BUILD/build.log" | sed 's/^/gguf_gpu: CUDA objects so far: /'
  exit 3
fi
if [ "$(cat "$BUILD/rc")" != 0 ]; then
  echo "gguf_gpu: the CUDA build failed (rc $(cat "$BUILD/rc")); the end of its log:"; tail -40 "$BUILD/build.log"
  exit 1
fi
echo "gguf_gpu: CUDA build done in $(grep -o 'Building CUDA object' "$BUILD/build.log" | wc -l) CUDA objects"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
PYTHONUNBUFFERED=1 python3 bench/gguf_speed.py --tokenizer results/tiny_world/tokenizers/spm --shape qwen2.5-1.5b \
  --n-gpu-layers -1 --threads 4 --pp-tokens 512 --gen-tokens 128 --repeats 3 --json "$OUTDIR/gguf_gpu.json"
