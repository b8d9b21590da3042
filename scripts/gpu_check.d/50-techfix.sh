#!/usr/bin/env bash
# techfix section of scripts/gpu_check.sh (<= 330 s; run it in its own call: D_SECTIONS=50-techfix ... d): DeepSpeed stage 1 vs 3 step time on one GPU (gpt2, bf16, N=1),
# stage 3 with the paper-faithful stage-3 knobs vs DeepSpeed's defaults (technique.zero.stage3_knobs).
# The GPU-marked tests (DeepSpeed bf16 then fp16 in one process; bnb FLOPs on CUDA) run in the tests section.
# Uses $PY (python) and $OUT (output folder); every command is time-boxed.
set -uo pipefail
R="$OUT/results/techfix"
mkdir -p "$R"
cell() {  # cell SECONDS OVERRIDES...
  local t=$1; shift
  timeout "$t" $PY -m membench.cli run workload=gpt2 run.device=cuda run.warmup_steps=2 run.measure_steps=5 \
    run.train_steps=9 "technique=[zero,bf16]" run.results_dir="$R" "$@" 2>&1 | grep -E "ok|oom|error|timeout" | tail -1
}
# The first check's 25-30 s boxes were too short for DeepSpeed's start-up: 60-70 s each now, within the section's box.
echo "zero stage 1";                    cell 60 technique.zero.stage=1
echo "zero stage 3 (paper: persist 0)"; cell 70 technique.zero.stage=3
echo "zero stage 3 (DS default knobs)"; cell 70 technique.zero.stage=3 technique.zero.stage3_knobs=deepspeed
# stage 3 + optimizer offload did not finish in 90 s in the first check: a longer box, and the step count it reached
echo "zero stage 3 + offload_optimizer"; cell 120 technique.zero.stage=3 technique.zero.offload_optimizer=cpu
$PY - "$R" <<'PY' 2>&1 | tee "$OUT/techfix_zero_steps.txt"
import json, sys, pathlib
for p in sorted(pathlib.Path(sys.argv[1]).glob("runs/*.json")):
    r = json.loads(p.read_text()); z = r["config"]["technique"].get("zero", {})
    t = (r.get("timing") or {}).get("median_step_s")
    print(f"stage={z.get('stage')} knobs={z.get('stage3_knobs')} offload={z.get('offload_optimizer')} status={r['status']} median_step_ms={t * 1e3 if t else None}")
PY
