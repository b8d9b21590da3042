"""The local pool: as many cells at once as run.jobs and the machine allow, each its own child (membench/runner.py).

CUDA cells get world_size GPUs each through CUDA_VISIBLE_DEVICES (GPUs listed by NVML, or the parent's
CUDA_VISIBLE_DEVICES); run.jobs=auto runs as many as the GPUs allow. CPU cells share the cores: with K cells at once
each gets cores // K torch threads unless run.num_threads names its own; run.jobs=auto on CPU is cores // 4
(four threads or more per cell), so a small machine runs one cell at a time and timings stay comparable.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from membench.errors import ConfigError
from membench.launch import Planned
from membench.launch.progress import Display
from membench.report import summary_line
from membench.runner import Cell, recorded_ok

LONG_CELL_S = 30.0  # a running cell older than this prints its step count every LONG_CELL_S seconds


_CANCEL_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class Cancelled(BaseException):
    """SIGTERM during a sweep: running cells are killed and the sweep exits 143 (like KeyboardInterrupt, 130)."""


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """GPU ids this sweep may hand out, without initialising CUDA in the parent (NVML, or CUDA_VISIBLE_DEVICES)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML library or no driver: no GPU to hand out
        return []


def is_cuda(config: dict, gpus: list[str]) -> bool:
    device = config["run"].get("device", "auto")
    return device == "cuda" or (device == "auto" and bool(gpus))


def parallelism(jobs: str, cells: list[Planned], gpus: list[str]) -> int:
    """How many cells at once (run.jobs=K or auto); rejects a cell that needs more GPUs than there are."""
    cuda = [c for c in cells if is_cuda(c.config, gpus)]
    for c in cuda:
        world = int(c.config["run"].get("world_size", 1))
        if world > len(gpus):
            raise ConfigError(f"run.world_size={world}: needs {world} GPUs, {len(gpus)} visible ({c.label})")
    if jobs != "auto":
        return int(jobs)
    if cuda:
        return max(1, len(gpus))
    return max(1, cores() // 4)


@dataclass
class Pool:
    """The cells of one local sweep: those waiting, those running (with the GPUs each holds), the records so far."""

    pending: list[Planned]
    k: int  # cells at once
    gpus: list[str]
    worker: Callable[[dict], dict]
    display: Display
    free: list[str] = field(default_factory=list)
    running: list[tuple[Cell, list[str]]] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    shown: float = field(default_factory=time.monotonic)

    def start_next(self) -> None:
        """Start waiting cells while there is room: a free slot, and for a CUDA cell world_size free GPUs."""
        while self.pending and len(self.running) < self.k:
            item = self.pending[0]
            run = item.config["run"]
            held: list[str] = []
            threads = 0
            if is_cuda(item.config, self.gpus):
                need = int(run.get("world_size", 1))
                if len(self.free) < need:
                    return
                held, self.free = self.free[:need], self.free[need:]
            elif self.k > 1 and not run.get("num_threads"):
                threads = max(1, cores() // self.k)
            self.pending.pop(0)
            cell = Cell(
                item.config, run["results_dir"], run["timeout_s"], threads, held or None, item.label, self.worker
            )
            holder = cell.lock()
            if holder is not None:
                self.free.extend(held)
                self.display.skipped(item.label, f"running elsewhere (pid {holder.get('pid')} on {holder.get('host')})")
                continue
            if not run["force"] and recorded_ok(run["results_dir"], cell.chash):  # recorded since the sweep looked
                cell.cleanup()
                self.free.extend(held)
                self.display.skipped(item.label, "ok record exists (written since this sweep started)")
                continue
            # a signal between the fork request and the handle being stored would orphan the cell: hold it
            signal.pthread_sigmask(signal.SIG_BLOCK, _CANCEL_SIGNALS)
            try:
                cell.start()
            except BaseException:
                cell.cancel()
                raise
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _CANCEL_SIGNALS)
            self.running.append((cell, held))
            where = f"GPU {','.join(held)}" if held else (f"{threads} threads" if threads else "")
            self.display.started(item.label, where)

    def wait(self) -> None:
        """Until a forked cell ends (or half a second); exec'd cells are polled."""
        sentinels = [c.sentinel for c, _ in self.running if c.sentinel is not None]
        if sentinels and len(sentinels) == len(self.running):
            wait(sentinels, timeout=0.5)
        else:
            time.sleep(0.2)

    def show_progress(self) -> None:
        """Cells that run for minutes say how far they are, every LONG_CELL_S seconds."""
        if time.monotonic() - self.shown <= LONG_CELL_S:
            return
        self.shown = time.monotonic()
        for cell, _ in self.running:
            if time.monotonic() - cell.started > LONG_CELL_S and (p := cell.progress()):
                self.display.line(f"  ...    {cell.label}: step {p[0]}/{p[1]}, ~{p[2]:.0f} s left")

    def collect(self) -> None:
        """Records of the cells that ended (or passed their timeout); their GPUs are free again."""
        for entry in list(self.running):
            cell, held = entry
            if cell.poll():
                self.running.remove(entry)
                self.free.extend(held)
                wall = time.monotonic() - cell.started
                if cell.returncode() == -signal.SIGTERM:  # cancelled from outside (scancel signals every process)
                    cell.cancel()  # a cancelled run has no result: no record, as for the sweep's own cancel
                    why = "cancelled: the cell's process got SIGTERM; no record"
                    self.display.finished(cell.label, {"status": "cancelled"}, why, wall)
                    continue
                record = cell.finish()
                self.records.append(record)
                self.display.finished(cell.label, record, summary_line(record), wall)

    def cancel(self) -> None:
        for cell, _ in self.running:
            cell.cancel()
        if self.running:
            try:  # after a SIGHUP the terminal may be gone
                self.display.line(
                    f"membench: killed {len(self.running)} running cell(s); no record is written for them"
                )
            except OSError:
                pass


def run_local(cells: list[Planned], jobs: str, display: Display, worker: Callable[[dict], dict]) -> list[dict]:
    """Run the cells, each `worker(config)` in its own child, as many at once as run.jobs and the machine allow;
    SIGTERM cancels the sweep (Cancelled). Returns the records in the order the cells ended."""
    gpus = visible_gpus()
    pool = Pool(list(cells), parallelism(jobs, cells, gpus), gpus, worker, display, free=list(gpus))

    def on_term(signum, frame):
        raise Cancelled()

    def on_hup(signum, frame):  # the terminal closed: cancel as for SIGTERM, exit 129 (128 + SIGHUP)
        raise SystemExit(128 + signal.SIGHUP)

    old = signal.signal(signal.SIGTERM, on_term)
    old_hup = signal.getsignal(signal.SIGHUP)
    if old_hup is not signal.SIG_IGN:  # under nohup the sweep is meant to outlive its terminal
        signal.signal(signal.SIGHUP, on_hup)
    try:
        while pool.pending or pool.running:
            pool.start_next()
            pool.wait()
            pool.show_progress()
            pool.collect()
    except BaseException:
        pool.cancel()
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGHUP, old_hup)
    return pool.records
