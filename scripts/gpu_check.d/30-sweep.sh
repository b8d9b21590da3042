#!/usr/bin/env bash
# Sweep launcher on a GPU box (issue 10 items 1, 6): run.jobs=auto hands each cell its GPU through
# CUDA_VISIBLE_DEVICES; kill -9 of the sweep leaves no process on the GPU. Uses $PY and $OUT; under 90 s.
set -uo pipefail
D="$OUT/sweep"
mkdir -p "$D"
timeout 60 $PY -m membench.cli run -m workload=gpt_tiny run.device=cuda run.train_steps=6 run.warmup_steps=1 \
  run.measure_steps=2 run.seed=0,1 run.jobs=auto run.results_dir="$D/results" > "$D/jobs-auto.txt" 2>&1
echo "jobs=auto exit code $?" | tee -a "$D/jobs-auto.txt"
$PY - "$D/results" <<'PY' | tee "$D/devices.txt"
import json, sys, glob
for p in sorted(glob.glob(sys.argv[1] + "/runs/*.json")):
    r = json.load(open(p))
    print(r["status"], "seed", r["config"]["run"]["seed"], "launch", r.get("launch"), "gpu", (r.get("env") or {}).get("gpu"))
PY
# kill -9 of the whole sweep mid-run: no membench process may hold the GPU afterwards
setsid $PY -m membench.cli run workload=gpt2 run.device=cuda run.train_steps=200 run.warmup_steps=1 \
  run.measure_steps=2 run.results_dir="$D/killed" > "$D/killed.txt" 2>&1 &
SWEEP=$!
sleep 15
kill -9 -- -"$SWEEP" 2>/dev/null
sleep 3
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv > "$D/after-kill.txt" 2>&1
echo "processes on the GPU 3 s after kill -9 of the sweep (expect none):" && cat "$D/after-kill.txt"
ls "$D/killed/runs" 2>/dev/null | wc -l | xargs echo "records of the killed run (expect 0):"
