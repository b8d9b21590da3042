"""The parent side: one child process per run, with a timeout; records for runs the child could not finish.

Plain Hydra multirun would reuse one process and leak peak-memory statistics between jobs (Hydra issues
#2631, #2187), so every cell runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from membench import gpuinfo, mlflow_log
from membench.records import config_hash, environment, new_run_id, runs_dir, skeleton, write_record


def run_cell(config: dict, results_dir: str, timeout_s: float) -> dict:
    record = _run_cell(config, results_dir, timeout_s)
    mlflow_log.log_if_configured(record)  # after the record is on disk (run.mlflow_uri)
    return record


def _run_cell(config: dict, results_dir: str, timeout_s: float) -> dict:
    chash = config_hash(config)
    run_id = new_run_id(chash)
    busy = gpuinfo.wait_until_free(config["run"])  # another process on the cell's GPUs (run.gpu_busy)
    if busy:
        record = dict(skeleton(run_id, chash, config, "error"), error=busy, env=environment())
        write_record(results_dir, record)
        return record
    with tempfile.TemporaryDirectory(prefix="membench-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(
            json.dumps({"config": config, "run_id": run_id, "config_hash": chash, "results_dir": str(results_dir)})
        )
        log = Path(tmp) / "child.log"
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]),
        )
        argv = [sys.executable, "-m", "membench.child", str(spec)]
        world = int(config["run"].get("world_size", 1))
        if world > 1:  # a launcher starts the N ranks in this same process group (membench/distributed.py)
            argv = [sys.executable, "-m", "membench.distributed", str(world), *argv]
        with open(log, "w") as logf:
            proc = subprocess.Popen(
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
            try:
                rc = proc.wait(timeout=timeout_s)
                status, error = None, None
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc, status, error = None, "timeout", f"no result within run.timeout_s={timeout_s}"
        tail = log.read_text(errors="replace")[-2000:]
    path = runs_dir(results_dir) / f"{run_id}.json"
    if status is None and path.exists():
        return json.loads(path.read_text())
    if status is None:
        if rc == -signal.SIGKILL:
            status, error = "oom", "child killed by SIGKILL (kernel OOM killer?) before writing its record"
        else:
            status, error = "error", f"child exited with code {rc} before writing its record"
    record = skeleton(run_id, chash, config, status)
    record["error"] = error
    record["child_output_tail"] = tail
    record["env"] = environment()
    write_record(results_dir, record)
    return record
