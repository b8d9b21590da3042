"""How far a running cell is: the step loop writes its step count to a small file, the sweep reads it.

The file is named by MEMBENCH_PROGRESS_FILE, which the runner (membench/runner.py) sets for each child; outside a
sweep there is none and writing is a no-op. Both sides of the file's format live here, so the child side
(membench/execute.py) and the parent side need not import each other.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

_last_write = [0.0]


def report_progress(step: int, total: int, every_s: float = 2.0) -> None:
    """For the step loop (membench/execute.py): tell the sweep how far this cell is, so a cell that runs for
    minutes shows its step count and time left. At most one small atomic file write every `every_s` seconds;
    a no-op outside a sweep (no MEMBENCH_PROGRESS_FILE)."""
    path = os.environ.get("MEMBENCH_PROGRESS_FILE")
    now = time.monotonic()
    # ranks of one cell share the file: rank 0 speaks for them (two writers raced on one temp name)
    if not path or int(os.environ.get("RANK", 0)) != 0 or (now - _last_write[0] < every_s and step < total):
        return
    _last_write[0] = now
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"step": step, "total": total, "time": time.time()}, f)
    os.replace(tmp, path)


def read_progress(path: Path | None, elapsed_s: float) -> tuple[int, int, float] | None:
    """(step, total steps, seconds left at the pace so far) as the child last reported it; None before that."""
    try:
        p = json.loads(path.read_text())
    except (OSError, ValueError, AttributeError):
        return None
    left = elapsed_s / p["step"] * (p["total"] - p["step"]) if p["step"] else float("nan")
    return p["step"], p["total"], left
