"""Pareto charts: the front is the set no other cell beats on both axes; PNGs are small and one per preset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from membench.cli import main
from membench.plots import pareto_figure, pareto_front
from membench.records import latest_by_cell, load_records

RECORDS = Path(__file__).resolve().parents[2] / "results" / "checkpointing"


def test_pareto_front_by_hand():
    # (time, peak): (1, 10) and (2, 5) and (4, 1) are not beaten on both axes; (3, 6) loses to (2, 5)
    pts = [(3, 6), (1, 10), (4, 1), (2, 5), (5, 1)]
    assert pareto_front(pts) == [1, 3, 2]
    # higher x better (accuracy): (5, 1) has the highest x and the lowest peak, so it beats every other point
    assert pareto_front(pts, lower_x_better=False) == [4]


def test_baseline_is_the_star_on_every_panel():
    records = list(latest_by_cell(load_records(RECORDS)).values())
    fig = pareto_figure(records, "t")
    base = [r for r in records if not r["techniques"]]  # the baseline's seed group: one point, its seeds' mean
    assert len(base) == 10
    for ax in fig.axes:
        stars = [line for line in ax.get_lines() if line.get_marker() == "*"]
        assert len(stars) == 1
        assert abs(stars[0].get_ydata()[0] - base[0]["memory"]["peak_bytes"] / 2**20) < 1e-9
    mean_ms = sum(r["timing"]["median_step_s"] * 1e3 for r in base) / len(base)
    assert abs(fig.axes[0].get_lines()[0].get_xdata()[0] - mean_ms) < 1e-9


def test_report_plot_writes_one_small_png_per_preset(tmp_path, capsys):
    shutil.copytree(RECORDS / "runs", tmp_path / "runs")
    extra = json.loads(sorted((tmp_path / "runs").glob("*.json"))[0].read_text())
    extra["config"]["workload"]["preset"] = "other"
    extra["config_hash"] = "f" * 16
    (tmp_path / "runs" / "x.json").write_text(json.dumps(extra))
    assert main(["report", str(tmp_path), "--plot"]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["pareto-gpt_small.png", "pareto-other.png"]
    for p in tmp_path.glob("*.png"):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 100_000
    assert "wrote" in capsys.readouterr().out
