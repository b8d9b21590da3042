#!/usr/bin/env bash
# techniques section of scripts/gpu_check.sh (<= 300 s; `DEADLINE=360 D_SECTIONS=60-techniques ... gpu_check.sh d`):
# the CUDA-only cells of the techniques study (issue 18): activation offloading (alone and under full checkpointing),
# torchao's CPU-offload optimizer, float8 training, Liger's fused linear cross-entropy and bitsandbytes' paged 8-bit
# AdamW, on the techniques study's workload (llama_small, 32,768-token vocabulary) at a GPU batch. Each record holds
# the planner's prediction beside the measured device and host bytes; compare them with `membench plan` of the same
# cell made on a CPU (scripts/predict_study.py techniques shows how).
# Uses $PY (python) and $OUT (output folder); every command is time-boxed.
set -uo pipefail
R="$OUT/results/techniques_gpu"
mkdir -p "$R"
cell() {  # cell SECONDS OVERRIDES...
  local t=$1; shift
  timeout "$t" $PY -m membench.cli run workload=llama_small workload.vocab_size=32768 run.batch_size=16 \
    run.device=cuda run.warmup_steps=2 run.measure_steps=10 run.train_steps=14 run.results_dir="$R" "$@" 2>&1 \
    | grep -E "ok|oom|error|timeout" | tail -1
}
echo "baseline";                          cell 40
echo "activation_offload";                cell 40 "technique=[activation_offload]"
echo "checkpointing + activation_offload"; cell 40 "technique=[activation_checkpointing,activation_offload]"
echo "optimizer_offload";                 cell 60 "technique=[optimizer_offload]"
echo "float8 (bf16 autocast)";            cell 60 "technique=[float8,bf16]"
echo "fused_ce liger";                    cell 40 "technique=[fused_ce]" technique.fused_ce.impl=liger
echo "optimizer_8bit paged";              cell 40 "technique=[optimizer_8bit]" technique.optimizer_8bit.paged=on
$PY - "$R" <<'PY' 2>&1 | tee "$OUT/techniques_gpu.txt"
import json, sys, pathlib
for p in sorted(pathlib.Path(sys.argv[1]).glob("runs/*.json")):
    r = json.loads(p.read_text()); m = r.get("memory") or {}
    peak = m.get("peak_bytes"); dev = (m.get("device") or {})
    print(f"{r['techniques']} status={r['status']} peak_MiB={peak / 2**20 if peak else None} "
          f"alloc_peak={dev.get('max_allocated_bytes')} reserved={dev.get('max_reserved_bytes')} "
          f"host={(m.get('by_device') or {}).get('cpu')} predicted={m.get('predicted_by_category')}")
PY
