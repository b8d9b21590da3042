"""A sleep-heavy cell for the kill tests (tests/e2e/test_kill.py): the real sweep (planning, locks, the local pool,
the forkserver, membench/child.py's record path) with a worker that sleeps instead of training, so a cell runs for a
known time at almost no CPU.

`python -m tests.e2e.sleepy run -m workload=digits_cnn_tiny run.seed=0,1 run.results_dir=R`: `membench run` with
this worker. Each cell sleeps run.train_steps x STEP_S seconds; on start it writes RESULTS_DIR/started/RUN-PID (how
many times a cell started, and by which process).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

STEP_S = 0.1


def work(config: dict) -> dict:
    from membench.cell_progress import report_progress

    run = config["run"]
    started = Path(run["results_dir"]) / "started"
    started.mkdir(parents=True, exist_ok=True)
    (started / f"{run['seed']}-{os.getpid()}").touch()
    steps = int(run["train_steps"])
    for step in range(1, steps + 1):
        time.sleep(STEP_S)
        report_progress(step, steps)
    return {
        "memory": {"peak_bytes": 0, "held_after_forward": {"activations": 0}},
        "timing": {"median_step_s": STEP_S, "samples_per_s": 0.0},
        "quality": {"metric": "slept_steps", "value": float(steps)},
    }


def main(argv: list[str]) -> int:
    from membench.runner import warm_up

    warm_up(("membench.execute", __name__))  # as `membench run` does, with this module too
    from membench import sweep
    from membench.cli import main as cli

    sweep.WORKER = work
    return cli(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
