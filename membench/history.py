"""`membench history RESULTS_DIR [FILTER]`: peak, step time and quality of each cell over the commits its
records were measured at (env.git.commit), as a markdown table and a PNG (matplotlib, Agg backend).

Every record counts here, not only the latest per cell: records are append-only, so re-running a study after
a change adds a point. Commits are ordered by their first record's run_id (a UTC timestamp). The `hw` column
is a short hash of the hardware profile (membench.compare.hardware_profile): a step-time jump where it
changes is the machine, not the code.

Change points (the `change` column; red rings on the chart): each cell's series of per-commit values (median
step time; peak) is split by binary segmentation: the split that maximises the difference between the mean
of the log values before and after it is kept when that difference is above the threshold, then each side is
split again. Why this and not a Mann-Whitney test between the raw step times before and after each commit: the
steps of one run are not independent samples of the code's speed, the run is (on a shared machine two fresh runs
of identical code drift by tens of percent: docs/tracking.md), so a test on many steps calls every drift
significant; one point per commit with a threshold in the series' own unit does not.
The step-time threshold is max(--time-min-effect, --time-noise-floor) (compare's knobs: the drift measured by
scripts/gate_power.py is the floor to pass on a shared machine); the peak threshold is --peak-rtol. A single
outlying commit shows as two change points (up, then down), which is what it is. asv's step detection is the
same idea with a penalised L1 fit (PELT-style); a series of a few commits does not need the penalty search.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from pathlib import Path

from membench.compare import Tolerances, hardware_profile
from membench.records import load_records
from membench.report import MiB, label


def cell_name(r: dict) -> str:
    run = r["config"]["run"]
    return f"{r['config']['workload'].get('preset')} b={run['batch_size']} seed={run.get('seed')} {label(r)}"


def _hw(r: dict) -> str:
    return hashlib.sha256(json.dumps(hardware_profile(r), sort_keys=True).encode()).hexdigest()[:6]


def _commit(r: dict) -> str:
    git = (r.get("env") or {}).get("git") or {}
    c = (git.get("commit") or "unknown")[:7]
    return c + ("+dirty" if git.get("dirty") else "")


def history(records: list[dict], name_filter: str | None = None) -> tuple[list[str], dict[str, dict[str, dict]]]:
    """(commits in time order, {cell: {commit: latest ok record of that cell at that commit}})."""
    ok = sorted((r for r in records if r["status"] == "ok"), key=lambda r: r["run_id"])
    if name_filter:
        ok = [r for r in ok if name_filter in cell_name(r)]
    commits: list[str] = []
    cells: dict[str, dict[str, dict]] = {}
    for r in ok:
        c = _commit(r)
        if c not in commits:
            commits.append(c)
        cells.setdefault(cell_name(r), {})[c] = r
    return commits, cells


def change_points(values: list[float], threshold: float) -> list[int]:
    """Indices i where the series steps between point i-1 and point i by more than `threshold` (relative):
    binary segmentation on log values, segments compared by their means (the mean places a step where it is;
    a segment median can sit on either side of it)."""
    logs = [math.log(v) for v in values]
    found: list[int] = []

    def split(lo: int, hi: int) -> None:
        best, at = 0.0, None
        for i in range(lo + 1, hi):
            d = abs(statistics.fmean(logs[i:hi]) - statistics.fmean(logs[lo:i]))
            if d > best:
                best, at = d, i
        if at is not None and best > math.log1p(threshold):
            found.append(at)
            split(lo, at)
            split(at, hi)

    split(0, len(logs))
    return sorted(found)


SERIES = {  # what the change column watches: value of a record, and the tolerance that sets its threshold
    "step": (lambda r: r["timing"]["median_step_s"], lambda tol: max(tol.time_min_effect, tol.time_noise_floor)),
    "peak": (lambda r: r["memory"]["peak_bytes"], lambda tol: tol.peak_rtol),
}


def changes(commits: list[str], cells: dict[str, dict[str, dict]], tol: Tolerances) -> dict[str, dict[str, list]]:
    """{cell: {commit: ["step +23%", ...]}}: the change points of each watched series, at the commit where the
    new level starts."""
    out: dict[str, dict[str, list]] = {}
    for name, by_commit in cells.items():
        cs = [c for c in commits if c in by_commit]
        for what, (get, threshold) in SERIES.items():
            vals = [get(by_commit[c]) for c in cs]
            for i in change_points(vals, threshold(tol)):
                step = statistics.geometric_mean(vals[i:]) / statistics.geometric_mean(vals[:i]) - 1
                out.setdefault(name, {}).setdefault(cs[i], []).append(f"{what} {step:+.0%}")
    return out


def table(commits: list[str], cells: dict[str, dict[str, dict]], marks: dict[str, dict[str, list]]) -> str:
    rows = ["| cell | commit | date | hw | peak MiB | median step ms | IQR ms | quality | change |", "|" + "---|" * 9]
    for name in sorted(cells):
        for c in commits:
            r = cells[name].get(c)
            if r is None:
                continue
            t, q = r["timing"], r["quality"]
            mark = ", ".join(marks.get(name, {}).get(c, [])) or "-"
            rows.append(
                f"| {name} | {c} | {r['run_id'][:8]} | {_hw(r)} | {r['memory']['peak_bytes'] / MiB:.2f} "
                f"| {t['median_step_s'] * 1e3:.2f} | {t['iqr_step_s'] * 1e3:.2f} | {q['metric']}={q['value']:.4f} "
                f"| {mark} |"
            )
    return "\n".join(rows)


PANELS = (  # (y label, value, the change series marked on it)
    ("peak memory (MiB)", lambda r: r["memory"]["peak_bytes"] / MiB, "peak"),
    ("median step time (ms)", lambda r: r["timing"]["median_step_s"] * 1e3, "step"),
    ("quality", lambda r: r["quality"]["value"], None),
)


def figure(commits: list[str], cells: dict[str, dict[str, dict]], marks: dict[str, dict[str, list]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(12, 3.8), dpi=80)
    for ax, (ylabel, get, series) in zip(axes, PANELS, strict=True):
        for name in sorted(cells):
            xs = [i for i, c in enumerate(commits) if c in cells[name]]
            ax.plot(xs, [get(cells[name][commits[i]]) for i in xs], marker="o", label=name)
            hit = [i for i in xs if any(m.startswith(f"{series} ") for m in marks.get(name, {}).get(commits[i], []))]
            ax.scatter(hit, [get(cells[name][commits[i]]) for i in hit], s=160, facecolors="none", edgecolors="red")
        ax.set_xticks(range(len(commits)), commits, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if len(cells) <= 12:  # beyond that a legend hides the plot; the table names every cell
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", fontsize=7, ncol=2, frameon=False)
        fig.tight_layout(rect=(0, 0.06 * ((len(cells) + 1) // 2), 1, 1))
    else:
        fig.tight_layout()
    return fig


def write_history(
    results_dir: str | Path, name_filter: str | None = None, out: str | None = None, tol: Tolerances | None = None
):
    """(markdown text, PNG path or None when no record matches); `tol` sets the change-point thresholds."""
    import matplotlib.pyplot as plt

    commits, cells = history(load_records(results_dir), name_filter)
    marks = changes(commits, cells, tol or Tolerances())
    head = f"# membench history: {results_dir}" + (f" (cells matching {name_filter!r})" if name_filter else "")
    if not cells:
        return head + "\n\nno ok records" + (f" match {name_filter!r}" if name_filter else ""), None
    fig = figure(commits, cells, marks)
    path = Path(out) if out else Path(results_dir) / "history.png"
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    n = sum(len(m) for by_commit in marks.values() for m in by_commit.values())
    return f"{head}\n\n{table(commits, cells, marks)}\n\nmembench: {n} change point(s) (red rings on the chart)", path
