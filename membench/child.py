"""Entry point of the child process that executes one run and writes its record.

`python -m membench.child SPEC.json` (CUDA cells, ranks of a multi-rank cell), or `forked_main` in a process forked
from the sweep's forkserver (CPU cells, membench/runner.py). The spec names the worker (`module:function`, a
function from the cell's config to the record's measured sections; the sweep passes membench.execute.execute), so
this module knows how a cell's process lives and records, not what it runs. Whatever happens inside the run, the
child writes a record with a status; if it dies before that (segfault, SIGKILL), the parent writes one instead.

A cell dies with its owner, the process that started it (the sweep, or a Slurm array task), however the owner
ends, SIGKILL included. Three guards, each enough on Linux in the cases it covers:
- the kernel: PR_SET_PDEATHSIG (prctl, through ctypes: the standard library has no binding) SIGKILLs the cell when
  the thread that forked it ends. For an exec'd cell that is the owner itself. A forked cell's parent is the
  forkserver, which exits when every holder of its "alive" pipe has closed it: the owner, and every forked client
  (multiprocessing hands each one the pipe's write end), so a cell closes its copy at once (`forked_main`);
- the owner watch: a thread that waits on a pidfd of the owner (the spec names it by pid and start time, so a
  recycled pid is never taken for it) and SIGKILLs the cell's process group the moment the owner is gone. It does
  not depend on who forked the cell nor on which thread did (PDEATHSIG follows the parent *thread*);
- the record check: just before writing its record the cell checks that its owner is alive and that the cell's lock
  (RESULTS_DIR/locks/HASH.lock) still names this run; otherwise it exits without writing. A record is never written
  for a cell whose sweep has died and whose lock a re-run may have taken over.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import multiprocessing.forkserver
import os
import select
import shutil
import signal
import socket
import sys
import threading
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


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22): with the pid, a name no later
    process can reuse. None when there is no such process (or no /proc)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def is_alive(pid: int, start: int | None = None) -> bool:
    """Whether process `pid` runs (not a zombie), and is the one that started at `start` when that is given."""
    if start is not None:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            return False
        return fields[0] not in ("Z", "X") and int(fields[19]) == int(start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def identity(pid: int | None = None) -> dict:
    """pid, start time and host of a process (this one by default): how specs and locks name an owner or a cell."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start": start_time(pid), "host": socket.gethostname()}


def _die(tmp_dir: str | None = None) -> None:
    """SIGKILL this cell and whatever it started: its process group when it leads one (a cell starts its own
    session), else this process only (a rank, or a child run by hand from a shell). First remove the cell's temp
    folder (spec, log, progress: `tmp_dir`), which its dead owner can no longer clean up (a folder this misses, the
    next sweep on this host removes: membench/runner.py `remove_orphan_temp_dirs`)."""
    sys.stderr.write("membench: the sweep that started this cell is gone; the cell ends without a record\n")
    sys.stderr.flush()
    if tmp_dir:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


class OwnerWatch:
    """The owner (the process that started this cell) as a pidfd: `alive()` asks without blocking, `start()` runs
    a thread that kills the cell (`_die`) when the owner ends. Without pidfd_open (not Linux >= 5.3) it polls the
    owner's pid and start time every POLL_S seconds."""

    POLL_S = 0.2

    def __init__(self, owner: dict, tmp_dir: str | None = None):
        self.pid, self.start_ticks = int(owner["pid"]), owner.get("start")
        self.tmp_dir = tmp_dir  # the cell's temp folder, removed when the cell kills itself
        self.fd: int | None = None
        try:
            self.fd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # no pidfd here, or the owner is already gone (then alive() says so)
            self.fd = None
        self._gone = not is_alive(self.pid, self.start_ticks)  # checked after opening: the fd is the owner's
        if self._gone and self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def alive(self) -> bool:
        if self._gone:
            return False
        if self.fd is not None:
            return not select.select([self.fd], [], [], 0)[0]  # a pidfd is readable once its process has ended
        return is_alive(self.pid, self.start_ticks)

    def _watch(self) -> None:
        if self.fd is not None:
            select.select([self.fd], [], [])
        else:
            while is_alive(self.pid, self.start_ticks):
                time.sleep(self.POLL_S)
        _die(self.tmp_dir)

    def start(self) -> None:
        if self._gone:
            _die(self.tmp_dir)
        threading.Thread(target=self._watch, name="membench-owner-watch", daemon=True).start()


_WATCH: list[OwnerWatch] = []  # this process's watch, once started (a forked cell starts it before main runs)


def watch_owner(spec: dict) -> OwnerWatch | None:
    """Start the owner watch the spec asks for (once per process); None for a spec without an owner (a cell run by
    hand: `python -m membench.child SPEC.json`)."""
    if not _WATCH and spec.get("owner") and spec["owner"].get("host") == socket.gethostname():
        _WATCH.append(OwnerWatch(spec["owner"], spec.get("tmp_dir")))
        _WATCH[0].start()
    return _WATCH[0] if _WATCH else None


def may_record(spec: dict) -> str | None:
    """Why this cell must not write its record now (None: it may): its owner has ended, or its lock no longer names
    this run (a re-run took the cell over). Checked right before the atomic rename of the record."""
    watch = watch_owner(spec)
    if watch is not None and not watch.alive():
        return "the sweep that started this cell is gone"
    lock = spec.get("lock")
    if lock:
        try:
            with open(lock) as f:
                holder = json.load(f)
        except (OSError, ValueError):
            return f"its lock {lock} is gone"
        if holder.get("run_id") != spec["run_id"]:
            return f"its lock {lock} names another run ({holder.get('run_id')})"
    return None


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
    watch_owner(spec)
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
    why_not = may_record(spec)
    if why_not:  # no late record: the sweep is gone, or the cell is no longer its to record
        print(f"membench: no record written: {why_not}", file=sys.stderr, flush=True)
        return 3
    write_record(spec["results_dir"], record)
    # a failed rank 0 exits non-zero so the launcher stops peers that may wait in a collective
    return 0 if record["status"] == "ok" or int(os.environ.get("WORLD_SIZE", 1)) == 1 else 1


def _leave_forkserver() -> None:
    """Close this process's copy of the forkserver's "alive" pipe. multiprocessing hands every forked client the
    write end (so that it could start processes of its own), and the server exits only when all copies are closed:
    a cell holding one would keep the forkserver, its parent, alive after the sweep died, and with it the cell
    (its PDEATHSIG waits on the forkserver). Closed, the sweep's death ends the forkserver, and that ends the cell."""
    server = multiprocessing.forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        server._forkserver_alive_fd = None


def forked_main(spec_path: str, log_path: str, env: dict[str, str]) -> None:
    """Body of a cell forked from the sweep's forkserver: own session, dies with its parent (the forkserver, which
    dies with the sweep) and with its owner (the sweep, watched directly), output to the log."""
    os.setsid()
    die_with_parent()
    _leave_forkserver()
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
    watch_owner(spec)  # before anything slow: a sweep killed while this cell was being forked ends it here
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
