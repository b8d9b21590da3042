"""Cells on a Slurm cluster through submitit (the library Hydra's own submitit launcher builds on).

`run.launcher=slurm slurm.partition=gpu` submits one job array: one task per cell, at most slurm.array_parallelism at
once. Each task runs its cell like the local pool does (a child process with a timeout, the lock next to the records,
an atomic record in the shared results_dir). What the array asks for is resolved against the cluster first: GPUs only
where the partition has them (`sinfo -o %G`), one CPU per rank of a multi-rank cell (its ranks run through the local
torchrun launcher inside the task, see `resources`), a time limit that leaves room for run.timeout_s and the record.
The submitting process follows the tasks through squeue (then sacct, where accounting works) every POLL_S seconds,
not through submitit's watcher (sacct only, at gaps growing to minutes); Ctrl-C detaches (the jobs go on) and
`membench status RESULTS_DIR --wait` re-attaches. The sweep file records each cell's job id, so a re-run never
submits a cell whose task is still queued or running, and `status` resolves every cell from Slurm's state.
`slurm.cluster=local` runs the same submitit path with its local executor (tests, a machine without Slurm).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from membench.config import SlurmConfig
from membench.errors import ConfigError
from membench.launch import Planned, sweeps_dir
from membench.launch.progress import Display
from membench.records import ok_hashes
from membench.report import summary_line
from membench.runner import Cell

JOB_NAME = "membench"  # squeue/sacct look only at jobs of this name (a reset cluster reuses job ids)
POLL_S = 3.0  # squeue/sacct at most this often while following (submitit's own watcher backs off to minutes)
MARGIN_S = 120  # task start (interpreter, imports), the cell's child start-up and its record, beyond run.timeout_s
QUEUED = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED")
RUNNING = ("RUNNING", "CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING")


# ----------------------------------------------------------------------------------------------- the task side


def allocated_cpus() -> int:
    """CPUs this task may use: Slurm's allocation (task/none leaves the affinity mask wide), bounded by the mask."""
    mask = len(os.sched_getaffinity(0))
    given = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_JOB_CPUS_PER_NODE", "").split("(")[0]
    return min(int(given), mask) if given.isdigit() else mask


def run_task(config: dict, label: str, worker: Callable[[dict], dict]) -> dict:
    """One array task: run the cell here (a fresh interpreter; no forkserver for a single cell).

    Slurm's SIGTERM (scancel, or the limit) ends the cell without a record: a cancelled run has no result. Its USR2
    warning is ignored, by the child too (an ignored signal stays ignored across exec): the cell has its own
    timeout and the time limit leaves room for it (`resources`), so neither is a reason to end it early."""
    term: list[int] = []
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # first: submitit's own handler would requeue or end the task
    signal.signal(signal.SIGTERM, lambda *_: term.append(1))
    run = config["run"]
    threads = 0 if run.get("num_threads") else max(1, allocated_cpus() // int(run.get("world_size", 1)))
    cell = Cell(config, run["results_dir"], run["timeout_s"], threads=threads, label=label, worker=worker,
                start_method="exec")  # fmt: skip
    holder = cell.lock()
    if holder is not None:
        return {"status": "skipped", "error": f"running elsewhere (pid {holder.get('pid')} on {holder.get('host')})"}
    if not run.get("force") and cell.chash in ok_hashes(run["results_dir"]):  # another sweep's task ran it meanwhile
        cell.cleanup()
        return {"status": "skipped", "error": "ok record exists (run by another task); run.force=true re-runs"}
    try:
        cell.start()
        signal.signal(signal.SIGUSR2, lambda *_: print("membench: USR2 (time limit near) ignored", flush=True))
        while not cell.poll() and not term:
            time.sleep(0.5)
    except BaseException:
        cell.cancel()
        raise
    if term or cell.returncode() == -signal.SIGTERM:
        cell.cancel()
        return {"status": "cancelled", "error": f"cancelled by Slurm (SIGTERM to job {os.environ.get('SLURM_JOB_ID')})"}
    return cell.finish()


# ------------------------------------------------------------------------------------------ asking the cluster


def _query(cmd: list[str]) -> str | None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None


class SlurmUnreachable(RuntimeError):
    """squeue failed for another reason than an unknown job (the controller is down or unreachable)."""


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm's state of each array task ('123_4'): squeue first (it keeps ended jobs for MinJobAge, accounting or
    not), then sacct for the ones it no longer holds. A task neither knows is left out; SlurmUnreachable when squeue
    cannot answer at all (a task must not count as gone because the controller did not reply)."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    if not arrays:
        return {}
    states: dict[str, str] = {}
    for array in arrays:  # one call per array: squeue fails outright when one of several ids is gone
        try:
            p = subprocess.run(["squeue", "-h", "-r", "--states=all", "-n", JOB_NAME, "-j", array, "-o", "%i|%T"],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SlurmUnreachable(f"squeue: {e}") from None
        if p.returncode != 0 and "Invalid job id" not in p.stderr:
            raise SlurmUnreachable(f"squeue: {p.stderr.strip()[:200]}")
        out = p.stdout if p.returncode == 0 else ""
        for line in out.splitlines():
            jid, _, state = line.strip().partition("|")
            states[jid] = state
    missing = [a for a in arrays if not any(j in states for j in job_ids if j.split("_")[0] == a)]
    if missing:
        out = _query(["sacct", "-n", "-X", "-P", f"--name={JOB_NAME}", "-j", ",".join(missing), "-o", "JobID,State"])
        out = out or ""
        for line in out.splitlines():
            jid, _, state = line.strip().partition("|")
            states.setdefault(jid, state.split()[0] if state else "")
    return {j: states[j] for j in job_ids if j in states}


def _result(folder: Path, job_id: str) -> dict | None:
    """What the task returned (submitit's result pickle: ("success", value) or ("error", traceback))."""
    try:
        with open(folder / f"{job_id}_0_result.pkl", "rb") as f:
            outcome, value = pickle.load(f)
    except (OSError, pickle.UnpicklingError, ValueError, EOFError):
        return None
    return value if outcome == "success" and isinstance(value, dict) else {"status": "error", "error": str(value)}


def task_state(job_id: str, state: str | None, folder: Path) -> tuple[str, str]:
    """A task without a record as (queued | running | cancelled | failed | done, detail)."""
    log = folder / f"{job_id}_0_log.err"
    where = f"job {job_id}" + (f", log {log}" if log.exists() else "")
    if state in QUEUED:
        return "queued", f"job {job_id} {state.lower()}"
    if state in RUNNING:
        return "running", f"job {job_id}"
    res = _result(folder, job_id)
    if res is not None and "run_id" in res:  # the cell's record (one that started before a re-run adopted the task)
        return res["status"], (res.get("error") or "")[:100]
    if res is not None and res.get("status") in ("cancelled", "skipped"):
        return res["status"], f"job {job_id}: {res.get('error')}"
    if res is not None and res.get("status") == "error":
        return "failed", f"{where}: {_last_error(res['error'])}"
    if state is not None and state.startswith("CANCELLED"):
        return "cancelled", f"job {job_id} cancelled"
    if state not in (None, "COMPLETED"):
        return "failed", f"{where}: Slurm state {state}"
    text = log.read_text(errors="replace") if log.exists() else ""
    if "CANCELLED" in text and "DUE TO TIME LIMIT" not in text:
        return "cancelled", f"job {job_id} cancelled"
    if state is None and not log.exists():  # gone from squeue (no accounting) without ever starting
        return "cancelled", f"job {job_id} left the queue without starting"
    return "failed", f"{where}: ended without a record" + (" (time limit)" if "TIME LIMIT" in text else "")


def _last_error(text: str) -> str:
    """The exception's own line of a traceback (not submitit's wrapper lines)."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception", "Interrupt"))]
    return (errs[-1] if errs else lines[-1] if lines else "")[:300]


def live_jobs(results_dir: str | Path) -> dict[str, tuple[str, str, str]]:
    """Cells of earlier sweeps into RESULTS_DIR whose task is still queued or running: hash -> (job id, state,
    submitit folder)."""
    import json

    ids: dict[str, tuple[str, str]] = {}
    for p in sorted(sweeps_dir(results_dir).glob("*.json")):
        body = json.loads(p.read_text())
        if body.get("launcher") == "slurm" and body.get("cluster") == "slurm" and isinstance(body.get("job_ids"), dict):
            folders = body.get("slurm_folders", {})
            ids.update({h: (j, folders.get(h, body["slurm_folder"])) for h, j in body["job_ids"].items()})
    states = slurm_states(list({j for j, _ in ids.values()}))
    return {h: (j, states[j], f) for h, (j, f) in ids.items() if states.get(j) in QUEUED + RUNNING}


def _partitions() -> dict[str, str]:
    """Partition -> its generic resources as sinfo lists them ('gpu:a100:4', '(null)'); the default one ends in *."""
    out = _query(["sinfo", "-h", "-o", "%P|%G"]) or ""
    parts: dict[str, str] = {}
    for line in out.splitlines():
        name, _, gres = line.strip().partition("|")
        parts[name] = ",".join(x for x in (parts.get(name, ""), gres) if x and x != "(null)")
    return parts


def resources(s: SlurmConfig, cells: list[Planned], cluster: str) -> tuple[dict, str | None]:
    """submitit's parameters for the array (every task gets the widest cell's share), and a note for the user.

    A multi-rank cell (run.world_size=N) runs its N ranks through the local torchrun launcher inside one task, as it
    does on one machine: the runner times out and kills the group as one, and rank 0 gathers the record. So the task
    asks for N CPUs (CPU ranks) or N GPUs (CUDA ranks) on one node, not N Slurm tasks; ranks across nodes need srun
    and torchrun's rendezvous (docs/multigpu.md)."""
    runs = [c.config["run"] for c in cells]
    longest = max(float(r["timeout_s"]) for r in runs)
    need_min = math.ceil((longest + MARGIN_S) / 60)
    if s.time_min is not None and s.time_min < need_min:
        raise ConfigError(
            f"slurm.time_min={s.time_min}: shorter than run.timeout_s={longest:g} plus {MARGIN_S} s to start the task "
            f"and write its record; set slurm.time_min>={need_min}, or leave it null (computed)"
        )
    note = None
    gpu_here = cluster != "slurm"  # the local executor: the cell finds what this machine has
    if cluster == "slurm":
        parts = _partitions()
        name = s.partition or next((p[:-1] for p in parts if p.endswith("*")), None)
        gres = parts.get(name, parts.get(f"{name}*")) if name else None
        if s.partition and gres is None:
            raise ConfigError(f"slurm.partition={s.partition}: no such partition; sinfo lists: {', '.join(parts)}")
        gpu_here = "gpu" in (gres or "")
        if any(r["device"] == "cuda" for r in runs) and not gpu_here and not s.gpus_per_node:
            raise ConfigError(
                f"run.device=cuda: partition {name} lists no GPUs (sinfo %G: {gres or '(null)'}); name a GPU partition "
                "(slurm.partition=NAME slurm.gpus_per_node=1) or set run.device=cpu"
            )
        if any(r["device"] == "auto" for r in runs) and not gpu_here and not s.gpus_per_node:
            note = (
                f"membench: partition {name} lists no GPUs: run.device=auto cells run on CPU "
                "(slurm.partition=GPU_PARTITION slurm.gpus_per_node=1 asks for a GPU)"
            )
    on_gpu = [r for r in runs if r["device"] == "cuda" or (r["device"] == "auto" and gpu_here)]
    on_cpu = [r for r in runs if r not in on_gpu]
    gpus = s.gpus_per_node
    if gpus is None:
        gpus = max((int(r["world_size"]) for r in on_gpu), default=0) if cluster == "slurm" else 0
    ranks = max((int(r["world_size"]) for r in on_cpu), default=1)
    if s.cpus_per_task is not None and s.cpus_per_task < ranks:
        raise ConfigError(
            f"slurm.cpus_per_task={s.cpus_per_task}: a CPU cell has run.world_size={ranks}, one CPU per rank needs "
            f"slurm.cpus_per_task>={ranks} (or null)"
        )
    params = {
        "timeout_min": s.time_min or need_min,
        "gpus_per_node": gpus,
        "cpus_per_task": s.cpus_per_task or (ranks if ranks > 1 else None),
        "mem_gb": s.mem_gb,
        "slurm_partition": s.partition,
        "slurm_account": s.account,
        "slurm_qos": s.qos,
        "slurm_array_parallelism": s.array_parallelism,
    }
    return {k: v for k, v in params.items() if v is not None}, note


# Words of sbatch's rejection -> the knob that asked for it
_REJECTED = (
    ("partition", "partition"),
    ("account", "account"),
    ("qos", "qos"),
    ("gres", "gpus_per_node"),
    ("gpu", "gpus_per_node"),
    ("time limit", "time_min"),
    ("memory", "mem_gb"),
    ("cpu", "cpus_per_task"),
)


def _rejection(e: Exception, s: SlurmConfig) -> ConfigError:
    """sbatch's refusal as one line naming the knob (FailedJobError carries sbatch's whole output)."""
    lines = [ln.strip() for ln in str(e).splitlines() if "error" in ln.lower()] or [str(e).strip()]
    why = lines[-1].split("error:", 1)[-1].strip()
    low = why.lower()
    keys = [k for word, k in _REJECTED if word in low] or [
        k for k in ("cpus_per_task", "mem_gb", "gpus_per_node") if getattr(s, k) is not None
    ]
    named = " ".join(f"slurm.{k}={getattr(s, k)}" for k in dict.fromkeys(keys)) or "slurm"
    return ConfigError(f"{named}: sbatch rejected the job: {why}")


# Pending reasons that no amount of waiting clears: sbatch accepted what the partition or association cannot give
# (clusters without EnforcePartLimits accept a job that asks for more CPUs than any node has, and keep it pending).
_NEVER = {
    "PartitionConfig": "cpus_per_task",
    "PartitionNodeLimit": "cpus_per_task",
    "PartitionTimeLimit": "time_min",
    "BadConstraints": "cpus_per_task",
    "InvalidAccount": "account",
    "InvalidQOS": "qos",
    "QOSMaxWallDurationPerJobLimit": "time_min",
    "AssocMaxWallDurationPerJobLimit": "time_min",
}


def _refuse_if_never_runs(array: str, s: SlurmConfig) -> None:
    """Cancel the array and raise a one-line error when Slurm says its tasks can never start."""
    for _ in range(10):  # the scheduler gives a pending task its reason within a moment of the submission
        out = _query(["squeue", "-h", "-r", "-j", array, "-o", "%T|%r"]) or ""
        reasons = {ln.split("|", 1)[1] for ln in out.split() if ln.startswith("PENDING|")}
        if "None" not in reasons:
            break
        time.sleep(0.3)
    never = sorted(r for r in reasons if r in _NEVER)
    if never:
        subprocess.run(["scancel", array], capture_output=True)
        key = _NEVER[never[0]]
        want = f"slurm.{key}={getattr(s, key)}" if getattr(s, key) is not None else "slurm"
        raise ConfigError(f"{want}: Slurm keeps the job pending for good ({never[0]}); the array was cancelled")


# -------------------------------------------------------------------------------------------- submit, follow


def executor(slurm: dict, cells: list[Planned], folder: Path):
    import submitit

    s = SlurmConfig(**slurm)
    ex = submitit.AutoExecutor(folder=folder, cluster=s.cluster)
    params, note = resources(s, cells, ex.cluster)
    if ex.cluster == "slurm":  # the task imports this checkout's membench, whatever the node's working directory
        params["slurm_setup"] = [
            f"export PYTHONPATH={Path(__file__).resolve().parents[2]}${{PYTHONPATH:+:$PYTHONPATH}}"
        ]
    ex.update_parameters(name=JOB_NAME, **params)
    return ex, note


def run_slurm(
    cells: list[Planned], slurm: dict, folder: Path, display: Display, worker: Callable[[dict], dict], on_submit=None
) -> list[dict]:
    """Submit the cells that no live task of an earlier sweep holds, follow them; Ctrl-C/SIGTERM detach.
    Each task runs `worker(config)` in its own child. on_submit gets the sweep file's Slurm fields: job_ids (cell hash -> task id), cluster, slurm_folder."""
    from submitit.core.utils import FailedJobError

    existed = folder.exists()
    ex, note = executor(slurm, cells, folder)
    if note:
        display.line(note)
    adopted = []  # (cell, its task from an earlier sweep, still queued or running): followed, not submitted again
    if ex.cluster == "slurm":
        from submitit import SlurmJob

        try:
            live = live_jobs(cells[0].config["run"]["results_dir"])
        except SlurmUnreachable as e:
            raise ConfigError(f"slurm: the cluster does not answer ({e}); nothing was submitted") from None
        adopted = [
            (c, SlurmJob(live[c.chash][2], live[c.chash][0]), live[c.chash][1]) for c in cells if c.chash in live
        ]
        cells = [c for c in cells if c.chash not in live]
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's error; the one line below says it
            jobs = (
                ex.map_array(run_task, [c.config for c in cells], [c.label for c in cells], [worker] * len(cells))
                if cells
                else []
            )
        if jobs and ex.cluster == "slurm":
            _refuse_if_never_runs(jobs[0].job_id.split("_")[0], SlurmConfig(**slurm))
    except (FailedJobError, ConfigError) as e:
        if not existed:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        raise (e if isinstance(e, ConfigError) else _rejection(e, SlurmConfig(**slurm))) from None
    if on_submit is not None:
        ids = {c.chash: j.job_id for c, j in [*zip(cells, jobs, strict=True), *((c, j) for c, j, _ in adopted)]}
        elsewhere = {c.chash: str(j.paths.folder) for c, j, _ in adopted}  # the earlier sweeps' submitit folders
        on_submit({"job_ids": ids, "cluster": ex.cluster, "slurm_folder": str(folder), "slurm_folders": elsewhere})
    for c, j, state in adopted:
        display.started(c.label, f"job {j.job_id}, {state.lower()} since an earlier sweep: not submitted again")
    for c, j in zip(cells, jobs, strict=True):
        display.started(c.label, f"job {j.job_id}")
    records: list[dict] = []
    left = [*((c, j) for c, j, _ in adopted), *zip(cells, jobs, strict=True)]
    previous = signal.signal(signal.SIGTERM, _detach_on_term)
    try:
        _follow(left, display, records, ex.cluster)
    except (KeyboardInterrupt, _Detach) as e:
        ids = ", ".join(j.job_id for _, j in left[:3]) + (" ..." if len(left) > 3 else "")
        display.line(
            f"membench: detached; {len(left)} job(s) go on ({ids}); `membench status RESULTS_DIR --wait` "
            "re-attaches, `scancel JOB_ID` cancels"
        )
        display.close()
        sys.stdout.flush()
        raise SystemExit(143 if isinstance(e, _Detach) else 130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    return records


class _Detach(Exception):
    """SIGTERM while following: leave the jobs running, like Ctrl-C."""


def _detach_on_term(signum, frame) -> None:
    raise _Detach


def _follow(left: list, display: Display, records: list[dict], cluster: str) -> None:
    """Until every task has ended: its result once submitit wrote it, else its Slurm state (polled every POLL_S)."""

    t0 = time.monotonic()
    states: dict[str, str] = {}
    polled = float("-inf")
    ended: dict[str, int] = {}  # Slurm says ended but no result yet: polls since (a shared file system may lag)
    while left:
        if cluster == "slurm" and time.monotonic() - polled >= POLL_S:
            polled = time.monotonic()
            try:
                states = slurm_states([j.job_id for _, j in left])
            except SlurmUnreachable as e:  # keep following; tasks end on their results or once Slurm answers
                display.line(f"membench: {e}; asking again in {POLL_S:g} s")
                continue
            for _, j in left:
                st = states.get(j.job_id)
                ended[j.job_id] = ended.get(j.job_id, 0) + 1 if st not in QUEUED + RUNNING else 0
        for entry in list(left):
            c, j = entry
            has_result = j.paths.result_pickle.exists()
            if cluster != "slurm":
                has_result = j.done()
            if not has_result and ended.get(j.job_id, 0) < 2:
                continue
            left.remove(entry)
            if not has_result:
                ended.pop(j.job_id)
                state, detail = task_state(j.job_id, states.get(j.job_id), j.paths.folder)
                display.finished(
                    c.label, {"status": "cancelled" if state == "cancelled" else "error"}, f"{state}: {detail}"
                )
                continue
            try:
                rec = j.result()
            except Exception as e:  # noqa: BLE001 - a task that died outside its cell (node failure, submitit)
                err = f"error: job {j.job_id}: {_last_error(str(e))}; log {j.paths.stderr}"
                display.finished(c.label, None, err)
                continue
            if rec.get("status") == "skipped":
                display.skipped(c.label, rec["error"])
                continue
            if rec.get("status") == "cancelled":
                display.finished(c.label, rec, f"cancelled: {rec['error']}")
                continue
            records.append(rec)
            display.finished(c.label, rec, summary_line(rec), time.monotonic() - t0)
        time.sleep(0.5 if left else 0)
