#!/usr/bin/env bash
# GPU section of the regression-tracking work (issue 11): the GPU-marked pytest-benchmark cells (gpt2 baseline,
# activation checkpointing, bf16; 30 timed steps each) saved as JSON, and `membench report --plot` on the
# study results gpu_check.sh wrote, if any. Uses $PY and $OUT; under 90 s.
set -uo pipefail
timeout 80 $PY -m pytest benchmarks -m gpu -q -o addopts=-ra --benchmark-enable \
  --benchmark-columns=median,iqr,min,rounds --benchmark-json="$OUT/bench-gpu.json" 2>&1 | tail -15 | tee "$OUT/bench-gpu.txt"
if [ -d "$OUT/results/runs" ]; then
  timeout 20 $PY -m membench.cli report "$OUT/results" --out "$OUT/REPORT-plot.md" --plot 2>&1 | tail -3
fi
