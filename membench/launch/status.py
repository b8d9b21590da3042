"""`membench status RESULTS_DIR [--wait]`: where the latest sweep into RESULTS_DIR stands, from files alone.

A cell is done (its latest record's status) when a record newer than the sweep's start exists, running when its
lock is live, and pending otherwise (or `not run` once the sweep's own process is gone). Works for a local sweep
seen from another shell and for a Slurm sweep left running (`--wait` follows it to the end).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from membench.errors import ConfigError
from membench.launch import sweeps_dir
from membench.launch.progress import FAILED
from membench.records import load_records
from membench.runner import alive, lock_is_live, locks_dir, read_lock


def _sweep_alive(sweep: dict) -> bool:
    return sweep.get("host") != socket.gethostname() or alive(int(sweep.get("pid", 0)))


def cell_states(results_dir: str | Path, sweep: dict) -> list[tuple[str, str, str]]:
    """(label, state, detail) per cell of the sweep."""
    started = time.strftime("%Y%m%dT%H%M%S", time.gmtime(sweep["started"]))
    latest: dict[str, dict] = {}
    for r in sorted(load_records(results_dir), key=lambda r: r["run_id"]):
        latest[r["config_hash"]] = r
    rows = []
    for c in sweep["cells"]:
        r = latest.get(c["config_hash"])
        holder = read_lock(locks_dir(results_dir) / f"{c['config_hash']}.lock")
        if lock_is_live(holder):
            rows.append(
                (
                    c["label"],
                    "running",
                    f"pid {holder['pid']} on {holder['host']}, {time.time() - holder['started']:.0f} s",
                )
            )
        elif r is not None and (r["run_id"] >= started or r["status"] == "ok"):
            when = "" if r["run_id"] >= started else " (recorded before this sweep)"
            rows.append((c["label"], r["status"], (r.get("error") or "")[:100] + when))
        elif sweep.get("launcher") == "slurm" or _sweep_alive(sweep):
            rows.append((c["label"], "pending", ""))
        else:
            rows.append((c["label"], "not run", "the sweep's process ended before this cell; re-run the sweep"))
    return rows


def _latest_sweeps(results_dir: str | Path, all_sweeps: bool) -> list[dict]:
    files = sorted(sweeps_dir(results_dir).glob("*.json"))
    if not files:
        raise ConfigError(f"status: {str(results_dir)!r} has no sweeps/ folder (no sweep was started there)")
    return [json.loads(p.read_text()) for p in (files if all_sweeps else files[-1:])]


def status(results_dir: str, wait: bool = False, all_sweeps: bool = False, poll_s: float = 2.0) -> int:
    """Print each sweep's cells; 0 when all are ok, 1 when some failed, 3 when some are still running/pending."""
    if not Path(results_dir).is_dir():
        raise ConfigError(f"status: {results_dir!r}: no such folder")
    while True:
        sweeps = _latest_sweeps(results_dir, all_sweeps)
        states = []
        for s in sweeps:
            rows = cell_states(results_dir, s)
            states.extend(st for _, st, _ in rows)
            if not wait or all(st not in ("running", "pending") for st in states):
                jobs = f", jobs {s['job_ids'][0]}..{s['job_ids'][-1]}" if s.get("job_ids") else ""
                print(f"sweep {s['sweep_id']} ({s['launcher']}{jobs}): membench {' '.join(s.get('argv') or [])}")
                for label, st, detail in rows:
                    print(f"  {st:8s} {label}" + (f"  {detail}" if detail else ""))
        counts = {st: states.count(st) for st in dict.fromkeys(states)}
        if not wait or not (counts.get("running") or counts.get("pending")):
            print("membench: " + ", ".join(f"{n} {st}" for st, n in counts.items()))
            break
        time.sleep(poll_s)
    if counts.get("running") or counts.get("pending"):
        return 3
    return 1 if any(counts.get(f) for f in (*FAILED, "not run")) else 0
