#!/usr/bin/env bash
# Install the GGUF toolchain of the gguf_* targets into a Python prefix (default: .venv):
#   1. llama-cpp-python (pinned, built from source; CPU and portable unless CMAKE_ARGS says otherwise),
#   2. gguf (the PyPI release that equals the gguf-py of that llama.cpp tree: reads GGUF files back),
#   3. llama.cpp's own HF -> GGUF converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py),
#      extracted from the same llama-cpp-python release's sdist into PREFIX/share/llama.cpp/ (git-ignored;
#      the repository holds none of llama.cpp's code).
# Safe to run again: each part is skipped when it is already there at the pinned version.
#
#   scripts/install_llamacpp.sh                   # into .venv (what scripts/setup.sh calls)
#   scripts/install_llamacpp.sh "$CONDA_PREFIX"   # into a conda env (e.g. envs/llamacpp.yaml's)
#   CMAKE_ARGS="-DGGML_CUDA=on" scripts/install_llamacpp.sh   # GPU build on a CUDA machine
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_PYTHON=0.3.36   # keep equal to envs/llamacpp.yaml
GGUF=0.19.0               # = vendor/llama.cpp/gguf-py/pyproject.toml of llama-cpp-python 0.3.36
PREFIX=${1:-.venv}
PY="$PREFIX/bin/python"
DEST="$PREFIX/share/llama.cpp"
CONSTRAINTS=()
[ -f requirements.lock ] && CONSTRAINTS=(-c requirements.lock)

if [ ! -x "$PY" ]; then
  echo "install_llamacpp: $PY not found; fix: run scripts/setup.sh first (or pass an env prefix)" >&2
  exit 2
fi

have() {  # have DIST VERSION: is the distribution installed at exactly that version?
  "$PY" - "$1" "$2" <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
sys.exit(0 if m.version(sys.argv[1]) == sys.argv[2] else 1)
EOF
}

# 1. llama-cpp-python. GGML_NATIVE=OFF: the library must not be tuned to the build machine's CPU, since a
#    wheel in pip's cache can be reused on another machine (ggml then targets AVX2/FMA/F16C, x86-64-v3).
if ! have llama_cpp_python "$LLAMA_CPP_PYTHON"; then
  echo "install_llamacpp: building llama-cpp-python $LLAMA_CPP_PYTHON from source (about 10 min on 2 cores)"
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" \
    "$PY" -m pip install -q "${CONSTRAINTS[@]}" "llama-cpp-python==$LLAMA_CPP_PYTHON"
fi

# 2. gguf (reader/writer package of the same llama.cpp tree)
if ! have gguf "$GGUF"; then
  "$PY" -m pip install -q "${CONSTRAINTS[@]}" "gguf==$GGUF"
fi

# 3. the converter, from the sdist of the same release
if [ "$(cat "$DEST/VERSION" 2>/dev/null || true)" != "llama-cpp-python==$LLAMA_CPP_PYTHON" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$tmp"
  src="llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
  tar -xzf "$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$tmp" \
    "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$src/LICENSE"
  echo "llama-cpp-python==$LLAMA_CPP_PYTHON" > "$tmp/$src/VERSION"
  mkdir -p "$(dirname "$DEST")"
  rm -rf "$DEST.old"
  [ -e "$DEST" ] && mv "$DEST" "$DEST.old"
  mv "$tmp/$src" "$DEST"
  rm -rf "$DEST.old"
fi

"$PY" - "$DEST" <<'EOF'
import importlib.metadata as m, sys
import llama_cpp
print(f"install_llamacpp: llama-cpp-python {m.version('llama_cpp_python')} "
      f"(GPU offload: {bool(llama_cpp.llama_supports_gpu_offload())}), gguf {m.version('gguf')}, "
      f"converter in {sys.argv[1]}")
EOF
