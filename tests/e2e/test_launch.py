"""Where cells run and how they end: kill -9 of a sweep leaves no process and resumes cleanly, a cancel leaves no
record, a cell locked elsewhere is not started twice, and submitit's local executor runs the Slurm code path. The
Slurm launcher's decisions (resources, sbatch rejections, the state of a task without a record) are checked here
without a cluster; tests/e2e/test_slurm_real.py runs it against a real one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from membench.child import identity
from membench.cli import main
from membench.records import load_records, validate_record
from membench.runner import read_lock, release_lock, try_lock
from tests.helpers import none_left, tagged_pids

ROOT = Path(__file__).resolve().parents[2]
TINY = ["workload=gpt_tiny", "run.train_steps=6", "run.warmup_steps=1", "run.measure_steps=2"]


def _sweep(results_dir: Path, *extra: str, mark: str) -> subprocess.Popen:
    """The real CLI as its own process group (like a shell job), tagged so its descendants can be found."""
    argv = [sys.executable, "-m", "membench.cli", "run", "-m", *TINY, *extra, f"run.results_dir={results_dir}"]
    env = dict(os.environ, MEMBENCH_TEST_MARK=mark)
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _tagged(mark: str) -> list[int]:
    return tagged_pids(mark)


def _none_left(mark: str, within_s: float = 10.0) -> list[int]:
    return none_left(mark, within_s)


def _wait_for(cond, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_of_the_sweep_leaves_no_process_and_a_rerun_runs_each_unfinished_cell_once(tmp_path):
    mark = uuid.uuid4().hex
    p = _sweep(tmp_path, "run.seed=0,1", mark=mark)
    # kill while the second cell runs: the first has its record, the second holds its lock
    _wait_for(
        lambda: (
            (len(list((tmp_path / "runs").glob("*.json"))) >= 1 and list((tmp_path / "locks").glob("*.lock")))
            or p.poll() is not None
        )
    )
    assert p.poll() is None, p.stdout.read()
    os.killpg(p.pid, signal.SIGKILL)  # the whole shell job, as the issue tried it
    p.wait()
    assert _none_left(mark) == []
    before = {r["run_id"]: r for r in load_records(tmp_path)}
    assert before and all(r["status"] == "ok" for r in before.values())
    assert list((tmp_path / "locks").glob("*.lock"))  # the killed sweep could not clean up: stale locks remain

    again = _sweep(tmp_path, "run.seed=0,1", mark=mark)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    after = load_records(tmp_path)
    by_cell: dict[str, list[str]] = {}
    for r in after:
        by_cell.setdefault(r["config_hash"], []).append(r["status"])
    assert sorted(r["config"]["run"]["seed"] for r in after) == [0, 1]
    assert all(s == ["ok"] for s in by_cell.values()), by_cell  # each cell exactly once, none lost
    assert set(before) <= {r["run_id"] for r in after}  # finished records kept as they were
    assert out.count("skip ") == len(before) and not list((tmp_path / "locks").glob("*.lock"))
    assert _none_left(mark) == []


@pytest.mark.slow
def test_sigterm_cancels_the_sweep_kills_its_cells_and_writes_no_record(tmp_path):
    mark = uuid.uuid4().hex
    p = _sweep(tmp_path, "run.train_steps=400", "run.seed=0,1", mark=mark)
    _wait_for(lambda: list((tmp_path / "locks").glob("*.lock")) or p.poll() is not None)
    time.sleep(0.5)  # the cell is running
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 143, out
    assert "Traceback" not in out and "cancelled" in out
    assert _none_left(mark) == []
    assert load_records(tmp_path) == []  # no record claims a cancelled run
    assert not list((tmp_path / "locks").glob("*.lock"))


def test_a_cell_locked_by_a_live_process_is_not_started_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        path, _ = try_lock(tmp_path, "abc", 60)
        lock = json.loads(path.read_text())
        lock.update(identity(holder.pid))  # as if another sweep on this host ran the cell (its pid and start time)
        path.write_text(json.dumps(lock))
        assert try_lock(tmp_path, "abc", 60) == (None, lock)
        holder.kill()
        holder.wait()
        taken, other = try_lock(tmp_path, "abc", 60)  # dead holder: stale, taken over
        assert taken == path and other is None and read_lock(path)["pid"] == os.getpid()
        release_lock(taken)
        # nothing left but the take-over guard (an empty file that stays: runner._takeover_guard says why)
        assert [p.name for p in tmp_path.joinpath("locks").iterdir()] == [".takeover"]
    finally:
        holder.kill()
        holder.wait()

    # the sweep skips a cell whose lock a live process holds, and runs it once the holder is gone
    from membench.cells import configs as plan
    from membench.records import config_hash

    cfg = plan([*TINY, f"run.results_dir={tmp_path}"], False)[0]
    path, _ = try_lock(tmp_path, config_hash(cfg), 60)
    lock = json.loads(path.read_text())
    lock.update(identity(os.getppid()))  # pytest's parent: alive, not this process
    path.write_text(json.dumps(lock))
    assert main(["run", *TINY, f"run.results_dir={tmp_path}"]) == 0
    assert "running elsewhere" in capsys.readouterr().out and load_records(tmp_path) == []


@pytest.mark.slow
def test_slurm_launcher_through_submitits_local_executor(tmp_path, capsys):
    rc = main(["run", "-m", *TINY, "run.seed=0,1", "run.launcher=slurm", "slurm.cluster=local",
               f"slurm.folder={tmp_path / 'submitit'}", f"run.results_dir={tmp_path}"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    records = load_records(tmp_path)
    assert sorted(r["config"]["run"]["seed"] for r in records) == [0, 1]
    for r in records:
        validate_record(r)
        assert r["status"] == "ok" and r["launch"]["start"] == "exec"
        assert "slurm" not in r["config"] and "launcher" not in r["config"]["run"]  # sweep knobs are not the cell
    sweep = json.loads(next((tmp_path / "sweeps").glob("*.json")).read_text())
    assert len(sweep["job_ids"]) == 2
    assert len(list((tmp_path / "submitit").glob("*_result.pkl"))) == 2  # submitit's own job files
    assert main(["status", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("  ok ") == 2


@pytest.mark.gpu
def test_jobs_auto_hands_each_cuda_cell_its_own_device(tmp_path, capsys):
    from membench.launch.local import visible_gpus

    gpus = visible_gpus()
    rc = main(["run", "-m", *TINY, "run.device=cuda", "run.seed=0,1", "run.jobs=auto", f"run.results_dir={tmp_path}"])
    assert rc == 0, capsys.readouterr().out
    used = [r["launch"]["cuda_visible_devices"] for r in load_records(tmp_path)]
    assert all(len(u) == 1 and u[0] in gpus for u in used)
    out = capsys.readouterr().out
    if len(gpus) >= 2:  # two cells at once, on two different devices
        assert len({u[0] for u in used}) == 2 and "1/2 done, 1 running" in out


def test_a_long_cell_shows_its_step_count_and_time_left(tmp_path, monkeypatch):
    """The child's progress reports reach the parent (the step loop calls cell_progress.report_progress)."""
    from membench.cell_progress import report_progress
    from membench.cells import configs as plan
    from membench.runner import Cell

    cfg = plan([*TINY, f"run.results_dir={tmp_path}"], False)[0]
    cell = Cell(cfg, str(tmp_path), 60)
    cell.progress_file = tmp_path / "progress.json"
    cell.started = time.monotonic() - 10.0
    monkeypatch.setenv("MEMBENCH_PROGRESS_FILE", str(cell.progress_file))
    report_progress(5, 20)
    step, total, left = cell.progress()
    assert (step, total) == (5, 20) and 29.0 < left < 31.0  # 10 s for 5 steps: 15 steps left ~ 30 s


