#!/usr/bin/env bash
# Run one group of targets at scale shape on this machine's GPU, through the targets' own rules, and write
# bench/results/shape_<group>.md and .json (scripts/shape_summary.py; GROUP: lora, qlora, quantize, quantize_w3,
# bnb, sft, gguf, data, awq).
#
#   scripts/gpu_check.sh GROUP [OUTDIR]
#
# The machine needs the project's Python stack. Where it reaches no package registry, the group's wheels travel
# with the checkout in .whl/ (made where PyPI is reachable: .venv/bin/python scripts/gpu_wheels.py GROUP) and are
# installed into $QUANTUNE_SITE (default /tmp/quantune-site; kept, so later groups on the same machine reuse it).
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
if compgen -G "$WHEELS/*" >/dev/null; then
  DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade \
    --target "$SITE" "$WHEELS"/* || { echo "gpu_check: installing $WHEELS/ into $SITE failed" >&2; exit 2; }
fi
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
