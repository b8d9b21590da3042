"""`membench run`: plan every cell, skip those already recorded ok, and hand the rest to a launcher.

This module chooses what a cell runs (the worker, membench.execute.execute) and passes it to the launchers
(membench/launch/local.py, slurm.py) and the runner, which never name it. Exit codes as the CLI documents them:
0 every cell ok (or already recorded ok), 1 some cell oom, error or timeout, 143 cells cancelled in Slurm.
"""

from __future__ import annotations

import json
from pathlib import Path

from membench.cells import plan_cells
from membench.errors import ConfigError
from membench.execute import execute
from membench.launch import Planned, Sweep, split_sweep, update_sweep_file, write_sweep_file
from membench.launch.local import parallelism, run_local, visible_gpus
from membench.launch.progress import Display
from membench.launch.slurm import run_slurm
from membench.records import ok_hashes
from membench.runner import Cell, clear_stale_lock

WORKER = execute  # what each cell's child runs: config dict -> the record's measured sections


def run_cell(
    config: dict, results_dir: str, timeout_s: float, threads: int = 0, devices: list[str] | None = None
) -> dict:
    """Run one cell to its end in a child process and return its record (blocking; no lock)."""
    cell = Cell(config, str(results_dir), timeout_s, threads=threads, devices=devices, worker=WORKER)
    return cell.run_to_end(0.05)


def rerun_cell(record: dict, results_dir: str) -> dict:
    """The record's cell again, same config, a fresh record into results_dir (compare --confirm)."""
    cfg = json.loads(json.dumps(record["config"]))
    cfg["run"]["results_dir"] = str(results_dir)
    threads = (record.get("env") or {}).get("torch_threads") or 0
    return run_cell(cfg, str(results_dir), cfg["run"]["timeout_s"], threads=threads)


def to_run(cells: list[Planned], display: Display) -> list[Planned]:
    """The cells without an ok record in their results folder (run.force=true re-runs those too)."""
    done = {d: ok_hashes(d) for d in {c.config["run"]["results_dir"] for c in cells}}  # each results dir read once
    todo = []
    for c in cells:
        run = c.config["run"]
        if not run["force"] and c.chash in done[run["results_dir"]]:
            display.skipped(c.label, "ok record exists; run.force=true re-runs")
            clear_stale_lock(run["results_dir"], c.chash)
        else:
            todo.append(c)
    return todo


def launch(todo: list[Planned], sweep: Sweep, sweep_file: Path, display: Display) -> None:
    if sweep.launcher == "slurm":
        folder = Path(sweep.slurm.get("folder") or sweep_file.parent.parent / "slurm" / sweep_file.stem)
        display.jobs = len(todo)

        try:
            run_slurm(
                todo, sweep.slurm, folder, display, WORKER, lambda fields: update_sweep_file(sweep_file, **fields)
            )
        except ConfigError:  # the cluster refused the array: nothing was submitted, so no sweep either
            sweep_file.unlink()
            for d in (sweep_file.parent, folder.parent):
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
            raise
    else:
        display.jobs = parallelism(sweep.jobs, todo, visible_gpus())
        run_local(todo, sweep.jobs, display, WORKER)


def run(overrides: list[str], multirun: bool, argv: list[str]) -> int:
    """Plan, skip, record the sweep (RESULTS_DIR/sweeps/), launch; 1 if some cell failed."""
    sweep = split_sweep(plan_cells(overrides, multirun))
    # a cell listed twice for the same folder runs once; the same cell into two folders runs in each
    cells = list({(c.config["run"]["results_dir"], c.chash): c for c in sweep.cells}.values())
    print(f"membench: {len(cells)} run(s) planned (launcher={sweep.launcher}, jobs={sweep.jobs})", flush=True)
    display = Display(len(cells), 1)
    todo = to_run(cells, display)
    results_dir = cells[0].config["run"]["results_dir"] if cells else "."
    sweep_file = write_sweep_file(results_dir, sweep, argv)
    try:
        if todo:
            launch(todo, sweep, sweep_file, display)
    finally:
        display.close()
    print("membench: done: " + ", ".join(f"{n} {s}" for s, n in sorted(display.statuses.items())), flush=True)
    if display.statuses.get("cancelled"):
        return 143  # cells cancelled in Slurm (scancel): like a SIGTERM of the sweep
    return 1 if display.failed else 0