# ------------------------------------------------------------------ the Slurm launcher's decisions, without a cluster


def _cells(*runs: dict):
    from membench.launch import Planned

    base = {"device": "auto", "world_size": 1, "timeout_s": 900.0}
    return [Planned({"run": {**base, **r}}, f"cell{i}") for i, r in enumerate(runs)]


def test_slurm_resources_follow_the_partition_the_ranks_and_the_timeout(monkeypatch):
    from membench.errors import ConfigError
    from membench.launch import slurm

    monkeypatch.setattr(slurm, "_partitions", lambda: {"debug*": "", "gpu": "gpu:a100:4"})
    cpu_only = slurm.SlurmConfig()
    params, note = slurm.resources(cpu_only, _cells({}, {"world_size": 2}), "slurm")
    assert params["gpus_per_node"] == 0 and params["cpus_per_task"] == 2 and "debug lists no GPUs" in note
    assert params["timeout_min"] == 17  # 900 s + 120 s, rounded up to minutes
    params, note = slurm.resources(slurm.SlurmConfig(partition="gpu"), _cells({"world_size": 2}), "slurm")
    assert params["gpus_per_node"] == 2 and "cpus_per_task" not in params and note is None
    with pytest.raises(ConfigError, match=r"^run.device=cuda: partition debug lists no GPUs"):
        slurm.resources(cpu_only, _cells({"device": "cuda"}), "slurm")
    with pytest.raises(ConfigError, match=r"^slurm.partition=nope: no such partition"):
        slurm.resources(slurm.SlurmConfig(partition="nope"), _cells({}), "slurm")
    with pytest.raises(ConfigError, match=r"^slurm.cpus_per_task=1: a CPU cell has run.world_size=2"):
        slurm.resources(slurm.SlurmConfig(cpus_per_task=1), _cells({"world_size": 2}), "slurm")
    with pytest.raises(ConfigError, match=r"^slurm.time_min=3: shorter than run.timeout_s=100 .*time_min>=4"):
        slurm.resources(slurm.SlurmConfig(time_min=3), _cells({"timeout_s": 100.0}), "slurm")


