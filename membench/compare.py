"""Regression check between two record sets: `membench compare BASELINE_DIR CANDIDATE_DIR [--format json]`.

Cells are matched by config_hash (latest record per cell on each side), and the hardware profile both sides
ran on is part of the match: a run with `run.device=auto` hashes the same on a laptop and on an H200, so a
cross-profile comparison is refused (exit 2) unless `--any-hardware`, which makes every time verdict
inconclusive (memory, FLOPs and quality are still judged).

What counts as a regression, by how each quantity behaves:
- status falls from ok;
- model-state bytes (params, grads, optimizer, technique extras) differ at all: they are exact tensor bytes;
- peak bytes or counted FLOPs grow by more than a relative tolerance (the tracker's peak moves slightly with
  allocator and library internals);
- quality: exact techniques (and the baseline) must reproduce the metric to `--quality-atol-exact` (0 = bit
  identical) on the same hardware profile, and to a relative `--quality-rtol-other-hardware` (1e-6: another CPU's
  fp32 rounding, see Tolerances) across profiles; approximate ones must stay inside the baseline's seed band (a 95% prediction interval over the
  cell's seeds) when the baseline has several seeds, or be no worse than the baseline's own run of that seed (a
  seed whose baseline already lay outside the band and reproduces is not a regression), else within `--quality-atol`;
- step time, a cell's seed group (cells that differ only in run.seed) with at least `--time-min-runs` (5) runs per
  side: one sample per run (its median step), one-sided Welch's t on their logs, p < `--time-run-alpha` (0.05)
  and a shift beyond `--time-min-effect`; the run is the unit of replication, so the drift between fresh runs
  is in the test's variance (no noise floor). Fewer runs: the raw per-step samples of both sides, pooled over the
  seed group, are compared with a one-sided Mann-Whitney U test (scipy.stats.mannwhitneyu) and the
  Hodges-Lehmann shift (median of pairwise differences) relative to the baseline median. A cell regresses only
  when both say so: p < `--time-alpha` and shift > max(`--time-min-effect`, `--time-noise-floor`). The test
  alone would flag a 1% change over many steps; the effect size alone would flag noise; the noise floor is the
  drift between fresh runs of identical code that a machine shows (scripts/gate_power.py measures it).

Verdicts, each row with its why: regressed (any of the above), improved (faster beyond the same thresholds,
a smaller peak, or a status that became ok), ok (judged, nothing moved), inconclusive (could not be judged:
fewer than `--time-min-steps` pooled timed steps per side, or so few that the exact test cannot reach alpha,
no step times, other hardware, a shift beyond the min effect that is not significant, a significant shift
inside the noise floor, or both sides failed). A cell that could not be judged is never "ok". `--confirm`
re-runs the candidate's regressed cells (same config, fresh records into the candidate folder) and counts a
cell as regressed only when it regresses again (TorchBench's re-run before a bisect).

Exit codes: 0 every compared cell judged (ok or improved) and none missing; 1 a cell regressed or is missing
on the candidate side; 2 usage error (missing folder, no cell in common, hardware differs without
--any-hardware); 3 nothing regressed or missing, but some cells inconclusive. The summary line counts each
verdict. `compare_bench` applies the same time verdict to two saved pytest-benchmark runs (make bench-compare).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from membench.errors import ConfigError
from membench.records import latest_by_cell, load_records
from membench.report import label, seed_group

MiB = 2**20
VERDICTS = ("regressed", "improved", "inconclusive", "ok", "missing", "new")
EXIT_OK, EXIT_REGRESSED, EXIT_USAGE, EXIT_INCONCLUSIVE = 0, 1, 2, 3
EXIT_MEANING = {
    EXIT_OK: "every compared cell judged, none regressed",
    EXIT_REGRESSED: "regressed or missing cells",
    EXIT_INCONCLUSIVE: "nothing regressed, but some cells inconclusive",
}


@dataclass
class Tolerances:
    peak_rtol: float = 0.01  # a peak more than 1% above the baseline fails
    flops_rtol: float = 0.01
    quality_atol: float = 0.01  # approximate techniques with a single seed
    quality_atol_exact: float = 0.0  # exact techniques: identical metric
    # Exact techniques on another hardware profile: the metric within this relative distance. Another CPU's kernels
    # (AVX2 vs AVX-512 widths, FMA, thread split) sum fp32 in another order, so the same code gives an eval loss a
    # few fp32 ulps away: 1e-6 is ~8 ulps (fp32 eps 1.19e-7), above the 3e-9 relative (1e-8 at 3.162) issue 20
    # saw between two CPUs, and far below what a changed computation does to the metric (bf16 autocast: 12%,
    # 3.162 -> 3.545 on results/checkpointing's gpt_small). Same profile: still bit-identical (quality_atol_exact).
    quality_rtol_other_hardware: float = 1e-6
    time_alpha: float = 0.01  # one-sided Mann-Whitney U significance level
    time_min_effect: float = 0.05  # Hodges-Lehmann shift / baseline median; 0 disables the time check
    time_min_steps: int = 20  # pooled timed steps per side below which a time verdict is inconclusive
    time_noise_floor: float = 0.0  # run-to-run drift of identical code: a shift inside it is inconclusive
    # With at least this many runs (a seed group's seeds) per side the verdict is taken on the runs, not the steps:
    # one sample per run (its median step), Welch's t on their logs, the run the unit of replication. Steps of one
    # run share its drift (docs/tracking.md: fresh runs of identical code differ by 3-5% median, up to 17%), so a
    # test on pooled steps mistakes that drift for a change; a test on runs carries it in its variance.
    time_min_runs: int = 5
    time_run_alpha: float = 0.05  # one-sided Welch on the runs: independent samples, so its false-alarm rate
    # The machine's load at the cells' starts (records' timing.load) differing by more than this many cores between
    # the sides: the step times are not compared (inconclusive). A loaded machine is another machine for step times:
    # llama's study re-run at load 3.3-4.5 against its records at 0.6-2.0 read 8 of 9 cells "regressed". 0: off.
    time_load_diff: float = 1.0
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
        "cpu_flags": sorted(set(env.get("cpu_flags") or [])),  # a flag named twice is the same CPU
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
        elif k == "cpu_flags" and a.get(k) != b.get(k):
            only_a, only_b = sorted(set(a[k]) - set(b[k])), sorted(set(b[k]) - set(a[k]))
            out.append(
                "CPU flags: " + ", ".join([*(f"{f} only in baseline" for f in only_a),
                                           *(f"{f} only in candidate" for f in only_b)])
            )  # fmt: skip
        elif a.get(k) != b.get(k):
            out.append(f"{k} {a.get(k)} vs {b.get(k)}")
    return sorted(out)


def _min_p(n_base: int, n_cand: int) -> float:
    """The smallest p the exact one-sided test can give: every candidate sample above every baseline one."""
    return 1 / math.comb(n_base + n_cand, n_cand)


def time_verdict(base: list[float], cand: list[float], tol: Tolerances) -> dict:
    """Verdict on two samples of step times (a cell's, or its seed group's pooled), with why.

    regressed / improved: the one-sided Mann-Whitney U test in that direction gives p < time_alpha AND the
    Hodges-Lehmann shift (median of pairwise differences, relative to the baseline median) is beyond
    max(time_min_effect, time_noise_floor). ok: enough steps, and the shift is inside time_min_effect (whether
    significant or not). inconclusive: too few steps for the measured power (time_min_steps per side) or for the
    test to reach alpha at all, no step times, a shift beyond time_min_effect that is not significant (a cell
    the test could not judge is not "ok"), or a significant one that stays inside the noise floor (the drift
    between two fresh runs of identical code on the machine)."""
    from scipy.stats import mannwhitneyu

    if not base or not cand:
        return {"verdict": "inconclusive", "why": "no step times"}
    shift = statistics.median(c - b for c in cand for b in base)  # Hodges-Lehmann estimate
    rel = shift / statistics.median(base)
    worse, better = (float(mannwhitneyu(cand, base, alternative=a).pvalue) for a in ("greater", "less"))
    p = worse if rel >= 0 else better
    out = {"p_value": p, "shift_rel": rel, "n_base": len(base), "n_cand": len(cand)}
    n = f"{len(base)} vs {len(cand)} steps"
    if _min_p(len(base), len(cand)) >= tol.time_alpha:
        return {**out, "verdict": "inconclusive", "why": f"{n}: the test cannot reach p<{tol.time_alpha}"}
    if min(len(base), len(cand)) < tol.time_min_steps:
        return {**out, "verdict": "inconclusive", "why": f"{n}: under the {tol.time_min_steps} per side for power"}
    floor = max(tol.time_min_effect, tol.time_noise_floor)
    if p < tol.time_alpha and abs(rel) > floor:
        return {**out, "verdict": "regressed" if rel > 0 else "improved", "why": f"shift beyond ±{floor:.0%}"}
    if abs(rel) <= tol.time_min_effect:
        return {**out, "verdict": "ok", "why": f"shift within ±{tol.time_min_effect:.0%}"}
    if p < tol.time_alpha:
        return {**out, "verdict": "inconclusive", "why": f"inside the noise floor {tol.time_noise_floor:.0%}"}
    return {**out, "verdict": "inconclusive", "why": f"shift beyond ±{tol.time_min_effect:.0%} but not significant"}


def run_verdict(base: list[list[float]], cand: list[list[float]], tol: Tolerances) -> dict:
    """Verdict on two sets of runs (each run's step times), one sample per run: the log of its median step.
    regressed / improved: one-sided Welch's t (scipy.stats.ttest_ind, unequal variances) in that direction gives
    p < time_run_alpha AND the shift (the ratio of the geometric means of the run medians, minus 1) is beyond
    time_min_effect; ok: the shift is inside time_min_effect; else inconclusive. No noise floor: the run-to-run
    drift is what the test's variance measures. Welch 1947, Biometrika 34:28-35."""
    from scipy.stats import ttest_ind

    meds = [[math.log(statistics.median(r)) for r in runs if r] for runs in (base, cand)]
    out = {"n_base": sum(map(len, base)), "n_cand": sum(map(len, cand)), "runs": [len(m) for m in meds]}
    if min(len(m) for m in meds) < 2:
        return {**out, "verdict": "inconclusive", "why": "fewer than 2 runs with step times on a side"}
    rel = math.exp(statistics.mean(meds[1]) - statistics.mean(meds[0])) - 1
    alt = "greater" if rel >= 0 else "less"
    p = float(ttest_ind(meds[1], meds[0], equal_var=False, alternative=alt).pvalue)
    if p != p:  # zero variance on both sides: the runs' medians are exact
        p = 0.0 if rel else 1.0
    out.update(p_value=p, shift_rel=rel, test="Welch t on run medians")
    n = f"{len(meds[0])} vs {len(meds[1])} runs"
    if p < tol.time_run_alpha and abs(rel) > tol.time_min_effect:
        why = f"{n}: shift beyond ±{tol.time_min_effect:.0%}"
        return {**out, "verdict": "regressed" if rel > 0 else "improved", "why": why}
    if abs(rel) <= tol.time_min_effect:
        return {**out, "verdict": "ok", "why": f"{n}: shift within ±{tol.time_min_effect:.0%}"}
    return {
        **out,
        "verdict": "inconclusive",
        "why": f"{n}: shift beyond ±{tol.time_min_effect:.0%} but not significant",
    }


def group_verdict(base: list[list[float]], cand: list[list[float]], tol: Tolerances) -> dict:
    """The time verdict of a seed group (each run's step times, the same seeds on both sides): on its runs (Welch on
    run medians) from `time_min_runs` runs per side, else on its steps pooled (Mann-Whitney)."""
    if len(base) >= max(tol.time_min_runs, 2):
        return run_verdict(base, cand, tol)
    return time_verdict([t for r in base for t in r], [t for r in cand for t in r], tol)


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


def _quality(b: dict, c: dict, band_values: list[float], tol: Tolerances, other_hw: bool = False) -> str | None:
    bq, cq = b["quality"], c["quality"]
    hib = bq.get("higher_is_better")
    worse = (bq["value"] - cq["value"]) if hib else (cq["value"] - bq["value"])
    what = f"{bq['metric']} {bq['value']:.4f} -> {cq['value']:.4f}"
    allowed = tol.quality_atol_exact
    if other_hw:  # another machine's floating-point rounding (Tolerances.quality_rtol_other_hardware)
        allowed = max(allowed, tol.quality_rtol_other_hardware * abs(bq["value"]))
    if _exact(c):
        if abs(worse) <= allowed:
            return None
        why = f"beyond rtol {tol.quality_rtol_other_hardware:g} for other hardware" if other_hw else "must reproduce"
        return f"{bq['metric']} {bq['value']:.8g} -> {cq['value']:.8g} (exact technique: {why})"
    if len(band_values) >= 2:
        # outside the band AND worse than the baseline's own run of this seed: a seed whose baseline value already
        # lay outside the band (one seed of ten can, the interval is 95%) is not a regression when it reproduces
        lo, hi = _band(band_values)
        outside = (cq["value"] < lo if hib else cq["value"] > hi) and worse > allowed
        return f"{what} outside seed band [{lo:.4f}, {hi:.4f}] (n={len(band_values)})" if outside else None
    return f"{what} (worse by {worse:.4f} > {tol.quality_atol})" if worse > tol.quality_atol else None


def _grew(new: float, old: float, rtol: float) -> bool:
    return old > 0 and (new - old) / old > rtol


def check_cell(
    b: dict, c: dict, band_values: list[float], tol: Tolerances, other_hw: bool = False
) -> tuple[list[str], list[str], list[str]]:
    """(problems, improvements, notes) for one matched cell on everything but step time; `other_hw`: the two ran
    on different hardware profiles (exact quality then allows floating-point noise)."""
    if b["status"] == "ok" and c["status"] != "ok":
        return [f"status ok -> {c['status']}"], [], []
    if b["status"] != "ok" and c["status"] == "ok":
        return [], [f"status {b['status']} -> ok"], []
    if b["status"] != "ok":
        return [], [], [f"status {b['status']} -> {c['status']}: nothing measured to compare"]
    bm, cm = b["memory"], c["memory"]
    problems, better = [], []
    peak = f"peak {bm['peak_bytes'] / MiB:.2f} -> {cm['peak_bytes'] / MiB:.2f} MiB"
    if _grew(cm["peak_bytes"], bm["peak_bytes"], tol.peak_rtol):
        problems.append(peak)
    elif _grew(bm["peak_bytes"], cm["peak_bytes"], tol.peak_rtol):
        better.append(peak)
    bs, cs = bm.get("model_states") or {}, cm.get("model_states") or {}
    for k in sorted(bs.keys() | cs.keys()):
        if bs.get(k) != cs.get(k):
            problems.append(f"{k} state bytes {bs.get(k)} -> {cs.get(k)}")
    bf, cf = b["flops"]["counted_per_step"], c["flops"]["counted_per_step"]
    if _grew(cf, bf, tol.flops_rtol):
        problems.append(f"FLOPs {bf / 1e9:.3f} -> {cf / 1e9:.3f} G")
    q = _quality(b, c, band_values, tol, other_hw)
    if q:
        problems.append(q)
    return problems, better, []


def time_text(b: list[dict], c: list[dict], tv: dict) -> str:
    """`step 7.10 -> 7.81 ms (shift +10.0%, p=1e-05, 60 vs 60 steps, 3 seeds pooled): regressed, why`."""
    med = [statistics.median(t for r in rs for t in r["timing"]["step_times_s"] or [math.nan]) for rs in (b, c)]
    text = f"step {med[0] * 1e3:.2f} -> {med[1] * 1e3:.2f} ms"
    if "p_value" in tv and "runs" in tv:
        text += (
            f" (shift {tv['shift_rel']:+.1%}, p={tv['p_value']:.2g}, {tv['runs'][0]} vs {tv['runs'][1]} runs: Welch)"
        )
    elif "p_value" in tv:
        seeds = f", {len(b)} seeds pooled" if len(b) > 1 else ""
        text += f" (shift {tv['shift_rel']:+.1%}, p={tv['p_value']:.2g}, {tv['n_base']} vs {tv['n_cand']} steps{seeds})"
    return f"{text}: time {tv['verdict']}, {tv['why']}"


def row_verdict(problems: list[str], better: list[str], notes: list[str], tv: dict) -> str:
    """regressed > inconclusive > improved > ok: a cell that could not be judged is never ok. `tv` is {} when
    the time check is off (--time-min-effect 0): the cell is then judged on the rest."""
    if problems or tv.get("verdict") == "regressed":
        return "regressed"
    if notes or tv.get("verdict") == "inconclusive":
        return "inconclusive"
    if better or tv.get("verdict") == "improved":
        return "improved"
    return "ok"


@dataclass
class Row:
    workload: str
    techniques: str
    seed: int | None
    verdict: str  # ok | regressed | improved | inconclusive | missing | new
    cell: str = ""  # config hash
    problems: list[str] = field(default_factory=list)
    improvements: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    time: dict = field(default_factory=dict)


def _cells(d: str, experiment: str | None) -> dict[str, dict]:
    rs = latest_by_cell(load_records(d))
    return {h: r for h, r in rs.items() if experiment is None or r.get("experiment") == experiment}


def _hardware(base: dict, cand: dict, common: set[str], tol: Tolerances) -> dict[str, list[str]]:
    diffs = {h: profile_diff(hardware_profile(base[h]), hardware_profile(cand[h])) for h in common}
    differing = {h: d for h, d in diffs.items() if d}
    if differing and not tol.any_hardware:
        example = next(iter(differing.values()))
        raise ConfigError(
            f"compare: {len(differing)} of {len(common)} cells ran on different hardware profiles "
            f"({'; '.join(example[:4])}); --any-hardware compares anyway and labels the times"
        )
    return differing


def _start_load(records: list[dict]) -> float | None:
    """Mean 1-minute load average at the cells' starts (None where a record has none)."""
    loads = [((r["timing"].get("load") or {}).get("start") or {}).get("load_avg_1m") for r in records]
    return None if any(x is None for x in loads) else statistics.mean(loads)


def _time_verdicts(base: dict, cand: dict, common: set[str], differing: dict, tol: Tolerances) -> dict[str, dict]:
    """{cell: time verdict}: cells that differ only in run.seed form one group whose step times are pooled on
    each side (the matched, ok cells of the group); a run on other hardware gets no time verdict."""
    groups: dict[str, list[str]] = {}
    for h in sorted(common, key=lambda h: base[h]["config"]["run"].get("seed") or 0):
        if base[h]["status"] == "ok" and cand[h]["status"] == "ok":
            groups.setdefault(seed_group(base[h]), []).append(h)
    out = {}
    for hs in groups.values():
        b, c = [base[h] for h in hs], [cand[h] for h in hs]
        tv = group_verdict(*([r["timing"]["step_times_s"] or [] for r in rs] for rs in (b, c)), tol)
        loads = [_start_load(rs) for rs in (b, c)]
        if any(differing.get(h) for h in hs):
            tv = {**tv, "verdict": "inconclusive", "why": "other hardware"}
        elif tol.time_load_diff and None not in loads and abs(loads[1] - loads[0]) > tol.time_load_diff:
            why = f"loads differ: {loads[0]:.1f} vs {loads[1]:.1f} (1-min load at the starts, > {tol.time_load_diff:g} apart)"
            tv = {**tv, "verdict": "inconclusive", "why": why}
        tv["text"] = time_text(b, c, tv)
        out.update(dict.fromkeys(hs, tv))
    return out


def compare_once(baseline_dir: str, candidate_dir: str, tol: Tolerances, experiment: str | None = None) -> dict:
    """Rows for every cell on either side plus the counts; raises ConfigError on a usage error."""
    base, cand = _cells(baseline_dir, experiment), _cells(candidate_dir, experiment)
    common = base.keys() & cand.keys()
    if not common:
        raise ConfigError(
            f"compare: no cell of {baseline_dir} ({len(base)} cells) matches one of {candidate_dir} "
            f"({len(cand)} cells); nothing to compare"
        )
    differing = _hardware(base, cand, common, tol)
    times = _time_verdicts(base, cand, common, differing, tol) if tol.time_min_effect > 0 else {}
    bands: dict[str, list[float]] = {}
    for r in base.values():
        if r["status"] == "ok":
            bands.setdefault(seed_group(r), []).append(r["quality"]["value"])
    rows = []
    for h in base.keys() | cand.keys():
        r = base.get(h) or cand[h]
        wl = f"{r['config']['workload'].get('preset')} b={r['config']['run']['batch_size']}"
        row = Row(wl, label(r), r["config"]["run"].get("seed"), "ok", h)
        if h not in cand:
            row.verdict, row.problems = "missing", ["only in baseline"]
        elif h not in base:
            row.verdict, row.notes = "new", ["only in candidate"]
        else:
            row.problems, row.improvements, row.notes = check_cell(
                base[h], cand[h], bands.get(seed_group(r), []), tol, bool(differing.get(h))
            )
            row.time = {k: v for k, v in times.get(h, {}).items() if k != "text"}
            row.verdict = row_verdict(row.problems, row.improvements, row.notes, row.time)
            if h in times:
                row.notes.append(times[h]["text"])
            if differing.get(h):
                row.notes.append("other hardware: " + "; ".join(differing[h]))
        rows.append(row)
    rows.sort(key=lambda r: (r.workload, r.techniques, r.seed if r.seed is not None else -1))
    counts = {v: sum(r.verdict == v for r in rows) for v in VERDICTS}
    return {
        "baseline": baseline_dir,
        "candidate": candidate_dir,
        "tolerances": asdict(tol),
        "counts": counts,
        "exit_code": exit_code(counts),
        "rows": [asdict(r) for r in rows],
        "time_shift": common_shift(times),
    }


def common_shift(times: dict[str, dict]) -> dict | None:
    """How the seed groups' step-time shifts spread. A shift that (nearly) every group shares is either a change
    every cell shares or the machine drifting between the two sweeps (a whole sweep moves against another taken at
    another time: docs/tracking.md, "The committed studies"); the verdicts cannot tell which, the line says so.
    None under 3 groups with a shift estimate."""
    seen: dict[int, float] = {}
    for tv in times.values():
        if tv.get("shift_rel") is not None and tv.get("why") != "other hardware":
            seen[id(tv)] = tv["shift_rel"]
    shifts = sorted(seen.values())
    if len(shifts) < 3:
        return None
    med = statistics.median(shifts)
    same = sum((x > 0) == (med > 0) for x in shifts if x != 0)
    return {"groups": len(shifts), "median": med, "min": shifts[0], "max": shifts[-1], "same_direction": same}


def shift_line(ts: dict | None, tol: Tolerances) -> str | None:
    if not ts:
        return None
    line = (f"step-time shift over {ts['groups']} seed groups: median {ts['median']:+.1%}, from "
            f"{ts['min']:+.1%} to {ts['max']:+.1%}; {ts['same_direction']} of {ts['groups']} moved that way")
    if abs(ts["median"]) > tol.time_min_effect / 2 and ts["same_direction"] >= 0.8 * ts["groups"]:
        line += (" (nearly every group moved the same way: a change every cell shares, or the machine drifting "
                 "between the two sweeps; --confirm re-runs the flagged cells; docs/tracking.md)")
    return line


def exit_code(counts: dict[str, int]) -> int:
    if counts["regressed"] or counts["missing"]:
        return EXIT_REGRESSED
    return EXIT_INCONCLUSIVE if counts["inconclusive"] else EXIT_OK


def compare_dirs(
    baseline_dir: str,
    candidate_dir: str,
    tol: Tolerances,
    experiment: str | None = None,
    rerun: Callable[[dict, str], dict] | None = None,
) -> dict:
    """compare_once; with `rerun` (--confirm: membench.sweep.rerun_cell), the candidate's regressed cells are re-run (fresh records into
    candidate_dir, which the second pass reads as the latest) and a cell counts as regressed only when it
    regresses in both passes."""
    first = compare_once(baseline_dir, candidate_dir, tol, experiment)
    flagged = {r["cell"]: r for r in first["rows"] if r["verdict"] == "regressed"}
    if rerun is None or not flagged:
        return first
    cand = _cells(candidate_dir, experiment)
    for h in flagged:
        rerun(cand[h], candidate_dir)
    second = compare_once(baseline_dir, candidate_dir, tol, experiment)
    for r in second["rows"]:
        was = flagged.get(r["cell"])
        if was and r["verdict"] == "regressed":
            r["notes"].append("confirmed: regressed again on a re-run")
        elif was:
            r["notes"].append("flagged, cleared by a re-run; first pass: " + "; ".join(was["problems"] + was["notes"]))
        elif r["verdict"] == "regressed":  # only through its seed group's pooled times: not flagged at first
            r["verdict"] = next(x["verdict"] for x in first["rows"] if x["cell"] == r["cell"])
    second["counts"] = {v: sum(r["verdict"] == v for r in second["rows"]) for v in VERDICTS}
    second["exit_code"] = exit_code(second["counts"])
    second["confirmed"] = sorted(flagged)
    return second


def _bench_machine(doc: dict) -> dict:
    m = doc.get("machine_info") or {}
    return {
        "cpu": (m.get("cpu") or {}).get("brand_raw"),
        "machine": m.get("machine"),
        "python": m.get("python_version"),
    }


def compare_bench(old: dict, new: dict, tol: Tolerances) -> dict:
    """The time verdict on two saved pytest-benchmark runs (JSON documents saved with --benchmark-save-data: each
    benchmark's raw round times in stats.data), one row per benchmark, counted and exit-coded like compare."""
    before = {b["fullname"]: b for b in old["benchmarks"]}
    after = {b["fullname"]: b for b in new["benchmarks"]}
    if not before.keys() & after.keys():
        raise ConfigError("bench compare: no benchmark in common between the two saved runs; nothing to compare")
    other = profile_diff(_bench_machine(old), _bench_machine(new))
    rows = []
    for name in sorted(before.keys() | after.keys()):
        row = Row(name, (before.get(name) or after[name]).get("group") or "-", None, "ok", name)
        if name not in after:
            row.verdict, row.problems = "missing", ["only in the older run"]
        elif name not in before:
            row.verdict, row.notes = "new", ["only in the newer run"]
        else:
            b, c = before[name]["stats"].get("data") or [], after[name]["stats"].get("data") or []
            tv = time_verdict(b, c, tol)
            if other:
                tv = {**tv, "verdict": "inconclusive", "why": "other hardware: " + "; ".join(other)}
            runs = [{"timing": {"step_times_s": x}} for x in (b, c)]
            row.time, row.verdict = tv, row_verdict([], [], [], tv)
            (row.problems if tv["verdict"] == "regressed" else row.notes).append(time_text(runs[:1], runs[1:], tv))
        rows.append(row)
    counts = {v: sum(r.verdict == v for r in rows) for v in VERDICTS}
    return {
        "tolerances": asdict(tol),
        "counts": counts,
        "exit_code": exit_code(counts),
        "rows": [asdict(r) for r in rows],
    }


def markdown(result: dict) -> str:
    lines = ["| workload | techniques | seed | verdict | details |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        details = "; ".join(r["problems"] + r["improvements"] + r["notes"]) or "-"
        lines.append(f"| {r['workload']} | {r['techniques']} | {r['seed']} | {r['verdict']} | {details} |")
    shift = shift_line(result.get("time_shift"), Tolerances(**result["tolerances"]))
    lines += ["", *([shift] if shift else []), summary(result)]
    return "\n".join(lines)


def summary(result: dict) -> str:
    c, code = result["counts"], result["exit_code"]
    counts = ", ".join(f"{c[v]} {v}" for v in VERDICTS if v not in ("missing", "new"))
    return (
        f"membench: {counts}; {c['missing']} missing in candidate, {c['new']} new; exit {code} ({EXIT_MEANING[code]})"
    )


def compare(
    baseline_dir: str,
    candidate_dir: str,
    tol: Tolerances,
    experiment: str | None = None,
    fmt: str = "markdown",
    rerun: Callable[[dict, str], dict] | None = None,
):
    """(text, exit code): the text is markdown or JSON."""
    result = compare_dirs(baseline_dir, candidate_dir, tol, experiment, rerun)
    text = json.dumps(result, indent=1) if fmt == "json" else markdown(result)
    return text, result["exit_code"]


def gate_table(results_root) -> str:
    """Markdown, one row per committed study (results/*/runs): how much timing compare has to judge it by, and what
    it says of a copy of the study with every step time raised 10% (the check of tracking.md, issue 19): regressed
    / inconclusive / ok cells (an ok there would be a missed slowdown). A seed group of `time_min_runs` seeds or
    more is judged on its runs, smaller ones on their pooled steps, as `compare` does."""
    from pathlib import Path

    tol = Tolerances()
    lines = [
        "| study | ok cells | seeds per cell | timed steps per cell | load at cell starts (1 min, 2 cores) "
        "| steps' IQR / median: median, max | a +10% copy: regressed / inconclusive / ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in sorted(p.parent for p in Path(results_root).glob("*/runs")):
        rs = [r for r in latest_by_cell(load_records(d)).values() if r["status"] == "ok"]
        rs = [r for r in rs if r["timing"].get("step_times_s")]
        if not rs:
            continue
        groups: dict[str, list[dict]] = {}
        for r in rs:
            groups.setdefault(seed_group(r), []).append(r)
        counts = dict.fromkeys(("regressed", "inconclusive", "ok", "improved"), 0)
        for g in groups.values():
            runs = [r["timing"]["step_times_s"] for r in g]
            counts[group_verdict(runs, [[t * 1.10 for t in x] for x in runs], tol)["verdict"]] += len(g)
        steps = sorted({len(r["timing"]["step_times_s"]) for r in rs})
        loads = [((r["timing"].get("load") or {}).get("start") or {}).get("load_avg_1m") for r in rs]
        loads = [x for x in loads if x is not None]
        spread = sorted(
            (q[2] - q[0]) / q[1]
            for q in (
                statistics.quantiles(r["timing"]["step_times_s"], n=4)
                for r in rs
                if len(r["timing"]["step_times_s"]) >= 2
            )
        )
        seeds = sorted({len(g) for g in groups.values()})
        lines.append(
            f"| {d.name} | {len(rs)} | {'/'.join(map(str, seeds))} "
            f"| {steps[0]}{f'-{steps[-1]}' if steps[-1] != steps[0] else ''} "
            f"| {f'{min(loads):.1f}-{max(loads):.1f}' if loads else '-'} "
            f"| {f'{statistics.median(spread):.0%}, {spread[-1]:.0%}' if spread else '-'} "
            f"| {counts['regressed']} / {counts['inconclusive']} / {counts['ok']} |"
        )
    return "\n".join(lines)
