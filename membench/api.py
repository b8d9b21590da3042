"""membench from Python (a script or a notebook): compose cells, run a cell or a sweep, plan, load records.

    from membench import api
    api.configs(["workload=gpt_tiny", "technique=[bf16]"])          # validated config dicts; nothing runs
    rec = api.run_cell(["workload=gpt_tiny", "run.results_dir=/tmp/mb"])   # one cell, its record (a dict)
    recs = api.run(["run.seed=0,1", "run.results_dir=/tmp/mb"], multirun=True)   # a sweep: the latest record per cell
    result = api.plan(["workload=gpt_tiny", "run.memory_budget_mib=8", "run.device=cpu"])
    api.load("results/checkpointing", experiment="checkpointing")   # records of a folder, latest per cell

Overrides are the CLI's (Hydra's grammar). Bad input raises membench.errors.ConfigError (one line: the key and what
is allowed) before anything runs; a cell that fails is a record with status oom/error/timeout, not an exception.

No `if __name__ == "__main__":` guard is needed. Why one would be: every cell runs in its own process, and CPU cells
are forked from a multiprocessing forkserver, whose children re-import the caller's main module (as `__mp_main__`,
multiprocessing's "spawn"/"forkserver" rule); a script that calls membench at its top level would call it again in
each child. So when the main module would be re-imported (a script file, `python -m pkg.mod`), these functions run
each cell as a fresh interpreter instead (MEMBENCH_START_METHOD=exec: about 5 s more per cell, the imports); in a
notebook or the interactive prompt, which multiprocessing does not re-import, cells fork from the forkserver as on
the CLI. Setting MEMBENCH_START_METHOD yourself (auto or exec) overrides this choice.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import membench as _package


def hidden_by(module) -> str | None:
    """What stands in for the membench package under the name `membench` (None when it is the package): a folder
    without __init__.py next to a script or on PYTHONPATH becomes a namespace package, and an editable install's
    finder still serves `membench.api` from the checkout, so the first import to fail would be a name of the
    package's __init__ (membench_entry.py does the same check for the command line)."""
    if hasattr(module, "SCHEMA_VERSION"):
        return None
    where = getattr(module, "__file__", None)
    if where is None:
        folders = list(getattr(module, "__path__", []) or [])
        return f"the folder {folders[0] if folders else '?'} (no __init__.py)"
    return where


if (_hider := hidden_by(_package)) is not None:
    raise ImportError(
        f"membench: {_hider} is imported as `membench` and hides the membench package; rename it, or run from "
        "another folder / take its parent off PYTHONPATH"
    )

from membench.launch import split_sweep  # noqa: E402 - after the check: this import fails when the package is hidden
from membench.records import latest_by_cell, load_records  # noqa: E402

__all__ = ["configs", "run_cell", "run", "plan", "load"]


def main_is_reimported() -> bool:
    """Whether multiprocessing's children would re-import this process's main module: it does for a main module
    with a spec name (`python -m`) or a file (`python script.py`); not for a notebook or the prompt
    (multiprocessing.spawn.get_preparation_data makes the same choice)."""
    main = sys.modules.get("__main__")
    if main is None:
        return False
    if getattr(getattr(main, "__spec__", None), "name", None):
        return True
    return getattr(main, "__file__", None) is not None


@contextmanager
def start_method() -> Iterator[str]:
    """The start method cells get inside this block (the env var the runner and launchers read)."""
    if "MEMBENCH_START_METHOD" in os.environ or not main_is_reimported():
        yield os.environ.get("MEMBENCH_START_METHOD", "auto")
        return
    os.environ["MEMBENCH_START_METHOD"] = "exec"
    try:
        yield "exec"
    finally:
        os.environ.pop("MEMBENCH_START_METHOD", None)


def configs(overrides: list[str], multirun: bool = False) -> list[dict]:
    """Composed, resolved and validated config dicts, one per cell (`multirun`: expand sweeps). Nothing runs."""
    from membench import cells  # torch, hydra

    return cells.configs(list(overrides), multirun)


def run_cell(overrides: list[str]) -> dict:
    """Run one cell now, in its own process, and return its record (written to its run.results_dir too). Runs even
    when an ok record exists (no skip, no lock): for a sweep's resume and locking use run()."""
    from membench import sweep
    from membench.cells import plan_cells

    planned = split_sweep(plan_cells(list(overrides), False)).cells
    if len(planned) != 1:
        raise ValueError(f"run_cell: the overrides make {len(planned)} cells; use run(..., multirun=True)")
    cfg = planned[0].config
    with start_method():
        return sweep.run_cell(cfg, cfg["run"]["results_dir"], cfg["run"]["timeout_s"])


def run(overrides: list[str], multirun: bool = False) -> list[dict]:
    """Run a sweep as `membench run [-m]` does (cells with an ok record skipped, locks, run.jobs, run.launcher) and
    return the latest record of each of its cells, in the sweep's order."""
    from membench import sweep
    from membench.cells import plan_cells

    planned = split_sweep(plan_cells(list(overrides), multirun)).cells
    with start_method():
        sweep.run(list(overrides), multirun, ["run", *(["-m"] if multirun else []), *overrides])
    latest: dict[str, dict[str, dict]] = {}
    out = []
    for c in planned:
        d = c.config["run"]["results_dir"]
        if d not in latest:
            latest[d] = latest_by_cell(load_records(d))
        if c.chash in latest[d]:
            out.append(latest[d][c.chash])
    return out


def plan(overrides: list[str], verify: int = 0) -> dict:
    """`membench plan`: technique combinations ranked by predicted peak against run.memory_budget_mib; `verify`:
    run the top K fitting plans for real (result["verified"]). The CLI's table and JSON: membench.plan.table,
    membench.plan.write_json."""
    import dataclasses

    from membench import plan as pl  # torch
    from membench.cells import check_plan_inputs

    pc, user = pl.split_overrides(list(overrides))
    pc = dataclasses.replace(pc, verify=verify) if verify else pc
    check_plan_inputs(user, pc.out)
    with start_method():
        result = pl.plan(user, pc, progress=lambda m: print(m, file=sys.stderr, flush=True))
        if pc.verify:
            result["verified"] = pl.verify(result, user, pc.verify, progress=lambda m: print(m, file=sys.stderr))
    return result


def load(results_dir: str, experiment: str | None = None, latest: bool = True) -> list[dict]:
    """The records of a results folder (RESULTS_DIR/runs/*.json); `latest`: one per cell, the newest."""
    rs = load_records(results_dir)
    if latest:
        rs = list(latest_by_cell(rs).values())
    return [r for r in rs if experiment is None or r.get("experiment") == experiment]
