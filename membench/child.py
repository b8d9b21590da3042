"""Entry point of the child process that executes one run and writes its record.

`python -m membench.child SPEC.json` (CUDA cells, ranks of a multi-rank cell), or `forked_main` in a process forked
from the sweep's forkserver (CPU cells, membench/runner.py). The spec names the worker (`module:function`, a
function from the cell's config to the record's measured sections; the sweep passes membench.execute.execute), so
this module knows how a cell's process lives and records, not what it runs. Whatever happens inside the run, the
child writes a record with a status; if it dies before that (segfault, SIGKILL), the parent writes one instead.

Either way the child asks the kernel to SIGKILL it when its parent dies (prctl PR_SET_PDEATHSIG, through ctypes:
the standard library has no binding), so a killed sweep leaves no cell holding a device or writing a late record.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable

from membench.errors import MemoryBudgetExceeded
from membench.records import environment, skeleton, write_record
from membench.sections import OomMemory

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def die_with_parent() -> None:
    """SIGKILL this process when its parent exits (Linux); exit at once if the parent is already gone."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # not Linux: the parent's process-group kill is the only guard left
        return
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != parent or parent == 1:  # the parent died before the request took effect
        os._exit(1)


def worker_path(worker: Callable[[dict], dict]) -> str:
    """`module:function`, the name a spec gives its worker (a module-level function, importable in the child)."""
    return f"{worker.__module__}:{worker.__qualname__}"


def load_worker(path: str) -> Callable[[dict], dict]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, (MemoryBudgetExceeded, MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


def _apply_launch(launch: dict) -> None:
    """The scheduler's share of the machine: torch threads for a CPU cell (before any parallel region runs)."""
    if launch.get("threads"):
        import torch

        torch.set_num_threads(int(launch["threads"]))


def _oom_memory(e: BaseException, run: dict) -> dict:
    """What an oom run reached: the budget's own check carries its figure; a CUDA OOM has the allocator's peak."""
    import torch

    out = OomMemory(budget_mib=run.get("memory_budget_mib"))
    if isinstance(e, MemoryBudgetExceeded):
        out.peak_bytes, out.peak_source = e.peak_bytes, e.source
    elif isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
        out.peak_bytes, out.peak_source = torch.cuda.max_memory_allocated(), "cuda allocator at the OOM"
    return out.to_dict()


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    record = skeleton(spec["run_id"], spec["config_hash"], spec["config"], "error")
    launch = spec.get("launch") or {}
    t0 = time.perf_counter()
    try:
        _apply_launch(launch)
        out = load_worker(spec["worker"])(spec["config"])
        record.update(out)
        record["status"] = "ok"
    except BaseException as e:  # noqa: BLE001 - every failure is a recorded result, not a crash
        record["status"] = "oom" if _is_oom(e) else "error"
        record["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if record["status"] == "oom":  # the figures, not only inside the message
            record["memory"] = _oom_memory(e, spec["config"]["run"])
        record["error_traceback"] = traceback.format_exc(limit=8)[-4000:]
    if int(os.environ.get("RANK", 0)) != 0:  # multi-rank: rank 0 writes the one record (with every rank's data)
        if record["status"] != "ok":
            print(record["error_traceback"], file=sys.stderr, flush=True)
        return 0 if record["status"] == "ok" else 1
    record["env"] = environment(record.get("timing", {}) and record["timing"].get("device"))
    record["launch"] = {**launch, "start": spec.get("start", "exec")}
    record["wall_s"] = time.perf_counter() - t0
    write_record(spec["results_dir"], record)
    # a failed rank 0 exits non-zero so the launcher stops peers that may wait in a collective
    return 0 if record["status"] == "ok" or int(os.environ.get("WORLD_SIZE", 1)) == 1 else 1


def forked_main(spec_path: str, log_path: str, env: dict[str, str]) -> None:
    """Body of a cell forked from the sweep's forkserver: own session, dies with its parent, output to the log."""
    os.setsid()
    die_with_parent()
    try:  # `ps -o comm`/top show the cell, not the forkserver's command line it was forked from
        ctypes.CDLL(None).prctl(_PR_SET_NAME, b"membench-cell", 0, 0, 0)
    except OSError:
        pass
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError:  # the sweep was cancelled while this cell started: its folder is gone, nothing to run
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(env)
    with open(spec_path) as f:
        spec = json.load(f)
    spec["start"] = "fork"
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    rc = main(spec_path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # skip the forkserver's inherited exit handlers


if __name__ == "__main__":
    die_with_parent()
    sys.exit(main(sys.argv[1]))
