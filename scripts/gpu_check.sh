#!/usr/bin/env bash
# GPU check, on a lent GPU machine without network (one call under the device tool's 10-minute limit: the whole
# check stops by $DEADLINE seconds, 480 by default, and every section is boxed within what is left):
#   bash scripts/gpu_wheels.sh                                # here, once: fills the git-ignored .whl/
#   OUT=/tmp/gpu-out bash scripts/gpu_check.sh [SECTION ...]  # there; default: env cells tests d
# Under the device tool (600 s a call), two calls: `... gpu_check.sh env cells tests` (~7 min), then
# `DEADLINE=360 D_SECTIONS=50-techfix ... gpu_check.sh d` (DeepSpeed stage 1 vs 3 vs 3 + offload timing).
# Uses the machine's own CUDA torch; the wheels it lacks are installed from .whl/ into /tmp/site (no index, no deps).
# Per cell it prints the tracker's peak, the allocator's peak of the same step and their ratio, and the allocator's
# peak of each phase (membench/device_table.py). Sections: env, tests (GPU-marked pytest), cells (the `gpu` study,
# conf/experiment/gpu.yaml), d (scripts/gpu_check.d/*.sh, one per capability; D_SECTIONS="50-techfix 40-llama"
# picks some). The sections write under a work folder; $OUT gets five files, so that all come back through a
# tool that returns few files: log.txt, nvidia-smi.txt, device_table.md, pytest-gpu.txt and check.tar.gz (every
# record and section output). Back home: tar xzf check.tar.gz -C /tmp/gpu; cp /tmp/gpu/results/runs/*.json
# results/gpu/runs/; python -m membench.device_table results/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL=${OUT:-/tmp/membench-gpu}
export OUT=${WORK:-/tmp/membench-gpu-work}  # the sections' outputs; packed into $FINAL/check.tar.gz at the end
mkdir -p "$FINAL" "$OUT"
T0=$SECONDS
DEADLINE=${DEADLINE:-480}
log() { echo "[$((SECONDS - T0))s] $*" | tee -a "$OUT/log.txt"; }
box() {  # box SECONDS: the section's own limit, or what is left before the deadline (20 s kept for packing)
  local left=$((DEADLINE - (SECONDS - T0) - 20))
  echo $(($1 < left ? $1 : (left > 1 ? left : 1)))
}
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
    timeout "$(box "${TESTS_BOX:-200}")" $PY -m pytest -v -m gpu tests -p no:cacheprovider --timeout 90 -o addopts="" \
      > "$OUT/pytest-gpu.txt" 2>&1
    grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$OUT/pytest-gpu.txt" | tail -40 | tee -a "$OUT/log.txt"
    ;;
  cells)
    log "cells: membench run +experiment=gpu (conf/experiment/gpu.yaml; 90 s box per cell)"
    timeout "$(box 300)" $MB run +experiment=gpu run.gpu_busy=wait "run.results_dir=$RES" 2>&1 | grep -E "^\[|done" | grep -v running | tee -a "$OUT/log.txt"
    $PY -m membench.device_table "$RES" > "$OUT/device_table.md" 2>&1
    cat "$OUT/device_table.md"
    ;;
  d)
    for name in ${D_SECTIONS:-50-techfix 40-llama 40-plan 30-sweep 40-multigpu 40-track}; do
      f=scripts/gpu_check.d/$name.sh
      [ -e "$f" ] || continue
      log "section $f"
      timeout "$(box 340)" bash "$f" 2>&1 | tail -15 | tee -a "$OUT/log.txt"
    done
    ;;
  esac
done
log "done; packing"
cp "$OUT"/log.txt "$OUT"/nvidia-smi.txt "$OUT"/device_table.md "$OUT"/pytest-gpu.txt "$FINAL"/ 2>/dev/null
tar czf "$FINAL/check.tar.gz" -C "$OUT" --exclude "*.pt" --exclude "*.pickle" . && ls -la "$FINAL"
