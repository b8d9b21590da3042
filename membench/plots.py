"""Pareto charts of a study: peak memory against median step time and against quality, one PNG per workload.

`membench report RESULTS_DIR --plot` calls `write_plots`; the README's charts come from the same function on
the committed records (`write_plots("results/checkpointing", "checkpointing")`). matplotlib with the Agg
backend (no display needed); each point is one cell (mean over its seeds, error bar = 95% t-interval); the
baseline is a black star; the line joins the cells no other cell beats on both axes.
"""

from __future__ import annotations

from pathlib import Path

from membench.records import latest_by_cell, load_records
from membench.report import MiB, label, mean_ci, seed_group

# (x label, value of a record, lower x is better?) per panel; None means "ask the record" (quality direction).
PANELS = (
    ("median step time (ms)", lambda r: r["timing"]["median_step_s"] * 1e3, True),
    ("quality", lambda r: r["quality"]["value"], None),
)


def _points(records: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for r in records:
        if r["status"] == "ok":
            groups.setdefault(seed_group(r), []).append(r)
    out = []
    for rs in groups.values():
        pt = {"label": label(rs[0]), "baseline": not rs[0].get("techniques"), "record": rs[0]}
        pt["peak"] = mean_ci([r["memory"]["peak_bytes"] / MiB for r in rs])
        pt["x"] = [mean_ci([get(r) for r in rs]) for _, get, _ in PANELS]
        out.append(pt)
    return out


def pareto_front(points: list[tuple[float, float]], lower_x_better: bool = True) -> list[int]:
    """Indices of the points no other point beats on both axes (lower y always better), sorted by x."""
    sign = 1 if lower_x_better else -1
    order = sorted(range(len(points)), key=lambda i: (sign * points[i][0], points[i][1]))
    front, best_y = [], float("inf")
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def pareto_figure(records: list[dict], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(_points(records), key=lambda pt: (not pt["baseline"], pt["label"]))
    q = pts[0]["record"]["quality"]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(11, 4), dpi=80)
    colors = plt.get_cmap("tab10").colors
    for p, (ax, (xlabel, _, lower)) in enumerate(zip(axes, PANELS, strict=True)):
        if lower is None:
            lower = not q.get("higher_is_better")
            xlabel = f"{q['metric']} ({'lower' if lower else 'higher'} is better)"
        for i, pt in enumerate(pts):
            (x, xe), (y, ye) = pt["x"][p], pt["peak"]
            style = dict(marker="*", ms=14, color="black") if pt["baseline"] else dict(marker="o", ms=7)
            style.setdefault("color", colors[i % len(colors)])
            ax.errorbar(x, y, xerr=xe, yerr=ye, linestyle="none", label=pt["label"], **style)
        front = pareto_front([(pt["x"][p][0], pt["peak"][0]) for pt in pts], lower)
        ax.plot([pts[i]["x"][p][0] for i in front], [pts[i]["peak"][0] for i in front], "--", color="grey", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("peak memory (MiB)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"{title}: baseline = black star, dashed line = Pareto front", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.66, 1))
    return fig


def write_plots(results_dir: str | Path, experiment: str | None = None) -> list[Path]:
    """One PNG per workload preset of the study: RESULTS_DIR/pareto-[EXPERIMENT-]PRESET.png."""
    import matplotlib.pyplot as plt

    records = [r for r in latest_by_cell(load_records(results_dir)).values() if r["status"] == "ok"]
    if experiment:
        records = [r for r in records if r.get("experiment") == experiment]
    by_preset: dict[str, list[dict]] = {}
    for r in records:
        by_preset.setdefault(r["config"]["workload"].get("preset"), []).append(r)
    paths = []
    for preset, rs in sorted(by_preset.items()):
        name = f"pareto-{experiment}-{preset}.png" if experiment else f"pareto-{preset}.png"
        fig = pareto_figure(rs, f"{experiment or 'records'} / {preset}")
        path = Path(results_dir) / name
        fig.savefig(path, metadata={"Software": None})  # no version stamp: the file changes only with the records
        plt.close(fig)
        paths.append(path)
    return paths
