"""`membench history`: one row per cell and commit, commits in the order they were first measured."""

from __future__ import annotations

import json
from pathlib import Path

from membench.cli import main

RECORDS = Path(__file__).resolve().parent.parent / "results" / "checkpointing" / "runs"


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
