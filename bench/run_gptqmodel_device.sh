#!/usr/bin/env bash
# bench/quant_gpu_gptqmodel.py on the device machine (torch 2.11 image, no network): GPTQModel 7.6.0 and its missing
# dependencies travel as wheels in .whl_gptq/ (git-ignored; bench/results/quant_gpu_gptqmodel.md says how they were
# made). GPTQModel's JIT extensions are cached under $GPTQMODEL_TORCH_EXTENSIONS_DIR; a cache brought back from an
# earlier run (.whl_gptq/ext.tgz) is unpacked first.
#   bash bench/run_gptqmodel_device.sh tiny     # install, import, tiny shape on the GPU (smoke)
#   bash bench/run_gptqmodel_device.sh full     # OPT-6.7B shape, 128 x 2048 calibration
set -o pipefail
mode=${1:-tiny}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_gptq/*.whl \
    || exit 3
export PYTHONPATH=/tmp/site LD_LIBRARY_PATH="$PWD/.whl_gptq/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export GPTQMODEL_TORCH_EXTENSIONS_DIR=/tmp/gx PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p /tmp/gx
[ -f .whl_gptq/ext.tgz ] && tar xzf .whl_gptq/ext.tgz -C /tmp/gx
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
  python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)"
  which gcc g++ nvcc ninja; nproc; df -h /tmp | tail -1
} 2>&1 | tee "$OUT/env.txt"
if [ "$mode" = full ]; then
  args=(--out "$OUT/quant_gpu_gptqmodel.json" --samples 128 --seq 2048)
else
  args=(--out "$OUT/quant_gpu_gptqmodel_tiny.json" --tiny)
fi
# the progress bars redraw with \r: the full log goes to $OUT, the console gets it without the redraws
python3 bench/quant_gpu_gptqmodel.py "${args[@]}" 2>&1 | tee "$OUT/$mode.log" | tr '\r' '\n' \
    | grep -v -E 'elapsed .* estimated|^\s*$|\[[0-9]+ of [0-9]+\]|it/s\]$'
rc=${PIPESTATUS[0]}
tar czf "$OUT/ext.tgz" -C /tmp/gx . 2>/dev/null
gzip -f "$OUT/$mode.log"
exit $rc
