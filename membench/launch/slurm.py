"""Cells on a Slurm cluster through submitit (the library Hydra's own submitit launcher builds on).

`run.launcher=slurm slurm.partition=gpu slurm.gpus_per_node=1` submits one job array: one task per cell, at most
slurm.array_parallelism at once. Each task runs its cell like the local pool does (a child process with a timeout,
the lock next to the records, an atomic record in the shared results_dir). The submitting process follows the
jobs and can be left (Ctrl-C detaches, the jobs go on); `membench status RESULTS_DIR --wait` re-attaches.
`slurm.cluster=local` runs the same submitit path with its local executor (tests, a machine without Slurm).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from membench.config import SlurmConfig
from membench.launch import Planned
from membench.launch.progress import Display
from membench.report import summary_line
from membench.runner import Cell


def run_task(config: dict, label: str, worker: Callable[[dict], dict]) -> dict:
    """One array task: run the cell here (a fresh interpreter per cell; no forkserver for a single cell)."""
    run = config["run"]
    cell = Cell(config, run["results_dir"], run["timeout_s"], label=label, worker=worker, start_method="exec")
    holder = cell.lock()
    if holder is not None:
        return {"status": "skipped", "error": f"running elsewhere (pid {holder.get('pid')} on {holder.get('host')})"}
    return cell.run_to_end(0.5)


def executor(slurm: dict, cells: list[Planned], folder: Path):
    import submitit

    s = SlurmConfig(**slurm)
    ex = submitit.AutoExecutor(folder=folder, cluster=s.cluster)
    worlds = [int(c.config["run"].get("world_size", 1)) for c in cells if c.config["run"].get("device") != "cpu"]
    gpus = s.gpus_per_node if s.gpus_per_node is not None else (max(worlds) if worlds and ex.cluster == "slurm" else 0)
    longest = max(float(c.config["run"]["timeout_s"]) for c in cells)
    ex.update_parameters(
        name="membench",
        timeout_min=max(s.time_min, int(longest // 60) + 2),
        gpus_per_node=gpus,
        cpus_per_task=s.cpus_per_task,
        mem_gb=s.mem_gb,
        slurm_partition=s.partition,
        slurm_account=s.account,
        slurm_array_parallelism=s.array_parallelism,
    )
    return ex


def run_slurm(
    cells: list[Planned],
    slurm: dict,
    folder: Path,
    display: Display,
    worker: Callable[[dict], dict],
    on_submit=None,
) -> list[dict]:
    """Submit one array task per cell (each runs `worker(config)` in its own child) and follow them to the end."""
    ex = executor(slurm, cells, folder)
    jobs = ex.map_array(run_task, [c.config for c in cells], [c.label for c in cells], [worker] * len(cells))
    if on_submit is not None:
        on_submit([j.job_id for j in jobs], str(folder))
    for c, j in zip(cells, jobs, strict=True):
        display.started(c.label, f"job {j.job_id}")
    records: list[dict] = []
    left = list(zip(cells, jobs, strict=True))
    t0 = time.monotonic()
    try:
        _follow(left, display, records, t0)
    except KeyboardInterrupt:
        ids = ", ".join(j.job_id for _, j in left[:3]) + (" ..." if len(left) > 3 else "")
        display.line(
            f"membench: detached; {len(left)} job(s) go on ({ids}); `membench status RESULTS_DIR --wait` "
            "re-attaches, `scancel JOB_ID` cancels"
        )
        raise
    return records


def _follow(left: list, display: Display, records: list[dict], t0: float) -> None:
    while left:
        for entry in list(left):
            c, j = entry
            if not j.done():
                continue
            left.remove(entry)
            try:
                rec = j.result()
            except Exception as e:  # noqa: BLE001 - a task that died outside its cell (node failure, submitit)
                display.finished(c.label, None, f"error: job {j.job_id}: {str(e).strip().splitlines()[-1][:200]}")
                continue
            if rec.get("status") == "skipped":
                display.skipped(c.label, rec["error"])
                continue
            records.append(rec)
            display.finished(c.label, rec, summary_line(rec), time.monotonic() - t0)
        time.sleep(0.5 if left else 0)
