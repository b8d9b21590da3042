#!/usr/bin/env bash
# `make test`: every CPU test, the slow-marked ones included (a bare `pytest` deselects those through pyproject's
# addopts), in three pytest processes at once, each group's output printed when it ends.
#
# How: the real-Slurm tests (mostly waiting on the scheduler; its cells run under slurmd, on every core) in one
# process; the rest in two groups, each pinned to one core with one torch thread (tests/conftest.py follows the
# affinity; a cell a test starts takes its threads from the affinity too), balanced by the durations measured alone on
# this machine on 2026-12-07 (unit 287 s, runs 80 s, end-to-end 274 s, real Slurm 119 s) and then pinned (7.9 min
# against 6.7 for the two groups before a last move: 516 s of tests, 10.1 min with set-up from a fresh clone).
# Three unpinned processes with two threads each oversubscribed the 2 cores (648 s of tests, 12.2 min with set-up);
# one process after another took 11.9-12.8 min.
# The native crashes of earlier runs (a segfault in Hydra's compose, deepcopy; a SIGABRT in malloc after
# torch-pruning's tracing in test_plan_states; about one run in three) were heap corruption by the planner itself:
# `copy.deepcopy` of its fake model (FakeTensors outside FakeCopyMode); fixed by `prune_structured.fake_clone`.
set -u
PY=${1:-.venv/bin/python}
dir=$(mktemp -d)
pids=()
names=()
cpus=($("$PY" -c 'import os; print(*sorted(os.sched_getaffinity(0)))'))
group() {  # NAME CPU "PYTEST ARGS" ...: the pytest runs of one group, one after another, in a session of its own,
  # pinned to CPU (where there are 2 cores or more and taskset exists; "-" leaves it unpinned)
  local name=$1 cpu=$2 pin=()
  shift 2
  if [ "$cpu" != "-" ] && [ "${#cpus[@]}" -ge 2 ] && command -v taskset > /dev/null; then pin=(taskset -c "$cpu"); fi
  setsid "${pin[@]}" bash -c 'py=$1; shift; r=0; for a in "$@"; do $py -m pytest -q -m "slow or not slow" $a || r=1; done; exit $r' \
    _ "$PY" "$@" > "$dir/$name.log" 2>&1 &
  pids+=($!)
  names+=("$name")
}
stop() {
  for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done
  rm -rf "$dir"
  exit 130
}
trap stop INT TERM HUP
t0=$(date +%s)
group slurm - "tests/e2e/test_slurm_real.py"
# a new end-to-end file joins the first group
group unit+runs+e2e "${cpus[0]}" \
  "tests/unit --ignore=tests/unit/test_plan.py --ignore=tests/unit/test_plan_act.py --ignore=tests/unit/test_plan_states.py" \
  "tests/runs tests/e2e --ignore=tests/e2e/test_slurm_real.py --ignore=tests/e2e/test_kill.py --ignore=tests/e2e/test_zero.py --ignore=tests/e2e/test_zero_deepspeed_planned.py --ignore=tests/e2e/test_zero_simulated.py --ignore=tests/e2e/test_distributed.py"
group plan+kill+zero "${cpus[1]:-${cpus[0]}}" "tests/unit/test_plan.py tests/unit/test_plan_act.py tests/unit/test_plan_states.py" \
  "tests/e2e/test_kill.py tests/e2e/test_zero.py tests/e2e/test_zero_deepspeed_planned.py tests/e2e/test_zero_simulated.py tests/e2e/test_distributed.py"
echo "make test: 3 groups of tests at once (${names[*]}); each one's output follows when it ends"
rc=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  r=$?
  echo "--- ${names[$i]}: exit $r"
  cat "$dir/${names[$i]}.log"
  [ "$r" -eq 0 ] || rc=1
done
rm -rf "$dir"
echo "make test: the tests took $(($(date +%s) - t0)) s (load average $(cut -d' ' -f1-3 /proc/loadavg))"
exit $rc
