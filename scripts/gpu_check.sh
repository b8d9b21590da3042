#!/usr/bin/env bash
# GPU check, for a lent GPU machine: runs the GPU-marked tests and a small study, results under $OUT.
#   OUT=/tmp/gpu-out bash scripts/gpu_check.sh
# Uses the machine's own CUDA torch if one is installed; otherwise installs the default (CUDA) torch wheel.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/membench-gpu}
mkdir -p "$OUT"
python3 -m venv .venv-gpu
PY=.venv-gpu/bin/python
$PY -m pip install -q torch 2>&1 | tail -2
$PY -m pip install -q -e '.[quant,prune,dev]' 2>&1 | tail -2
$PY -m pip install -q --no-build-isolation deepspeed 2>&1 | tail -2 || echo "deepspeed install failed"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0))" | tee "$OUT/torch.txt"
timeout 300 $PY -m pytest -q -m gpu tests 2>&1 | tail -40 | tee "$OUT/pytest-gpu.txt"
# small study: checkpointing x precision on a GPU-scale preset, a few steps each
timeout 240 .venv-gpu/bin/membench run -m workload=gpt2 run.device=cuda run.train_steps=6 run.warmup_steps=2 \
  run.measure_steps=3 "technique=choice([],[activation_checkpointing],[bf16],[activation_checkpointing,bf16])" \
  run.results_dir="$OUT/results" 2>&1 | tail -20 | tee "$OUT/study.txt"
# ZeRO on the GPU path: DeepSpeed stages 2/3 with bf16, one rank (one GPU lent), plus optimizer offload
timeout 180 .venv-gpu/bin/membench run -m workload=gpt2 run.device=cuda run.train_steps=5 run.warmup_steps=1 \
  run.measure_steps=2 "technique=[zero,bf16]" technique.zero.stage=2,3 technique.zero.offload_optimizer=none,cpu \
  run.results_dir="$OUT/results" 2>&1 | tail -10 | tee "$OUT/zero.txt"
# bitsandbytes CUDA kernels: QLoRA-style nf4 base and paged 8-bit AdamW
timeout 120 .venv-gpu/bin/membench run -m workload=gpt2 run.device=cuda run.train_steps=5 run.warmup_steps=1 \
  run.measure_steps=2 "technique=choice([quantized_base],[optimizer_8bit])" \
  run.results_dir="$OUT/results" 2>&1 | tail -10 | tee "$OUT/quant.txt"
.venv-gpu/bin/membench report "$OUT/results" --out "$OUT/REPORT.md" > /dev/null 2>&1
echo "results in $OUT"
