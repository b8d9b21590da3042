"""Regression check between two record sets: `membench compare BASELINE_DIR CANDIDATE_DIR [--format json]`.

Cells are matched by config_hash (latest record per cell on each side), and the hardware profile both sides
ran on is part of the match: a run with `run.device=auto` hashes the same on a laptop and on an H200, so a
cross-profile comparison is refused (exit 2) unless `--any-hardware`, which labels every time verdict.

What counts as a regression, by how each quantity behaves:
- status falls from ok;
- model-state bytes (params, grads, optimizer, technique extras) differ at all: they are exact tensor bytes;
- peak bytes or counted FLOPs grow by more than a relative tolerance (the tracker's peak moves slightly with
  allocator and library internals);
- quality: exact techniques (and the baseline) must reproduce the metric to `--quality-atol-exact` (0 = bit
  identical); approximate ones must stay inside the baseline's seed band (a 95% prediction interval over the
  cell's seeds) when the baseline has several seeds, else within `--quality-atol`;
- step time: the raw per-step samples of both sides are compared with a one-sided Mann-Whitney U test
  (scipy.stats.mannwhitneyu) and the Hodges-Lehmann shift (median of pairwise differences) relative to the
  baseline median. A cell regresses only when both say so: p < `--time-alpha` and shift > `--time-min-effect`.
  The test alone would flag a 1% change over many steps; the effect size alone would flag noise.

Exit codes: 0 every matched cell passes and none is missing; 1 a cell regressed or is missing on the candidate
side; 2 usage error (missing folder, no cell in common, hardware differs without --any-hardware).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field

from membench.errors import ConfigError
from membench.records import latest_by_cell, load_records
from membench.report import label, seed_group

MiB = 2**20


@dataclass
class Tolerances:
    peak_rtol: float = 0.01  # a peak more than 1% above the baseline fails
    flops_rtol: float = 0.01
    quality_atol: float = 0.01  # approximate techniques with a single seed
    quality_atol_exact: float = 0.0  # exact techniques: identical metric
    time_alpha: float = 0.01  # one-sided Mann-Whitney U significance level
    time_min_effect: float = 0.05  # Hodges-Lehmann shift / baseline median; 0 disables the time check
    any_hardware: bool = False


def hardware_profile(r: dict) -> dict:
    """What decides the numbers besides the config: device, CPU model and flags, GPU, library versions,
    threads. The git commit is not in it: the code change is what a compare is for."""
    env = r.get("env") or {}
    return {
        "device": env.get("device"),
        "gpu": env.get("gpu"),
        "cuda": env.get("cuda"),
        "cpu": env.get("cpu"),
        "cpu_flags": sorted(env.get("cpu_flags") or []),
        "torch_threads": env.get("torch_threads"),
        "python": env.get("python"),
        "versions": env.get("versions") or {},
    }


def profile_diff(a: dict, b: dict) -> list[str]:
    out = []
    for k in a.keys() | b.keys():
        if k == "versions":
            # a library one side did not record (an older record) is unknown, not different; None = not installed
            for lib in sorted(a[k].keys() & b[k].keys()):
                if a[k].get(lib) != b[k].get(lib):
                    out.append(f"{lib} {a[k].get(lib)} vs {b[k].get(lib)}")
        elif a.get(k) != b.get(k):
            out.append(f"{k} {a.get(k)} vs {b.get(k)}")
    return sorted(out)


def time_verdict(base: list[float], cand: list[float], tol: Tolerances) -> dict:
    """Rank test plus effect size on raw step times. `regressed` is None when there are too few samples
    for the test to ever reach `time_alpha`."""
    from scipy.stats import mannwhitneyu

    if not base or not cand:
        return {"regressed": None, "why": "no step times"}
    p = float(mannwhitneyu(cand, base, alternative="greater").pvalue)
    shift = statistics.median(c - b for c in cand for b in base)  # Hodges-Lehmann estimate
    rel = shift / statistics.median(base)
    # smallest p the exact test can give with these sample sizes (all candidate samples above all baseline)
    floor = 1 / math.comb(len(base) + len(cand), len(cand))
    out = {"p_value": p, "shift_rel": rel, "n_base": len(base), "n_cand": len(cand)}
    if floor >= tol.time_alpha:
        return {**out, "regressed": None, "why": f"too few steps ({len(base)} vs {len(cand)}) for p<{tol.time_alpha}"}
    return {**out, "regressed": p < tol.time_alpha and rel > tol.time_min_effect}


def _band(values: list[float]) -> tuple[float, float]:
    """95% prediction interval for one more seed: mean +- t * sd * sqrt(1 + 1/n)."""
    from scipy.stats import t

    n, m, sd = len(values), statistics.mean(values), statistics.stdev(values)
    half = t.ppf(0.975, n - 1) * sd * math.sqrt(1 + 1 / n)
    return m - half, m + half


def _exact(r: dict) -> bool:
    """No technique, or only exact ones. Records older than the exactness field count as exact only when
    they have no technique."""
    if r.get("exactness") is None:
        return not r.get("techniques")
    return all(e.get("exact") for e in r["exactness"].values())


def _quality(b: dict, c: dict, band_values: list[float], tol: Tolerances) -> str | None:
    bq, cq = b["quality"], c["quality"]
    hib = bq.get("higher_is_better")
    worse = (bq["value"] - cq["value"]) if hib else (cq["value"] - bq["value"])
    what = f"{bq['metric']} {bq['value']:.4f} -> {cq['value']:.4f}"
    if _exact(c):
        return f"{what} (exact technique: must reproduce)" if abs(worse) > tol.quality_atol_exact else None
    if len(band_values) >= 2:
        lo, hi = _band(band_values)
        outside = cq["value"] < lo if hib else cq["value"] > hi
        return f"{what} outside seed band [{lo:.4f}, {hi:.4f}] (n={len(band_values)})" if outside else None
    return f"{what} (worse by {worse:.4f} > {tol.quality_atol})" if worse > tol.quality_atol else None


def _grew(new: float, old: float, rtol: float) -> bool:
    return old > 0 and (new - old) / old > rtol


def check_cell(
    b: dict, c: dict, band_values: list[float], tol: Tolerances, other_hardware: bool = False
) -> tuple[list[str], list[str], dict]:
    """(problems, notes, time verdict) for one matched cell; `other_hardware` labels the time verdict."""
    if b["status"] == "ok" and c["status"] != "ok":
        return [f"status ok -> {c['status']}"], [], {}
    if b["status"] != "ok" or c["status"] != "ok":
        return [], [f"status {b['status']} -> {c['status']}"], {}
    bm, cm = b["memory"], c["memory"]
    problems, notes = [], []
    if _grew(cm["peak_bytes"], bm["peak_bytes"], tol.peak_rtol):
        problems.append(f"peak {bm['peak_bytes'] / MiB:.2f} -> {cm['peak_bytes'] / MiB:.2f} MiB")
    bs, cs = bm.get("model_states") or {}, cm.get("model_states") or {}
    for k in sorted(bs.keys() | cs.keys()):
        if bs.get(k) != cs.get(k):
            problems.append(f"{k} state bytes {bs.get(k)} -> {cs.get(k)}")
    bf, cf = b["flops"]["counted_per_step"], c["flops"]["counted_per_step"]
    if _grew(cf, bf, tol.flops_rtol):
        problems.append(f"FLOPs {bf / 1e9:.3f} -> {cf / 1e9:.3f} G")
    q = _quality(b, c, band_values, tol)
    if q:
        problems.append(q)
    tv: dict = {}
    if tol.time_min_effect > 0:
        tv = time_verdict(b["timing"]["step_times_s"], c["timing"]["step_times_s"], tol)
        bt, ct = b["timing"]["median_step_s"], c["timing"]["median_step_s"]
        label = " (other hardware)" if other_hardware else ""
        text = f"step {bt * 1e3:.2f} -> {ct * 1e3:.2f} ms"
        if "p_value" in tv:
            text += f" (shift {tv['shift_rel']:+.1%}, p={tv['p_value']:.2g})"
        if tv["regressed"]:
            problems.append(text + label)
        elif tv["regressed"] is None:
            notes.append(f"{text}: no time verdict, {tv['why']}{label}")
        else:
            notes.append(text + label)
    return problems, notes, tv


@dataclass
class Row:
    workload: str
    techniques: str
    seed: int | None
    verdict: str  # ok | REGRESSED | missing | new
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    time: dict = field(default_factory=dict)


def _cells(d: str, experiment: str | None) -> dict[str, dict]:
    rs = latest_by_cell(load_records(d))
    return {h: r for h, r in rs.items() if experiment is None or r.get("experiment") == experiment}


def compare_dirs(baseline_dir: str, candidate_dir: str, tol: Tolerances, experiment: str | None = None) -> dict:
    """Rows for every cell on either side plus the hardware profiles; raises ConfigError on a usage error."""
    base, cand = _cells(baseline_dir, experiment), _cells(candidate_dir, experiment)
    common = base.keys() & cand.keys()
    if not common:
        raise ConfigError(
            f"compare: no cell of {baseline_dir} ({len(base)} cells) matches one of {candidate_dir} "
            f"({len(cand)} cells); nothing to compare"
        )
    diffs = {h: profile_diff(hardware_profile(base[h]), hardware_profile(cand[h])) for h in common}
    differing = {h: d for h, d in diffs.items() if d}
    if differing and not tol.any_hardware:
        example = next(iter(differing.values()))
        raise ConfigError(
            f"compare: {len(differing)} of {len(common)} cells ran on different hardware profiles "
            f"({'; '.join(example[:4])}); --any-hardware compares anyway and labels the times"
        )
    groups: dict[str, list[float]] = {}
    for r in base.values():
        if r["status"] == "ok":
            groups.setdefault(seed_group(r), []).append(r["quality"]["value"])
    rows = []
    for h in base.keys() | cand.keys():
        r = base.get(h) or cand[h]
        wl = f"{r['config']['workload'].get('preset')} b={r['config']['run']['batch_size']}"
        row = Row(wl, label(r), r["config"]["run"].get("seed"), "ok")
        if h not in cand:
            row.verdict = "missing"
            row.problems = ["only in baseline"]
        elif h not in base:
            row.verdict = "new"
            row.notes = ["only in candidate"]
        else:
            band = groups.get(seed_group(r), [])
            row.problems, row.notes, row.time = check_cell(base[h], cand[h], band, tol, bool(differing.get(h)))
            row.verdict = "REGRESSED" if row.problems else "ok"
            if differing.get(h):
                row.notes.append("other hardware: " + "; ".join(differing[h]))
        rows.append(row)
    rows.sort(key=lambda r: (r.workload, r.techniques, r.seed if r.seed is not None else -1))
    counts = {v: sum(r.verdict == v for r in rows) for v in ("ok", "REGRESSED", "missing", "new")}
    return {
        "baseline": baseline_dir,
        "candidate": candidate_dir,
        "tolerances": asdict(tol),
        "counts": counts,
        "exit_code": 1 if counts["REGRESSED"] or counts["missing"] else 0,
        "rows": [asdict(r) for r in rows],
    }


def markdown(result: dict) -> str:
    lines = ["| workload | techniques | seed | verdict | details |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        details = "; ".join(r["problems"] + r["notes"]) or "-"
        lines.append(f"| {r['workload']} | {r['techniques']} | {r['seed']} | {r['verdict']} | {details} |")
    c = result["counts"]
    lines.append("")
    lines.append(
        f"membench: {c['REGRESSED']} cell(s) regressed, {c['missing']} missing in candidate, {c['new']} new, "
        f"{c['ok']} ok"
    )
    return "\n".join(lines)


def compare(baseline_dir: str, candidate_dir: str, tol: Tolerances, experiment: str | None = None, fmt="markdown"):
    """(text, exit code): the text is markdown or JSON."""
    result = compare_dirs(baseline_dir, candidate_dir, tol, experiment)
    text = json.dumps(result, indent=1) if fmt == "json" else markdown(result)
    return text, result["exit_code"]
