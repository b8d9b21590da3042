#!/usr/bin/env bash
# Multi-GPU / NVML section of scripts/gpu_check.sh (uses $PY and $OUT; about 80 s at most):
# NVML readings and energy over a known load, the device-busy guard against a real second process, and a
# one-rank NCCL ZeRO-3 cell (process group bound to its GPU). The 2-GPU NCCL test runs with `pytest -m gpu`.
set -uo pipefail
mkdir -p "$OUT/multigpu"
D="$OUT/multigpu"
timeout 25 $PY - > "$D/nvml.txt" 2>&1 <<'PYEOF'
import json, time, torch
from membench import gpuinfo
h = gpuinfo.handle("cuda:0")
print("provenance", json.dumps(gpuinfo.provenance(h)))
x = torch.randn(8192, 8192, device="cuda")
torch.cuda.synchronize()
used0, e0, t0 = gpuinfo.used_bytes(h), gpuinfo.energy_mj(h), time.perf_counter()
for _ in range(200):
    y = x @ x
torch.cuda.synchronize()
e1, t1 = gpuinfo.energy_mj(h), time.perf_counter()
print("used_bytes", used0, "torch_reserved", torch.cuda.memory_reserved())
print("energy_mj", e1 - e0, "seconds", round(t1 - t0, 3), "mean_watts", round((e1 - e0) / 1e3 / (t1 - t0), 1))
print("busy_processes (self excluded)", gpuinfo.busy_processes(h))
PYEOF
cat "$D/nvml.txt"
# device-busy guard: a second process holds cuda:0; run.gpu_busy=fail must write an error record, start no child
$PY -c "import torch, time; torch.ones(1, device='cuda'); time.sleep(40)" & HOLDER=$!
sleep 8
timeout 30 $PY -m membench.cli run workload=gpt_tiny run.device=cuda run.gpu_busy=fail run.train_steps=5 \
  run.warmup_steps=1 run.measure_steps=2 run.results_dir="$D/busy" > "$D/busy.txt" 2>&1
kill "$HOLDER" 2>/dev/null; wait "$HOLDER" 2>/dev/null
grep -h '"error"' "$D"/busy/runs/*.json | tee -a "$D/busy.txt"
# one rank over NCCL (device_id binding) with FSDP2 ZeRO-3
timeout 40 $PY -m membench.cli run workload=gpt_tiny run.device=cuda "technique=[zero]" technique.zero.stage=3 \
  run.train_steps=5 run.warmup_steps=1 run.measure_steps=2 run.results_dir="$D/nccl1" 2>&1 | tail -3 | tee "$D/nccl1.txt"
grep -h '"backend"\|"gpu_nvml"' "$D"/nccl1/runs/*.json | head -3 | tee -a "$D/nccl1.txt"
