"""`membench history RESULTS_DIR [FILTER]`: peak, step time and quality of each cell over the commits its
records were measured at (env.git.commit), as a markdown table and a PNG (matplotlib, Agg backend).

Every record counts here, not only the latest per cell: records are append-only, so re-running a study after
a change adds a point. Commits are ordered by their first record's run_id (a UTC timestamp). The `hw` column
is a short hash of the hardware profile (membench.compare.hardware_profile): a step-time jump where it
changes is the machine, not the code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from membench.compare import hardware_profile
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


def table(commits: list[str], cells: dict[str, dict[str, dict]]) -> str:
    rows = ["| cell | commit | date | hw | peak MiB | median step ms | IQR ms | quality |", "|" + "---|" * 8]
    for name in sorted(cells):
        for c in commits:
            r = cells[name].get(c)
            if r is None:
                continue
            t, q = r["timing"], r["quality"]
            rows.append(
                f"| {name} | {c} | {r['run_id'][:8]} | {_hw(r)} | {r['memory']['peak_bytes'] / MiB:.2f} "
                f"| {t['median_step_s'] * 1e3:.2f} | {t['iqr_step_s'] * 1e3:.2f} | {q['metric']}={q['value']:.4f} |"
            )
    return "\n".join(rows)


PANELS = (
    ("peak memory (MiB)", lambda r: r["memory"]["peak_bytes"] / MiB),
    ("median step time (ms)", lambda r: r["timing"]["median_step_s"] * 1e3),
    ("quality", lambda r: r["quality"]["value"]),
)


def figure(commits: list[str], cells: dict[str, dict[str, dict]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(12, 3.8), dpi=80)
    for ax, (ylabel, get) in zip(axes, PANELS, strict=True):
        for name in sorted(cells):
            xs = [i for i, c in enumerate(commits) if c in cells[name]]
            ax.plot(xs, [get(cells[name][commits[i]]) for i in xs], marker="o", label=name)
        ax.set_xticks(range(len(commits)), commits, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if len(cells) <= 12:  # beyond that a legend hides the plot; the table names every cell
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", fontsize=7, ncol=2, frameon=False)
        fig.tight_layout(rect=(0, 0.06 * ((len(cells) + 1) // 2), 1, 1))
    else:
        fig.tight_layout()
    return fig


def write_history(results_dir: str | Path, name_filter: str | None = None, out: str | None = None):
    """(markdown text, PNG path or None when no record matches)."""
    import matplotlib.pyplot as plt

    commits, cells = history(load_records(results_dir), name_filter)
    head = f"# membench history: {results_dir}" + (f" (cells matching {name_filter!r})" if name_filter else "")
    if not cells:
        return head + "\n\nno ok records" + (f" match {name_filter!r}" if name_filter else ""), None
    fig = figure(commits, cells)
    path = Path(out) if out else Path(results_dir) / "history.png"
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return f"{head}\n\n{table(commits, cells)}", path
