"""`membench status RESULTS_DIR [--wait]`: where the latest sweep into RESULTS_DIR stands.

A cell is done (its latest record's status) when a record newer than the sweep's start exists, and running when its
lock is live. A Slurm cell without a record is resolved from Slurm (squeue, then sacct where accounting works; the
sweep file names each cell's task): queued, running, cancelled or failed (a task that ended without a record: time
limit, node failure, a crash outside the cell). A local cell is pending while the sweep's process lives, `not run`
once it is gone. `--wait` follows until no cell is queued, running or pending (a Slurm sweep left running).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from membench.child import is_alive
from membench.errors import ConfigError
from membench.launch import sweeps_dir
from membench.launch.progress import FAILED
from membench.launch.slurm import SlurmUnreachable, slurm_states, task_state
from membench.records import load_records
from membench.runner import lock_is_live, locks_dir, read_lock


def _sweep_alive(sweep: dict) -> bool:
    """The sweep's process runs (the same pid and start time, where the sweep file has it), or runs elsewhere."""
    return sweep.get("host") != socket.gethostname() or is_alive(int(sweep.get("pid", 0)), sweep.get("pid_start"))


def cell_states(results_dir: str | Path, sweep: dict) -> list[tuple[str, str, str]]:
    """(label, state, detail) per cell of the sweep."""
    started = time.strftime("%Y%m%dT%H%M%S", time.gmtime(sweep["started"]))
    latest: dict[str, dict] = {}
    for r in sorted(load_records(results_dir), key=lambda r: r["run_id"]):
        latest[r["config_hash"]] = r
    job_ids = sweep.get("job_ids") if isinstance(sweep.get("job_ids"), dict) else {}
    on_slurm = sweep.get("cluster") == "slurm"
    try:
        states = slurm_states(list(job_ids.values())) if on_slurm else {}
    except SlurmUnreachable as e:
        raise ConfigError(f"status: Slurm does not answer here ({e}); run it where squeue works") from None
    rows = []
    for c in sweep["cells"]:
        r = latest.get(c["config_hash"])
        holder = read_lock(locks_dir(results_dir) / f"{c['config_hash']}.lock")
        job = job_ids.get(c["config_hash"])
        if r is not None and r["run_id"] >= started:
            rows.append((c["label"], r["status"], (r.get("error") or "")[:100]))
        elif lock_is_live(holder):
            since = time.time() - holder["started"]
            rows.append((c["label"], "running", f"pid {holder['pid']} on {holder['host']}, {since:.0f} s"))
        elif job is not None and on_slurm:
            folder = sweep.get("slurm_folders", {}).get(c["config_hash"]) or sweep.get("slurm_folder", "")
            st, detail = task_state(job, states.get(job), Path(folder))
            if st == "skipped" and r is not None:  # another sweep's task recorded it meanwhile
                st, detail = r["status"], "(recorded by another sweep)"
            rows.append((c["label"], st, detail))
        elif r is not None and r["status"] == "ok":
            rows.append((c["label"], "ok", "(recorded before this sweep)"))
        elif _sweep_alive(sweep):  # a local pool, submitit's local executor, or a submission under way
            submitting = sweep.get("launcher") == "slurm" and "cluster" not in sweep
            rows.append((c["label"], "pending", "not submitted yet" if submitting else ""))
        elif job is not None:  # submitit's local executor: the task ended without a record
            rows.append((c["label"], "failed", f"job {job} ended without a record"))
        else:
            rows.append((c["label"], "not run", "the sweep's process ended before this cell; re-run the sweep"))
    return rows


def _latest_sweeps(results_dir: str | Path, all_sweeps: bool) -> list[dict]:
    files = sorted(sweeps_dir(results_dir).glob("*.json"))
    if not files:
        raise ConfigError(f"status: {str(results_dir)!r} has no sweeps/ folder (no sweep was started there)")
    return [json.loads(p.read_text()) for p in (files if all_sweeps else files[-1:])]


LIVE = ("running", "pending", "queued")


def status(results_dir: str, wait: bool = False, all_sweeps: bool = False, poll_s: float = 2.0) -> int:
    """Print each sweep's cells; 0 when all are ok, 1 when some failed or were cancelled, 3 when some are still
    queued/running/pending."""
    if not Path(results_dir).is_dir():
        raise ConfigError(f"status: {results_dir!r}: no such folder")
    while True:
        sweeps = _latest_sweeps(results_dir, all_sweeps)
        states = []
        for s in sweeps:
            rows = cell_states(results_dir, s)
            states.extend(st for _, st, _ in rows)
            if not wait or all(st not in LIVE for st in states):
                ids = sorted(s["job_ids"].values() if isinstance(s.get("job_ids"), dict) else s.get("job_ids") or [])
                jobs = f", jobs {ids[0]}..{ids[-1]}" if ids else ""
                print(f"sweep {s['sweep_id']} ({s['launcher']}{jobs}): membench {' '.join(s.get('argv') or [])}")
                for label, st, detail in rows:
                    print(f"  {st:9s} {label}" + (f"  {detail}" if detail else ""))
        counts = {st: states.count(st) for st in dict.fromkeys(states)}
        if not wait or not any(counts.get(st) for st in LIVE):
            print("membench: " + ", ".join(f"{n} {st}" for st, n in counts.items()), flush=True)
            break
        time.sleep(poll_s)
    if any(counts.get(st) for st in LIVE):
        return 3
    return 1 if any(counts.get(f) for f in (*FAILED, "failed", "cancelled", "not run")) else 0
