"""Measure this machine's step-time noise and the power of `membench compare`'s time verdict.

    python scripts/gate_power.py collect --raw /tmp/gate_power/raw.json        # real runs (~20 min wall, 2 cores)
    python scripts/gate_power.py analyse --raw /tmp/gate_power/raw.json        # rates -> results/tracking/

collect: per workload, RUNS identical fresh runs of one cell (`membench run -m run.results_dir=d000,d001,...`:
one child process each, nothing differs but the run id), in blocks of 2 * SEEDS: the first SEEDS runs of a block
are a "baseline" seed group, the next SEEDS the "candidate" group. `uptime` load is recorded before and after.
analyse: for each number of timed steps k (the first k of each run) and each group size s (1 run per side, or
s runs pooled, as compare pools a cell's seeds), replays membench.compare.time_verdict on
- identical code: the fresh pair as is (a "regressed" here is a false alarm);
- a 10% slowdown: the candidate's step times multiplied by 1.10 (the standard injection);
and counts detections and false alarms under each rule (the plain rank test, and the noise-aware rule that
compare uses by default). The rates with their counts go to results/tracking/gate_power.json and the table
printed here is the one in docs/tracking.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORKLOADS = ("gpt_tiny", "digits_cnn_tiny", "llama_tiny")
STEPS = (5, 10, 20, 40)
WITHIN = (3, 5, 10, 20)  # steps per side when a run's even steps face its odd steps
SEEDS = 3  # runs per side in a pooled trial
SLOWDOWN = 1.10
FACTORS = (1.05, 1.10, 1.25, 1.5, 2.0, 3.0)  # slowdowns tried for the smallest one caught in 90% of trials


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def collect(raw: Path, runs: int, measure_steps: int, work: Path) -> None:
    out = {"measure_steps": measure_steps, "seeds_per_side": SEEDS, "workloads": {}}
    for wl in WORKLOADS:
        dirs = [work / wl / f"r{i:03d}" for i in range(runs)]
        argv = [sys.executable, "-m", "membench.cli", "run", "-m", f"workload={wl}", "run.num_threads=1"]
        argv += [f"run.results_dir={','.join(map(str, dirs))}", "run.warmup_steps=2"]
        argv += [f"run.measure_steps={measure_steps}", f"run.train_steps={measure_steps + 4}"]
        load0, t0 = _load(), time.time()
        subprocess.run(
            argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        times = []
        for d in dirs:
            (rec,) = [json.loads(p.read_text()) for p in (d / "runs").glob("*.json")]
            times.append(rec["timing"]["step_times_s"])
        out["workloads"][wl] = {"load_before": load0, "load_after": _load(), "wall_s": round(time.time() - t0, 1)}
        out["workloads"][wl]["step_times_s"] = times
        print(wl, out["workloads"][wl]["load_before"], out["workloads"][wl]["load_after"], flush=True)
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(out))


def _trials(times: list[list[float]], s: int, k: int):
    """(baseline, candidate, confirming candidate) samples: blocks of 2 * SEEDS runs; s=1 pairs run j with run
    SEEDS + j (confirmed by the next candidate run), s=SEEDS pools each half of a block."""
    cut = [t[:k] for t in times]
    for b in range(0, len(cut) - 2 * SEEDS + 1, 2 * SEEDS):
        base, cand = cut[b : b + SEEDS], cut[b + SEEDS : b + 2 * SEEDS]
        if s == 1:
            for j in range(SEEDS):
                yield base[j], cand[j], cand[(j + 1) % SEEDS]
        else:
            yield sum(base, []), sum(cand, []), None


def _within(times: list[list[float]], k: int, s: int = 1):
    """Within runs: the even steps against the odd steps (k each per run, s runs pooled), as if two runs had no
    drift between them."""
    for i in range(0, len(times) - s + 1, s):
        yield (
            sum((t[0 : 2 * k : 2] for t in times[i : i + s]), []),
            sum((t[1 : 2 * k : 2] for t in times[i : i + s]), []),
            None,
        )


def _rates(trials, tol) -> dict:
    """Verdict counts on identical code and on the 10% injection (with --confirm's second pass for s=1), and
    the smallest of FACTORS caught in >= 90% of trials."""
    from membench.compare import time_verdict

    trials = list(trials)
    same, slow, same_c, slow_c, n = Counter(), Counter(), Counter(), Counter(), 0
    caught = {}
    for f in FACTORS:
        hits = sum(time_verdict(b, [x * f for x in c], tol)["verdict"] == "regressed" for b, c, _ in trials)
        caught[f] = hits / len(trials)
    for base, cand, again in trials:
        n += 1
        v0 = time_verdict(base, cand, tol)["verdict"]
        v1 = time_verdict(base, [x * SLOWDOWN for x in cand], tol)["verdict"]
        same[v0] += 1
        slow[v1] += 1
        if again is not None:  # confirm: regressed only when the re-run regresses too
            same_c["regressed"] += v0 == "regressed" and time_verdict(base, again, tol)["verdict"] == "regressed"
            w = time_verdict(base, [x * SLOWDOWN for x in again], tol)["verdict"]
            slow_c["regressed"] += v1 == "regressed" and w == "regressed"
    out = {"trials": n, "identical": dict(same), "slowdown": dict(slow)}
    out["smallest_caught_90"] = next((f for f in FACTORS if caught[f] >= 0.9), None)
    if trials[0][2] is not None:
        out["confirmed_false_alarms"], out["confirmed_detections"] = same_c["regressed"], slow_c["regressed"]
    return out


RUNS_PER_SIDE = (3, 5, 7, 10)  # the run-level rule (Welch on run medians): runs per side
DRAWS = 400  # trials per setting, each 2 * s distinct runs drawn at random from the workload's runs


def _run_rates(times: list[list[float]], s: int, k: int, tol) -> dict:
    """compare's run-level verdict (membench.compare.run_verdict) on DRAWS trials of s runs against s other runs
    (first k steps each), drawn at random (seeded) from the fresh runs: identical code as drawn, and the candidate
    runs x1.10. Runs are reused across trials (the trials are not independent; each is a pair of fresh run sets)."""
    import random

    from membench.compare import run_verdict

    rng = random.Random(s * 1000 + k)
    cut = [t[:k] for t in times]
    trials = []
    for _ in range(DRAWS):
        idx = rng.sample(range(len(cut)), 2 * s)
        trials.append(([cut[i] for i in idx[:s]], [cut[i] for i in idx[s:]]))
    same = Counter(run_verdict(b, c, tol)["verdict"] for b, c in trials)
    slow = Counter(run_verdict(b, [[x * SLOWDOWN for x in r] for r in c], tol)["verdict"] for b, c in trials)
    caught = {
        f: sum(run_verdict(b, [[x * f for x in r] for r in c], tol)["verdict"] == "regressed" for b, c in trials)
        for f in FACTORS
    }
    return {
        "trials": DRAWS,
        "identical": dict(same),
        "slowdown": dict(slow),
        "smallest_caught_90": next((f for f in FACTORS if caught[f] >= 0.9 * DRAWS), None),
    }


def _shift(base, cand) -> float:
    return statistics.median(c - b for c in cand for b in base) / statistics.median(base)


def noise(times: list[list[float]], k: int) -> dict:
    """Within a run: IQR / median of its steps (median over runs). Run to run: |Hodges-Lehmann shift| between
    the identical fresh pairs (s=1), median and 95th percentile."""
    iqr = [(q[2] - q[0]) / q[1] for q in (statistics.quantiles(t[:k], n=4) for t in times)]
    drift = sorted(abs(_shift(b, c)) for b, c, _ in _trials(times, 1, k))
    pooled = sorted(abs(_shift(b, c)) for b, c, _ in _trials(times, SEEDS, k))
    q95 = lambda xs: xs[min(len(xs) - 1, int(0.95 * len(xs)))]  # noqa: E731
    return {
        "within_run_iqr_rel": round(statistics.median(iqr), 4),
        "run_to_run_drift_median": round(statistics.median(drift), 4),
        "run_to_run_drift_q95": round(q95(drift), 4),
        "pooled_drift_q95": round(q95(pooled), 4),
    }


def analyse(raw: Path, out: Path) -> None:
    from membench.compare import Tolerances

    data = json.loads(raw.read_text())
    wls = data["workloads"]
    # the noise floor a shared machine needs: the largest run-to-run drift (q95) over the workloads at full length
    floor = max(noise(w["step_times_s"], max(STEPS))["run_to_run_drift_q95"] for w in wls.values())
    plain = Tolerances(time_min_steps=0)
    rules = {"plain": plain, "floor": Tolerances(time_min_steps=0, time_noise_floor=floor)}
    res = {"slowdown": SLOWDOWN, "noise_floor": floor, "workloads": {}}
    for wl, w in wls.items():
        times = w["step_times_s"]
        r = {"runs": len(times), "load": [w["load_before"], w["load_after"]], "noise": noise(times, max(STEPS))}
        r["rates"] = [
            {"pairs": "within a run", "rule": "plain", "seeds": s, "steps": k, **_rates(_within(times, k, s), plain)}
            for s in (1, SEEDS)
            for k in WITHIN
        ]
        r["rates"] += [
            {"pairs": "fresh runs", "rule": name, "seeds": s, "steps": k, **_rates(_trials(times, s, k), tol)}
            for name, tol in rules.items()
            for s in (1, SEEDS)
            for k in STEPS
        ]
        r["rates"] += [
            {
                "pairs": "fresh runs, drawn",
                "rule": "runs",
                "seeds": s,
                "steps": k,
                **_run_rates(times, s, k, Tolerances()),
            }
            for s in RUNS_PER_SIDE
            for k in (20, 40)
            if 2 * s <= len(times)
        ]
        res["workloads"][wl] = r
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(table(res))
    print(f"\nnoise floor (largest run-to-run drift q95): {floor:.1%}; for docs/tracking.md:\n")
    print(table(res, DOC_ROWS))


def _factor(f: float | None) -> str:
    return f"x{f}" if f else f"none up to x{max(FACTORS)}"


DOC_ROWS = {  # the rows docs/tracking.md shows: (pairs, rule, runs per side, steps per run); the JSON has all
    ("within a run", "plain", 1, 5),
    ("within a run", "plain", 1, 20),
    ("within a run", "plain", SEEDS, 20),
    ("fresh runs", "plain", 1, 5),
    ("fresh runs", "plain", 1, 40),
    ("fresh runs", "plain", SEEDS, 40),
    ("fresh runs", "floor", 1, 40),
    ("fresh runs", "floor", SEEDS, 40),
    ("fresh runs, drawn", "runs", 5, 20),
    ("fresh runs, drawn", "runs", 10, 20),
    ("fresh runs, drawn", "runs", 10, 40),
}


def table(res: dict, rows: set | None = None) -> str:
    pct = lambda a, n: f"{a}/{n} ({a / n:.0%})"  # noqa: E731
    lines = [
        "| workload | load (1 min) | pairs | rule | runs/side | steps/run | 10% caught | identical ok "
        "| identical regressed | identical inconclusive | with --confirm: caught, false alarms | caught in 90% |",
        "|" + "---|" * 12,
    ]
    for wl, w in res["workloads"].items():
        for r in w["rates"]:
            if rows and (r["pairs"], r["rule"], r["seeds"], r["steps"]) not in rows:
                continue
            n, same, slow = r["trials"], r["identical"], r["slowdown"]
            conf = (
                f"{pct(r['confirmed_detections'], n)}, {pct(r['confirmed_false_alarms'], n)}"
                if "confirmed_detections" in r
                else "-"
            )
            lines.append(
                f"| {wl} | {w['load'][0][0]}-{w['load'][1][0]} | {r['pairs']} | {r['rule']} | {r['seeds']} "
                f"| {r['steps']} "
                f"| {pct(slow.get('regressed', 0), n)} | {pct(same.get('ok', 0), n)} "
                f"| {pct(same.get('regressed', 0), n)} | {pct(same.get('inconclusive', 0), n)} | {conf} "
                f"| {_factor(r['smallest_caught_90'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("collect", "analyse"))
    ap.add_argument("--raw", type=Path, default=Path("/tmp/gate_power/raw.json"))
    ap.add_argument("--runs", type=int, default=120, help="fresh runs per workload (a multiple of 2 * SEEDS)")
    ap.add_argument("--measure-steps", type=int, default=max(STEPS))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "tracking" / "gate_power.json")
    a = ap.parse_args()
    if a.what == "collect":
        collect(a.raw, a.runs, a.measure_steps, a.raw.parent / "runs")
    else:
        analyse(a.raw, a.out)


if __name__ == "__main__":
    main()
