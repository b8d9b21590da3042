"""Regression check between two record sets: `membench compare BASELINE_DIR CANDIDATE_DIR`.

Cells are matched by config_hash (latest record per cell on each side). A cell regresses when its status
falls from ok, its peak or model-state bytes grow by more than --mem-rtol, its counted FLOPs grow by more than
--flops-rtol, its quality worsens by more than --quality-atol, or (unless --time-rtol 0) its median step time
grows by more than --time-rtol. Memory and FLOPs are deterministic for a given config and library versions;
times are noisy, so their tolerance is loose by default. Exit code 1 when any cell regresses.
"""

from __future__ import annotations

from dataclasses import dataclass

from membench.records import latest_by_cell, load_records
from membench.report import _label


@dataclass
class Tolerances:
    mem_rtol: float = 0.01
    flops_rtol: float = 0.01
    quality_atol: float = 0.01
    time_rtol: float = 0.5  # 0 disables the time check


def _grew(new: float, old: float, rtol: float) -> bool:
    return old > 0 and (new - old) / old > rtol


def _checks(b: dict, c: dict, tol: Tolerances) -> list[str]:
    if b["status"] == "ok" and c["status"] != "ok":
        return [f"status ok -> {c['status']}"]
    if b["status"] != "ok" or c["status"] != "ok":
        return []
    bm, cm = b["memory"], c["memory"]
    out = []
    if _grew(cm["peak_bytes"], bm["peak_bytes"], tol.mem_rtol):
        out.append(f"peak {bm['peak_bytes'] / 2**20:.1f} -> {cm['peak_bytes'] / 2**20:.1f} MiB")
    for k, v in (cm.get("model_states") or {}).items():
        old = (bm.get("model_states") or {}).get(k)
        if old is not None and _grew(v, old, tol.mem_rtol):
            out.append(f"{k} {old / 2**20:.2f} -> {v / 2**20:.2f} MiB")
    bf, cf = b["flops"]["counted_per_step"], c["flops"]["counted_per_step"]
    if _grew(cf, bf, tol.flops_rtol):
        out.append(f"FLOPs {bf / 1e9:.2f} -> {cf / 1e9:.2f} G")
    bq, cq = b["quality"], c["quality"]
    worse = (bq["value"] - cq["value"]) if bq.get("higher_is_better") else (cq["value"] - bq["value"])
    if worse > tol.quality_atol:
        out.append(f"{bq['metric']} {bq['value']:.4f} -> {cq['value']:.4f}")
    bt, ct = b["timing"]["median_step_s"], c["timing"]["median_step_s"]
    if tol.time_rtol > 0 and _grew(ct, bt, tol.time_rtol):
        out.append(f"step {bt * 1e3:.1f} -> {ct * 1e3:.1f} ms")
    return out


def compare(baseline_dir: str, candidate_dir: str, tol: Tolerances, experiment: str | None = None):
    """Markdown table and the number of regressed cells."""

    def cells(d):
        rs = latest_by_cell(load_records(d))
        return {h: r for h, r in rs.items() if experiment is None or r.get("experiment") == experiment}

    base, cand = cells(baseline_dir), cells(candidate_dir)
    rows = ["| workload | techniques | verdict | details |", "|---|---|---|---|"]
    regressed = 0
    for h in sorted(base.keys() | cand.keys(), key=lambda h: _label(base.get(h) or cand[h])):
        r = base.get(h) or cand[h]
        name = f"{r['config']['workload'].get('preset')} | {_label(r)}"
        if h not in cand:
            rows.append(f"| {name} | missing | only in baseline |")
            continue
        if h not in base:
            rows.append(f"| {name} | new | only in candidate |")
            continue
        problems = _checks(base[h], cand[h], tol)
        regressed += bool(problems)
        rows.append(f"| {name} | {'REGRESSED' if problems else 'ok'} | {'; '.join(problems) or '-'} |")
    return "\n".join(rows), regressed
