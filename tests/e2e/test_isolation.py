"""Each run is its own process: a crash, an over-budget run and a hung run are recorded; the sweep goes on."""

from __future__ import annotations

from membench.cli import main
from membench.records import load_records, validate_record
from membench.sweep import run_cell
from tests.helpers import compose

TINY = ("workload=gpt_tiny", "run.train_steps=4", "run.warmup_steps=1", "run.measure_steps=1")


def test_a_run_that_raises_is_recorded_as_error(tmp_path):
    cfg = compose(*TINY, f"run.results_dir={tmp_path}")
    cfg["workload"]["data_path"] = "/nonexistent/corpus.txt"  # gone after planning (which rejects a missing file)
    r = run_cell(cfg, str(tmp_path), timeout_s=120)
    assert r["status"] == "error"
    assert "no such file" in r["error"]
    validate_record(r)


def test_a_run_over_its_memory_budget_is_recorded_as_oom(tmp_path):
    cfg = compose(*TINY, "run.memory_budget_mib=1", f"run.results_dir={tmp_path}")
    r = run_cell(cfg, str(tmp_path), timeout_s=120)
    assert r["status"] == "oom"
    assert "run.memory_budget_mib=1" in r["error"]
    validate_record(r)


def test_a_run_past_its_timeout_is_killed_and_recorded(tmp_path):
    cfg = compose(*TINY, "run.timeout_s=0.3", f"run.results_dir={tmp_path}")
    r = run_cell(cfg, str(tmp_path), timeout_s=0.3)
    assert r["status"] == "timeout"
    validate_record(r)


def test_the_sweep_continues_past_failed_runs_and_exits_1(tmp_path, capsys):
    rc = main(["run", "-m", *TINY, "run.memory_budget_mib=1,512", f"run.results_dir={tmp_path}"])
    assert rc == 1  # the sweep finished, one cell did not fit
    statuses = sorted(r["status"] for r in load_records(tmp_path))
    assert statuses == ["ok", "oom"]
    assert "done: 1 ok, 1 oom" in capsys.readouterr().out
