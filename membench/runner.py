"""The parent side of one cell: a child process with a timeout, a lock, and records for runs the child could not finish.

Plain Hydra multirun would reuse one process and leak peak-memory statistics between jobs (Hydra issues #2631,
#2187), so every cell runs in a fresh process. CPU cells are forked from a multiprocessing forkserver that imported
torch and the harness once per sweep (about 5 s of imports on a small CPU machine; a fork costs milliseconds and the
server itself never runs a step, so each cell still starts from a clean state). CUDA cells start a fresh interpreter
instead: the driver must not be initialised before a fork, and CUDA_VISIBLE_DEVICES is read when it is.

Lifetime: the child starts its own session (the parent kills the whole group: ranks of a multi-rank cell included)
and dies with the process that started it, its owner, however that ends (membench/child.py: PR_SET_PDEATHSIG, a
pidfd watch of the owner, and a check before the record is written). A lock file per cell
(RESULTS_DIR/locks/HASH.lock) names its holder: the owner (pid, start time, host), the run, and once started the
cell's own process (pid, start time). A lock whose owner runs is live and the cell is not started again; one whose
owner is gone on this host is stale: a cell of it still running is killed first (it can no longer record: its
owner is gone), then the lock is taken over and the records are read again, so a cell that recorded ok as its
sweep died is not run twice. Written here rather than with a lock library because the check the sweep needs (is
the holder alive, which process, on which host) is the payload of the lock, not the locking.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from membench import gpuinfo, mlflow_log
from membench.cell_progress import read_progress
from membench.child import forked_main, identity, is_alive, worker_path
from membench.records import config_hash, environment, new_run_id, runs_dir, skeleton, write_record

ROOT = Path(__file__).resolve().parent.parent
_FORKSERVER: multiprocessing.context.BaseContext | None = None


def forkserver(preload: Sequence[str] = ()) -> multiprocessing.context.BaseContext:
    """The sweep's forkserver context, preloading the child side and the worker's modules (set on first use, once
    per process)."""
    global _FORKSERVER
    if _FORKSERVER is None:
        _owned_mp_temp_dir()
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["membench.child", *preload])
        _FORKSERVER = ctx
    return _FORKSERVER


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def _owned_mp_temp_dir() -> None:
    """Put multiprocessing's temp folder (pymp-*: the forkserver's socket), which only this process's exit handlers
    remove, inside TMPDIR/membench-PID-START-mp: after a SIGKILL of the sweep it is then found and removed like the
    cells' folders (remove_orphan_temp_dirs); after a normal exit the folder, emptied by multiprocessing, is
    removed just after (a finalizer of lower priority than multiprocessing's -100). A no-op where multiprocessing
    already made its folder."""
    me = identity()
    if me["start"] is None:  # no /proc: the folder could not be matched to its owner later
        return
    owned = Path(tempfile.gettempdir()) / f"membench-{me['pid']}-{me['start']}-mp"
    owned.mkdir(exist_ok=True)
    saved, tempfile.tempdir = tempfile.tempdir, str(owned)
    try:
        made = multiprocessing.util.get_temp_dir()
    finally:
        tempfile.tempdir = saved
    if Path(made).parent != owned:
        _rmdir(str(owned))
        return
    multiprocessing.util.Finalize(None, _rmdir, args=(str(owned),), exitpriority=-101)


def warm_up(preload: Sequence[str]) -> None:
    """Start the forkserver now, importing `preload` (the worker's modules) while the parent plans the cells;
    a no-op if already running."""
    forkserver(preload)
    multiprocessing.forkserver.ensure_running()


# ----------------------------------------------------------------------------------------------------- locks


def locks_dir(results_dir: str | Path) -> Path:
    return Path(results_dir) / "locks"


REAP_WAIT_S = 2.0  # how long a re-run lets an orphaned cell end by itself (its owner watch) before killing it


def read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def lock_is_live(holder: dict | None) -> bool:
    """A lock held on this host is live while its owner runs (the same pid and start time: a recycled pid is not
    the owner); one from another host counts as live (its pid cannot be checked from here) until it is older than
    its cell's timeout plus a minute."""
    if holder is None:
        return False
    if holder.get("host") == socket.gethostname():
        return is_alive(int(holder["pid"]), holder.get("start"))
    return time.time() - float(holder.get("started", 0)) < float(holder.get("timeout_s", 0)) + 60


def reap(holder: dict | None, wait_s: float = REAP_WAIT_S) -> bool:
    """End the cell process of a stale lock if it still runs on this host: let it end by itself for up to wait_s
    (it watches its owner), then SIGKILL its process group; return once it is gone. True if there was one."""
    cell = (holder or {}).get("cell") or {}
    if not cell or cell.get("host") != socket.gethostname():
        return False
    pid, start = int(cell["pid"]), cell.get("start")
    if not is_alive(pid, start):
        return False
    deadline = time.monotonic() + wait_s
    while is_alive(pid, start) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_alive(pid, start):
        for kill in (os.killpg, os.kill):  # its group (a cell leads its own session), then the pid itself
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 10.0
        while is_alive(pid, start) and time.monotonic() < deadline:
            time.sleep(0.02)
    return True


@contextmanager
def _takeover_guard(d: Path):
    """An exclusive flock on RESULTS_DIR/locks/.takeover for the few steps that judge a stale lock and replace it:
    of two re-runs that read the same stale lock at the same moment only one replaces it, the other then finds the
    winner's lock (live) and skips the cell. A flock (not the lock file itself) because a lock file is renamed away
    during the take-over; the guard file is never removed, so every process locks the same inode. The kernel drops
    the flock when its holder dies, so a killed sweep never leaves it held."""
    fd = os.open(d / ".takeover", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def try_lock(
    results_dir: str | Path, chash: str, timeout_s: float, label: str = "", run_id: str | None = None
) -> tuple[Path | None, dict | None]:
    """(lock path, None) when this process now holds the cell's lock; (None, holder) when a live holder has it.
    A stale lock's cell, if it still runs, is killed before the lock is taken over (`reap`); the take-over itself
    (the lock is still the stale one read, it is moved aside, ours linked in its place) runs under
    `_takeover_guard`, so two re-runs never both take over the same stale lock."""
    d = locks_dir(results_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{chash}.lock"
    me = {**identity(), "started": time.time(), "timeout_s": timeout_s, "label": label, "run_id": run_id}
    tmp = d / f".new-{chash}-{os.getpid()}-{time.time_ns()}"
    tmp.write_text(json.dumps(me))
    os.chmod(tmp, 0o644)
    try:
        for _ in range(5):
            try:  # a hard link creates the lock with its content or fails: no reader ever sees it half written
                os.link(tmp, path)
                return path, None
            except FileExistsError:
                pass
            holder = read_lock(path)
            if lock_is_live(holder):
                return None, holder
            reap(holder)  # outside the guard: it may wait seconds, and killing a dead sweep's cell twice is harmless
            with _takeover_guard(d):
                if read_lock(path) != holder:  # replaced (or removed) since it was read: judge it again
                    continue
                try:  # the stale lock read above, moved aside (release_lock removes it)
                    os.rename(path, d / f".stale-{chash}-{os.getpid()}-{time.time_ns()}")
                except FileNotFoundError:
                    pass
                try:
                    os.link(tmp, path)
                    return path, None
                except FileExistsError:  # a sweep outside the guard linked a fresh lock in between: judge it
                    continue
    finally:
        tmp.unlink(missing_ok=True)
    holder = read_lock(path)
    return None, holder


def name_cell_in_lock(path: Path | None, pid: int) -> None:
    """Add the started cell's process (pid, start time, host) to the lock this process holds (atomic rewrite)."""
    if path is None or (holder := read_lock(path)) is None or holder.get("pid") != os.getpid():
        return
    holder["cell"] = identity(pid)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(holder))
    os.replace(tmp, path)


def recorded_ok(results_dir: str | Path, chash: str) -> bool:
    """Whether the cell has an ok record (its run ids end with the hash's first 10 characters: only those are read)."""
    for p in runs_dir(results_dir).glob(f"*-{chash[:10]}.json"):
        try:
            r = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if r.get("config_hash") == chash and r.get("status") == "ok":
            return True
    return False


def clear_stale_lock(results_dir: str | Path, chash: str) -> None:
    """Remove the cell's lock if its holder is dead (a killed sweep's lock on a cell that had already finished);
    under the take-over guard, so a lock another re-run has just taken over is never removed."""
    path = locks_dir(results_dir) / f"{chash}.lock"
    if path.exists() and not lock_is_live(holder := read_lock(path)):
        reap(holder)
        with _takeover_guard(path.parent):
            if read_lock(path) == holder:
                path.unlink(missing_ok=True)


def release_lock(path: Path | None) -> None:
    """Remove the lock this process holds (not one another process took over meanwhile) and its stale copies."""
    if path is None:
        return
    holder = read_lock(path)
    if holder is None or (holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()):
        path.unlink(missing_ok=True)
    for stale in path.parent.glob(f".stale-{path.stem}-*"):
        stale.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- temp folders

_TEMP_NAME = re.compile(r"membench-(\d+)-(\d+)-")
_ORPHANS_REMOVED: list[bool] = []  # once per process


def remove_orphan_temp_dirs(tmp_root: str | Path | None = None, force: bool = False) -> list[Path]:
    """Remove the cells' temp folders (TMPDIR/membench-PID-START-*: spec, log, progress) whose owner, the process
    named in the folder's name, no longer runs: what a sweep killed with SIGKILL leaves when its cell could not
    remove its own (membench/child.py `_die`). Once per process unless `force`; returns the folders removed."""
    if _ORPHANS_REMOVED and not force:
        return []
    _ORPHANS_REMOVED.append(True)
    removed = []
    try:
        entries = list(Path(tmp_root or tempfile.gettempdir()).iterdir())
    except OSError:
        return removed
    for p in entries:
        if not p.name.startswith("membench-") or not p.is_dir() or p.is_symlink():
            continue
        if m := _TEMP_NAME.match(p.name):
            owner = {"pid": int(m[1]), "start": int(m[2]), "host": socket.gethostname()}
        else:  # a folder named before its owner was (membench-XXXXXXXX): its spec names the owner
            try:
                owner = json.loads((p / "spec.json").read_text()).get("owner") or {}
            except (OSError, ValueError, AttributeError):
                continue
        if owner.get("host") != socket.gethostname() or owner.get("start") is None:
            continue
        if not is_alive(int(owner["pid"]), int(owner["start"])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------------- a cell


@dataclass
class Cell:
    """One running cell: start() launches the child, poll() says whether it ended, finish() returns its record."""

    config: dict
    results_dir: str
    timeout_s: float
    threads: int = 0  # torch threads for this cell (CPU share); 0 keeps torch's default
    devices: list[str] | None = None  # CUDA_VISIBLE_DEVICES for this cell (CUDA cells)
    label: str = ""
    # what the child runs: a module-level function from the cell's config to the record's measured sections
    # (membench/sweep.py passes membench.execute.execute); the launchers never name it
    worker: Callable[[dict], dict] | None = None
    # auto: fork CPU cells from the forkserver; exec: always a fresh interpreter (MEMBENCH_START_METHOD=exec sets
    # it for a whole sweep: an escape hatch should a library misbehave after fork, and the baseline of start-up cost)
    start_method: str = field(default_factory=lambda: os.environ.get("MEMBENCH_START_METHOD", "auto"))
    chash: str = field(init=False)
    run_id: str = field(init=False)
    started: float = 0.0
    _tmp: tempfile.TemporaryDirectory | None = None
    _proc: object = None
    _lock: Path | None = None
    _status: str | None = None
    _error: str | None = None

    def __post_init__(self) -> None:
        self.chash = config_hash(self.config)
        self.run_id = new_run_id(self.chash)

    # the fork path needs a CPU cell; CUDA cells and multi-rank cells exec a fresh interpreter
    @property
    def forked(self) -> bool:
        single = int(self.config["run"].get("world_size", 1)) == 1
        return self.start_method == "auto" and not self.devices and single

    def lock(self) -> dict | None:
        """Take the cell's lock; return the live holder's lock data instead when another process runs it."""
        self._lock, holder = try_lock(self.results_dir, self.chash, self.timeout_s, self.label, self.run_id)
        return holder

    def start(self) -> None:
        """Start the child: forked from the sweep's forkserver, or a fresh interpreter (CUDA, multi-rank, exec)."""
        self.started = time.monotonic()
        visible = ",".join(self.devices) if self.devices is not None else None
        busy = gpuinfo.wait_until_free(self.config["run"], visible=visible)  # another process on its GPUs
        if busy:  # an error record, and no child (run.gpu_busy=fail, or wait timed out)
            self._status, self._error = "error", busy
            return
        remove_orphan_temp_dirs()
        # the folder's name carries its owner (this process: pid and start time), so that once the owner is dead a
        # later sweep on this host removes what a killed sweep left (remove_orphan_temp_dirs)
        me = identity()
        self._tmp = tempfile.TemporaryDirectory(prefix=f"membench-{me['pid']}-{me['start']}-")
        tmp = Path(self._tmp.name)
        spec = self._write_spec(tmp / "spec.json")
        self.log = tmp / "child.log"
        self.progress_file = tmp / "progress.json"
        env = {
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "MEMBENCH_PROGRESS_FILE": str(self.progress_file),
        }
        if self.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.devices)
        if self.forked:
            p = forkserver([self.worker.__module__]).Process(
                target=forked_main, args=(str(spec), str(self.log), env), daemon=False
            )
            p.start()
            self._proc = p
        else:
            self._proc = self._exec(spec, env)
        name_cell_in_lock(self._lock, self._proc.pid)

    def _write_spec(self, path: Path) -> Path:
        """The spec the child runs (membench/child.py): the config, the record's identity, the worker's name."""
        spec = {
            "config": self.config,
            "run_id": self.run_id,
            "config_hash": self.chash,
            "worker": worker_path(self.worker),
            # absolute: a forked child works in the forkserver's directory, not the sweep's current one
            "results_dir": str(Path(self.results_dir).resolve()),
            "launch": {"threads": self.threads, "cuda_visible_devices": self.devices},
            # the cell dies with this process and records only while it runs and the lock names the run (child.py)
            "owner": identity(),
            "lock": str(self._lock.resolve()) if self._lock is not None else None,
            "tmp_dir": str(path.parent),  # the cell removes it when it kills itself (its owner gone)
        }
        path.write_text(json.dumps(spec))
        return path

    def _exec(self, spec: Path, env: dict[str, str]) -> subprocess.Popen:
        argv = [sys.executable, "-m", "membench.child", str(spec)]
        world = int(self.config["run"].get("world_size", 1))
        if world > 1:  # a launcher starts the N ranks in the child's process group (membench/distributed.py)
            argv = [sys.executable, "-m", "membench.distributed", str(world), *argv]
        with open(self.log, "w") as logf:
            return subprocess.Popen(
                argv, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ, **env)
            )

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def sentinel(self):
        """A waitable handle (multiprocessing.connection.wait) for the fork path; None for a Popen child."""
        return getattr(self._proc, "sentinel", None)

    def progress(self) -> tuple[int, int, float] | None:
        """(step, total steps, seconds left at the pace so far) as the child last reported it (cell_progress)."""
        return read_progress(getattr(self, "progress_file", None), time.monotonic() - self.started)

    def returncode(self) -> int | None:
        if self._proc is None:  # never started (device busy)
            return None
        if isinstance(self._proc, subprocess.Popen):
            return self._proc.poll()
        return self._proc.exitcode

    def poll(self) -> bool:
        """True once the child has ended (killing it first when past its timeout)."""
        if self._proc is None or self.returncode() is not None:
            return True
        if time.monotonic() - self.started > self.timeout_s:
            self.kill()
            self._status, self._error = "timeout", f"no result within run.timeout_s={self.timeout_s}"
            return True
        return False

    def kill(self) -> None:
        """SIGKILL the cell's whole process group (it is the leader of its own session) and reap the child."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.returncode() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)  # forked before its setsid(): not yet a group leader
            except ProcessLookupError:
                pass
        if isinstance(self._proc, subprocess.Popen):
            self._proc.wait()
        else:
            self._proc.join()

    def cancel(self) -> None:
        """Kill the child and leave no record: a cancelled run has no result."""
        if self._proc is not None:
            self.kill()
        self.cleanup()

    def cleanup(self) -> None:
        release_lock(self._lock)
        self._lock = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def run_to_end(self, poll_s: float) -> dict:
        """Start the child and wait for its record (blocking); an interrupt cancels the cell, leaving no record."""
        self.start()
        try:
            while not self.poll():
                time.sleep(poll_s)
        except BaseException:
            self.cancel()
            raise
        return self.finish()

    def finish(self) -> dict:
        """The child's record, or one written here for a child that ended without writing it."""
        rc = self.returncode()
        log = getattr(self, "log", None)
        tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
        wall = time.monotonic() - self.started
        self.cleanup()
        path = runs_dir(self.results_dir) / f"{self.run_id}.json"
        if self._status is None and path.exists():
            record = json.loads(path.read_text())
            mlflow_log.log_if_configured(record)  # after the record is on disk (run.mlflow_uri)
            return record
        status, error = self._status, self._error
        if status is None:
            if rc == -signal.SIGKILL:
                status, error = "oom", "child killed by SIGKILL (kernel OOM killer?) before writing its record"
            else:
                status, error = "error", f"child exited with code {rc} before writing its record"
        record = skeleton(self.run_id, self.chash, self.config, status)
        record["error"] = error
        record["child_output_tail"] = tail
        record["env"] = environment()
        record["wall_s"] = wall
        write_record(self.results_dir, record)
        mlflow_log.log_if_configured(record)
        return record


def run_cell(
    config: dict,
    results_dir: str,
    timeout_s: float,
    threads: int = 0,
    devices: list[str] | None = None,
    worker: Callable[[dict], dict] | None = None,
) -> dict:
    """Run one cell to its end in a child process and return its record (blocking; no lock)."""
    cell = Cell(config, str(results_dir), timeout_s, threads=threads, devices=devices, worker=worker)
    return cell.run_to_end(0.05)
