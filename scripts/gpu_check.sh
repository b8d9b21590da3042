#!/usr/bin/env bash
# GPU check, on a lent GPU machine without network (~7 minutes; each section time-boxed; everything under $OUT):
#   bash scripts/gpu_wheels.sh                                # here, once: fills the git-ignored .whl/
#   OUT=/tmp/gpu-out bash scripts/gpu_check.sh [SECTION ...]  # there; default: env tests cells d
# Uses the machine's own CUDA torch; the wheels it lacks are installed from .whl/ into /tmp/site (no index, no deps).
# Per cell it prints the tracker's peak, the allocator's peak of the same step and their ratio, and the allocator's
# peak of each phase (membench/device_table.py). Sections: env, tests (GPU-marked pytest), cells (gpt2 b=8 study
# cells with the allocator history at the memory step's peak), d (scripts/gpu_check.d/*.sh, one per capability).
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

cell() {  # cell NAME SECONDS overrides... : one gpt2 b=8 run into $RES/NAME, time-boxed; CELLS="a b" picks some
  local name=$1 box=$2; shift 2
  [ -z "${CELLS:-}" ] || [[ " $CELLS " == *" $name "* ]] || return 0
  log "cell $name"
  timeout "$box" $MB run workload=gpt2 run.device=cuda run.batch_size=8 run.cuda_memory_history=true \
    run.warmup_steps=1 run.measure_steps=3 run.train_steps=6 "run.results_dir=$RES/$name" "$@" 2>&1 \
    | grep -E "ok|oom|error|timeout" | tail -1 | tee -a "$OUT/log.txt"
}

for section in ${*:-env tests cells d}; do
  case $section in
  env)
    log "env"
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    $PY -c "import torch, deepspeed, bitsandbytes; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), 'deepspeed', deepspeed.__version__, 'bnb', bitsandbytes.__version__)" 2>&1 | tail -1 | tee -a "$OUT/log.txt"
    ;;
  tests)
    log "pytest -m gpu"
    timeout 180 $PY -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -25 > "$OUT/pytest-gpu.txt"
    tail -3 "$OUT/pytest-gpu.txt" | tee -a "$OUT/log.txt"
    ;;
  cells)
    cell baseline 60
    cell ckpt_full 60 "technique=[activation_checkpointing]"
    cell ckpt_full_bf16 60 "technique=[activation_checkpointing,bf16]"
    cell ckpt_selective_bf16 60 "technique=[activation_checkpointing,bf16]" technique.activation_checkpointing.mode=selective
    cell qbase_int8 60 "technique=[quantized_base]" technique.quantized_base.quant_type=int8 technique.quantized_base.compute_dtype=bfloat16
    cell qbase_nf4_ckpt_bf16 60 "technique=[quantized_base,activation_checkpointing,bf16]" technique.quantized_base.compute_dtype=bfloat16
    cell prune_structured 60 "technique=[prune_structured]"
    cell zero1_offload_bf16 75 "technique=[zero,bf16]" technique.zero.stage=1 technique.zero.offload_optimizer=cpu
    $PY -m membench.device_table "$RES"/* > "$OUT/device_table.md" 2>&1
    cat "$OUT/device_table.md"
    ;;
  d)
    for f in scripts/gpu_check.d/*.sh; do
      [ -e "$f" ] || continue
      log "section $f"
      timeout 120 bash "$f" 2>&1 | tail -15 | tee -a "$OUT/log.txt"
    done
    ;;
  esac
done
log "done"
