"""The real CLI in a subprocess: run, validate the record it wrote, skip on re-run, report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from membench.records import validate_record

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "membench.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_run_writes_a_valid_record_then_skips_then_reports(tmp_path):
    args = [
        "run",
        "workload=gpt_tiny",
        "technique=[activation_checkpointing]",
        "run.train_steps=5",
        "run.warmup_steps=1",
        "run.measure_steps=2",
        f"run.results_dir={tmp_path}",
    ]
    p = _cli(*args)
    assert p.returncode == 0, p.stderr
    files = list((tmp_path / "runs").glob("*.json"))
    assert len(files) == 1
    r = json.loads(files[0].read_text())
    validate_record(r)
    assert r["status"] == "ok"
    assert r["techniques"] == ["activation_checkpointing"]
    assert r["config"]["technique"]["activation_checkpointing"]["mode"] == "full"
    assert len(r["timing"]["step_times_s"]) == 2
    assert len(r["quality"]["loss_curve"]) == 5
    assert r["env"]["versions"]["torch"]
    # the split at the peak against an independent count: fp32 parameters are 4 bytes each
    assert r["memory"]["by_category"]["params"] == 4 * r["workload"]["num_params"]
    assert r["memory"]["peak_source"].startswith("MemTracker") and set(r["memory"]["by_device"]) == {"cpu"}

    again = _cli(*args)
    assert again.returncode == 0 and "skipped" in again.stdout
    assert len(list((tmp_path / "runs").glob("*.json"))) == 1

    rep = _cli("report", str(tmp_path))
    assert rep.returncode == 0
    assert "| activation_checkpointing |" in (tmp_path / "REPORT.md").read_text()  # default knobs are not shown
