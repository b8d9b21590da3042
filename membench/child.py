"""Entry point of the child process that executes one run and writes its record.

`python -m membench.child SPEC.json`. Whatever happens inside the run, the child writes a record with a
status; if it dies before that (segfault, SIGKILL), the parent writes one instead (membench/runner.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

from membench.errors import MemoryBudgetExceeded
from membench.records import environment, skeleton, write_record


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, (MemoryBudgetExceeded, MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    record = skeleton(spec["run_id"], spec["config_hash"], spec["config"], "error")
    t0 = time.perf_counter()
    try:
        from membench.execute import execute

        out = execute(spec["config"])
        record.update(out)
        record["status"] = "ok"
    except BaseException as e:  # noqa: BLE001 - every failure is a recorded result, not a crash
        record["status"] = "oom" if _is_oom(e) else "error"
        record["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        record["error_traceback"] = traceback.format_exc(limit=8)[-4000:]
    if int(os.environ.get("RANK", 0)) != 0:  # multi-rank: rank 0 writes the one record (with every rank's data)
        if record["status"] != "ok":
            print(record["error_traceback"], file=sys.stderr, flush=True)
        return 0 if record["status"] == "ok" else 1
    record["env"] = environment(record.get("timing", {}) and record["timing"].get("device"))
    record["wall_s"] = time.perf_counter() - t0
    write_record(spec["results_dir"], record)
    # a failed rank 0 exits non-zero so the launcher stops peers that may wait in a collective
    return 0 if record["status"] == "ok" or int(os.environ.get("WORLD_SIZE", 1)) == 1 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
