"""`membench compare` flags regressions between record sets, and only real ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from membench.cli import main

RECORDS = Path(__file__).resolve().parent.parent / "results" / "checkpointing" / "runs"


def _copy(dst: Path) -> list[Path]:
    (dst / "runs").mkdir(parents=True)
    return [Path(shutil.copy(p, dst / "runs" / p.name)) for p in sorted(RECORDS.glob("*.json"))]


def test_identical_record_sets_do_not_regress(tmp_path, capsys):
    _copy(tmp_path / "a")
    _copy(tmp_path / "b")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "0 cell(s) regressed" in capsys.readouterr().out


def test_memory_flops_quality_and_status_regressions_are_flagged(tmp_path, capsys):
    _copy(tmp_path / "a")
    files = _copy(tmp_path / "b")
    edits = {
        0: lambda r: r["memory"].update(peak_bytes=int(r["memory"]["peak_bytes"] * 1.05)),
        1: lambda r: r["flops"].update(counted_per_step=r["flops"]["counted_per_step"] * 2),
        2: lambda r: r["quality"].update(value=r["quality"]["value"] + 0.5),  # eval loss: higher is worse
        3: lambda r: r.update(status="oom", error="peak over budget"),
    }
    for i, edit in edits.items():
        r = json.loads(files[i].read_text())
        edit(r)
        files[i].write_text(json.dumps(r))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    out = capsys.readouterr().out
    assert "4 cell(s) regressed" in out
    assert "status ok -> oom" in out and "FLOPs" in out and "eval_loss" in out and "peak" in out


def test_compare_names_a_missing_folder(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope"), str(tmp_path)]) == 2
    assert "has no runs/ folder" in capsys.readouterr().err
