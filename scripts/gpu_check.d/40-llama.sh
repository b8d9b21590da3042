#!/usr/bin/env bash
# Llama workload on a lent GPU (called by scripts/gpu_check.sh with $PY and $OUT set; under 90 s in all):
# the CUDA activation-model test (fused RMSNorm keeps less than the CPU composite) and one llama_1b cell.
timeout 40 $PY -m pytest -q -m gpu tests/runs/test_workloads_llama.py 2>&1 | tail -15 | tee "$OUT/llama-pytest-gpu.txt"
timeout 45 $PY -m membench.cli run workload=llama_1b run.device=cuda run.batch_size=1 run.train_steps=4 \
  run.warmup_steps=1 run.measure_steps=1 workload.eval_batches=1 "technique=[activation_checkpointing,bf16]" \
  run.results_dir="$OUT/results-llama" 2>&1 | tail -5 | tee "$OUT/llama-1b.txt"
