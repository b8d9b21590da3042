"""Results that outlive the machine: records readable by the group, `membench export` to CSV and Parquet read
back in pandas, checked field by field against the committed ZeRO study's JSON records."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pandas as pd
import pytest

from membench.cli import main
from membench.records import skeleton, write_record

STUDY = Path(__file__).resolve().parents[2] / "results" / "zero_stages"


@pytest.fixture
def study(tmp_path) -> tuple[Path, list[dict]]:
    """A copy of the committed ZeRO records (2-rank runs with per-rank lists), plus one error record."""
    shutil.copytree(STUDY / "runs", tmp_path / "runs")
    err = skeleton("29991231T000000-000000-ffffffffff", "f" * 16, {"workload": {"preset": "gpt_tiny"}}, "error")
    write_record(tmp_path, dict(err, error="RuntimeError: boom", error_traceback="Traceback ...\n" * 50))
    recs = sorted((json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")), key=lambda r: r["run_id"])
    return tmp_path, recs


def test_records_are_readable_by_the_group(tmp_path):
    path = write_record(tmp_path, skeleton("r1", "h" * 16, {"workload": {}}, "error"))
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH and mode & stat.S_IWUSR
    assert not mode & (stat.S_IWGRP | stat.S_IWOTH)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_reads_back_one_row_per_record_with_dotted_columns(study, tmp_path, suffix, capsys):
    results, recs = study
    out = tmp_path / f"table{suffix}"
    assert main(["export", str(results), "--out", str(out)]) == 0
    df = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert len(recs) == len(list((results / "runs").glob("*.json"))) == len(df) == 21  # 20 + the error
    assert list(df["run_id"]) == [r["run_id"] for r in recs]
    ok = [(i, r) for i, r in enumerate(recs) if r["status"] == "ok"]
    assert len(ok) == 20 and {r["config"]["run"]["world_size"] for _, r in ok} == {1, 2}
    for i, r in ok:
        row = df.iloc[i]
        assert row["memory.peak_bytes"] == r["memory"]["peak_bytes"]
        assert row["config.technique.zero.stage"] == r["config"]["technique"]["zero"]["stage"]
        assert row["config.run.world_size"] == r["config"]["run"]["world_size"]
        assert row["timing.median_step_s"] == pytest.approx(r["timing"]["median_step_s"], rel=1e-12)
        # per-step lists summarised: their length and last value; per-rank lists only their count
        assert row["quality.loss_curve.n"] == len(r["quality"]["loss_curve"])
        assert row["quality.loss_curve.last"] == pytest.approx(r["quality"]["loss_curve"][-1], rel=1e-12)
        assert row["timing.step_times_s.n"] == len(r["timing"]["step_times_s"])
        assert row["memory.per_rank.n"] == r["config"]["run"]["world_size"]
        assert row["techniques"] == ",".join(r["techniques"])
    assert df.iloc[-1]["status"] == "error" and df.iloc[-1]["error"] == "RuntimeError: boom"
    assert not [c for c in df.columns if "per_rank." in c and not c.endswith(".n")]
    assert not [c for c in df.columns if "traceback" in c or "child_output" in c]
    assert f"21 record(s), {len(df.columns)} columns" in capsys.readouterr().out


def test_export_without_out_prints_csv(study, capsys):
    results, recs = study
    assert main(["export", str(results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("run_id,status,experiment,") and len(lines) == 1 + len(recs)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "t.xlsx"], "membench: error: export --out=t.xlsx: unknown format; allowed: .csv, .parquet"),
        ([], "has no runs/ folder of records"),
    ],
)
def test_bad_export_input_is_one_line_and_writes_nothing(tmp_path, args, message, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    results = str(STUDY) if args else str(tmp_path / "empty")
    assert main(["export", results, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t.xlsx").exists()
