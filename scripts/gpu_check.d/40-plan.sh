#!/usr/bin/env bash
# membench plan on a GPU (issue 9): fake CUDA-tensor simulation vs the real tracker (GPU-marked tests), then
# `plan --verify 2` on gpt_small: predicted vs measured peak (tracker and allocator). Under 90 s in all.
# Uses $PY (python) and $OUT (outputs) from scripts/gpu_check.sh.
mkdir -p "$OUT/plan"
timeout 45 $PY -m pytest -q -m gpu tests/unit/test_plan.py 2>&1 | tail -15 | tee "$OUT/plan/pytest-gpu-plan.txt"
timeout 40 $PY -m membench.cli plan workload=gpt_small run.batch_size=4 run.device=cuda run.memory_budget_mib=2048 \
  "plan.techniques=[activation_checkpointing,precision]" plan.simulate=2 plan.out="$OUT/plan/plan-gpt_small-cuda.json" \
  run.train_steps=4 run.warmup_steps=1 run.measure_steps=1 run.results_dir="$OUT/plan/results" --verify 2 \
  2>&1 | tail -30 | tee "$OUT/plan/plan-verify.txt"
