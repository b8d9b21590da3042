#!/usr/bin/env bash
# GPU check, on a lent GPU machine without network (~7 minutes; each section time-boxed; everything under $OUT):
#   bash scripts/gpu_wheels.sh                                # here, once: fills the git-ignored .whl/
#   OUT=/tmp/gpu-out bash scripts/gpu_check.sh [SECTION ...]  # there; default: env cells tests d
# Uses the machine's own CUDA torch; the wheels it lacks are installed from .whl/ into /tmp/site (no index, no deps).
# Per cell it prints the tracker's peak, the allocator's peak of the same step and their ratio, and the allocator's
# peak of each phase (membench/device_table.py). Sections: env, tests (GPU-marked pytest), cells (the `gpu` study,
# conf/experiment/gpu.yaml, records under $OUT/records), d (scripts/gpu_check.d/*.sh, one per capability).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/membench-gpu}
mkdir -p "$OUT"
T0=$SECONDS
log() { echo "[$((SECONDS - T0))s] $*" | tee -a "$OUT/log.txt"; }
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PY=python3
MB="$PY -m membench.cli"
RES="$OUT/results"

for section in ${*:-env cells tests d}; do
  case $section in
  env)
    log "env"
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    $PY -c "import torch, deepspeed, bitsandbytes; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), 'deepspeed', deepspeed.__version__, 'bnb', bitsandbytes.__version__)" 2>&1 | tail -1 | tee -a "$OUT/log.txt"
    ;;
  tests)
    log "pytest -m gpu"
    # -v streams one line per test, so a time-boxed run still shows what passed before the box closed
    timeout "${TESTS_BOX:-180}" $PY -m pytest -v -m gpu tests -p no:cacheprovider --timeout 90 -o addopts="" \
      > "$OUT/pytest-gpu.txt" 2>&1
    grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$OUT/pytest-gpu.txt" | tail -40 | tee -a "$OUT/log.txt"
    ;;
  cells)
    log "cells: membench run +experiment=gpu (conf/experiment/gpu.yaml; 90 s box per cell)"
    timeout 330 $MB run +experiment=gpu run.gpu_busy=wait "run.results_dir=$RES" 2>&1 | grep -E "^\[|done" | grep -v running | tee -a "$OUT/log.txt"
    mkdir -p "$OUT/records" && cp "$RES"/runs/*.json "$OUT/records/" 2>/dev/null
    $PY -m membench.device_table "$RES" > "$OUT/device_table.md" 2>&1
    cat "$OUT/device_table.md"
    ;;
  d)
    for f in scripts/gpu_check.d/${D_SECTIONS:-*}.sh; do  # D_SECTIONS="50-techfix" picks some
      [ -e "$f" ] || continue
      log "section $f"
      timeout 120 bash "$f" 2>&1 | tail -15 | tee -a "$OUT/log.txt"
    done
    ;;
  esac
done
log "done"
