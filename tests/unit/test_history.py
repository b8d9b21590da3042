"""`membench history`: one row per cell and commit, commits in the order they were first measured."""

from __future__ import annotations

import json
from pathlib import Path

from membench.cli import main
from membench.history import change_points

RECORDS = Path(__file__).resolve().parents[2] / "results" / "checkpointing" / "runs"


def test_history_orders_commits_by_time_and_filters_cells(tmp_path, capsys):
    files = sorted(RECORDS.glob("*.json"))
    base = json.loads(files[0].read_text())
    ckpt = json.loads(files[1].read_text())
    (tmp_path / "runs").mkdir()
    # three commits, written out of order; the baseline's peak grows by 1 MiB per commit
    for commit, stamp in (("bbbbbbb1", "20270102"), ("aaaaaaa1", "20270101"), ("ccccccc1", "20270103")):
        for r in (base, ckpt):
            r = json.loads(json.dumps(r))
            r["env"]["git"] = {"commit": commit, "dirty": commit.startswith("c")}
            r["run_id"] = f"{stamp}T000000-{r['run_id'][16:]}"
            if not r["techniques"]:
                r["memory"]["peak_bytes"] = (100 + int(stamp[-1])) * 2**20
            (tmp_path / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))
    assert main(["history", str(tmp_path), "baseline"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| gpt_small")]
    assert [row.split(" | ")[1] for row in rows] == ["aaaaaaa", "bbbbbbb", "ccccccc+dirty"]
    assert [row.split(" | ")[4] for row in rows] == ["101.00", "102.00", "103.00"]
    assert all("baseline" in row for row in rows)
    png = tmp_path / "history.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and f"wrote {png}" in out
    assert main(["history", str(tmp_path), "no-such-cell"]) == 0
    assert "no ok records match 'no-such-cell'" in capsys.readouterr().out


def test_history_on_a_missing_folder_is_an_error(tmp_path, capsys):
    assert main(["history", str(tmp_path / "nope")]) == 2
    assert "has no runs/ folder" in capsys.readouterr().err


def test_change_points_find_the_step_and_only_it():
    assert change_points([10, 10.1, 9.9, 12.0, 12.1, 11.9], 0.05) == [3]
    assert change_points([10, 10.1, 9.9, 12.0, 12.1, 11.9], 0.25) == []  # a 20% step under a 25% threshold
    assert change_points([10, 10.2, 9.8, 10.1], 0.05) == []
    assert change_points([10, 10, 13, 13, 10, 10], 0.05) == [2, 4]  # a step up, then back down
    assert change_points([5.0], 0.05) == []


def _series(tmp_path: Path, step_ms: list[float]) -> list[str]:
    """One committed cell measured at len(step_ms) commits c0, c1, ...; median step time as given."""
    r0 = json.loads(sorted(RECORDS.glob("*.json"))[0].read_text())
    (tmp_path / "runs").mkdir()
    commits = [f"c{i}{'0' * 6}" for i in range(len(step_ms))]
    for i, (commit, ms) in enumerate(zip(commits, step_ms, strict=True)):
        r = json.loads(json.dumps(r0))
        r["env"]["git"] = {"commit": commit, "dirty": False}
        r["run_id"] = f"202701{i + 1:02d}T000000-{r['run_id'][16:]}"
        r["timing"]["median_step_s"] = ms / 1e3
        (tmp_path / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))
    return [c[:7] for c in commits]


def test_history_marks_the_commit_where_step_time_stepped(tmp_path, capsys):
    commits = _series(tmp_path, [100, 102, 99, 101, 121, 120, 122])  # +20% from the 5th commit on
    assert main(["history", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    marks = {
        row.split(" | ")[1]: row.split(" | ")[8].rstrip(" |") for row in out.splitlines() if row.startswith("| gpt")
    }
    assert marks == {c: ("step +20%" if c == commits[4] else "-") for c in commits}
    assert "membench: 1 change point(s)" in out
    assert main(["history", str(tmp_path), "--time-noise-floor", "0.25"]) == 0  # inside a 25% drift: no change
    assert "membench: 0 change point(s)" in capsys.readouterr().out
