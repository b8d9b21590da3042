"""One progress display per sweep: a tqdm bar (terminals only) and one line per finished cell with the counts.

Lines go to stdout so logs keep them; the bar goes to stderr and only when stderr is a terminal.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

FAILED = ("oom", "error", "timeout")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Display:
    def __init__(self, total: int, jobs: int):
        self.total, self.jobs = total, max(1, jobs)
        self.done = self.failed = self.running = 0
        self.statuses: dict[str, int] = {}
        self.walls: list[float] = []
        self.t0 = time.monotonic()
        self.bar = tqdm(total=total, file=sys.stderr, disable=not sys.stderr.isatty(), unit="cell", leave=False)

    def _counts(self) -> str:
        left = self.total - self.done
        eta = ""
        if self.walls and left:
            eta = f", ETA {_clock(sum(self.walls) / len(self.walls) * left / min(self.jobs, left))}"
        return f"{self.done}/{self.total} done, {self.running} running, {self.failed} failed{eta}"

    def line(self, text: str) -> None:
        self.bar.write(text, file=sys.stdout)
        sys.stdout.flush()

    def started(self, label: str, where: str = "") -> None:
        self.running += 1
        self.line(f"  start  {label}{f'  ({where})' if where else ''}")
        self.bar.set_postfix_str(self._counts())

    def finished(self, label: str, record: dict | None, summary: str, wall_s: float | None = None) -> None:
        self.running = max(0, self.running - 1)
        self.done += 1
        status = record["status"] if record else "error"
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.failed += status in FAILED
        if wall_s is not None:
            self.walls.append(wall_s)
        self.bar.update(1)
        self.line(f"[{self._counts()}] {label}: {summary}")
        self.bar.set_postfix_str(self._counts())

    def skipped(self, label: str, why: str) -> None:
        self.total -= 1
        self.statuses["skipped"] = self.statuses.get("skipped", 0) + 1
        self.bar.total = self.total
        self.bar.refresh()
        self.line(f"  skip   {label}: {why}")

    def close(self) -> None:
        self.bar.close()
