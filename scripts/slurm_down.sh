#!/usr/bin/env bash
# Stop what scripts/slurm_up.sh started (the pids it wrote to $PIDFILE), last started first; nothing else.
PIDFILE=${PIDFILE:-/run/membench-slurm.pids}
[ -f "$PIDFILE" ] || exit 0
for pid in $(tac "$PIDFILE"); do
  kill "$pid" 2>/dev/null || continue
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
done
rm -f "$PIDFILE"