def test_an_sbatch_rejection_names_the_knob():
    from submitit.core.utils import FailedJobError

    from membench.launch import slurm

    e = FailedJobError("sbatch: error: Batch job submission failed: Invalid qos specification")
    assert str(slurm._rejection(e, slurm.SlurmConfig(qos="gold"))) == (
        "slurm.qos=gold: sbatch rejected the job: Batch job submission failed: Invalid qos specification"
    )
    e = FailedJobError("sbatch: error: Batch job submission failed: Requested node configuration is not available")
    assert str(slurm._rejection(e, slurm.SlurmConfig(mem_gb=512))).startswith("slurm.mem_gb=512: sbatch rejected")


def test_a_slurm_task_without_a_record_resolves_from_its_state_result_and_log(tmp_path):
    import pickle

    from membench.launch.slurm import task_state

    assert task_state("7_0", "PENDING", tmp_path)[0] == "queued"
    assert task_state("7_0", "RUNNING", tmp_path)[0] == "running"
    assert task_state("7_0", "CANCELLED", tmp_path)[0] == "cancelled"
    assert task_state("7_0", None, tmp_path)[0] == "cancelled"  # gone from squeue, no accounting, never started
    assert task_state("7_0", "NODE_FAIL", tmp_path) == ("failed", "job 7_0: Slurm state NODE_FAIL")
    (tmp_path / "7_1_0_log.err").write_text(
        "slurmstepd: error: *** JOB 9 ON n1 CANCELLED AT 12:00 DUE TO TIME LIMIT ***"
    )
    assert task_state("7_1", None, tmp_path)[1].endswith("ended without a record (time limit)")
    with open(tmp_path / "7_2_0_result.pkl", "wb") as f:
        pickle.dump(("success", {"status": "cancelled", "error": "cancelled by Slurm"}), f)
    assert task_state("7_2", "COMPLETED", tmp_path) == ("cancelled", "job 7_2: cancelled by Slurm")
    with open(tmp_path / "7_3_0_result.pkl", "wb") as f:
        pickle.dump(("error", "Traceback ...\n  File x\nRuntimeError: node lost\nsubmitit wrapper line"), f)
    assert task_state("7_3", "FAILED", tmp_path)[1].endswith("RuntimeError: node lost")
    with open(tmp_path / "7_4_0_result.pkl", "wb") as f:
        pickle.dump(("success", {"run_id": "x", "status": "ok", "error": None}), f)
    assert task_state("7_4", "COMPLETED", tmp_path) == ("ok", "")  # its record, begun before a re-run adopted it
