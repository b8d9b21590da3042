"""`membench compare` flags regressions between record sets, and only real ones; a cell it cannot judge is
never "ok".

Synthetic record sets are copies of the committed checkpointing records with one field changed; step times
are replaced by draws around the committed median (seeded, 2% noise), so the rank test has samples to work with.
Exit codes: 0 every compared cell judged and none regressed, 1 regressed or missing, 2 usage, 3 inconclusive.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from membench import sweep as sweep_module
from membench.cli import main
from membench.compare import Tolerances, run_verdict, time_verdict
from membench.records import config_hash, latest_by_cell, load_records

ROOT = Path(__file__).resolve().parents[2]
RECORDS = ROOT / "results" / "checkpointing" / "runs"


def _copy(
    dst: Path, steps: int | None = None, factor: float = 1.0, seed: int = 0, committed: bool = False
) -> list[Path]:
    """Copy the committed records; with `steps`, give each `steps` step times: median * factor * noise, or with
    `committed` the record's own step times repeated to `steps`, times factor."""
    (dst / "runs").mkdir(parents=True)
    rng = random.Random(seed)
    files = []
    # the latest record of each seed-0 cell: one run per cell, the step-level rule (seed groups: _seed_group)
    latest = [r for r in latest_by_cell(load_records(RECORDS.parent)).values() if r["config"]["run"]["seed"] == 0]
    for r in sorted(latest, key=lambda r: r["run_id"]):
        if steps and committed:
            own = r["timing"]["step_times_s"]
            r["timing"]["step_times_s"] = [own[i % len(own)] * factor for i in range(steps)]
        elif steps:
            med = r["timing"]["median_step_s"]
            r["timing"]["step_times_s"] = [med * factor * rng.gauss(1.0, 0.02) for _ in range(steps)]
        f = dst / "runs" / f"{r['run_id']}.json"
        f.write_text(json.dumps(r))
        files.append(f)
    return files


def _edit(path: Path, fn) -> None:
    r = json.loads(path.read_text())
    fn(r)
    path.write_text(json.dumps(r))


def _compare(a, b, *extra) -> int:
    return main(["compare", str(a), str(b), *extra])


def _summary(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("membench: "))


def test_committed_records_are_judged_and_fewer_steps_are_inconclusive_never_ok(tmp_path, capsys):
    """As committed (20 timed steps per cell): an unchanged copy is judged, every cell ok. Cut to the 3 and 5 timed
    steps the records held before issue 19: 3 per side cannot reach p < 0.01 (1/20 at best); 5 can (1/252), but 5
    is under the steps a 10% slowdown needs to be caught: no time verdict either way, and no "ok"."""
    _copy(tmp_path / "a")
    _copy(tmp_path / "b")
    assert _compare(tmp_path / "a", tmp_path / "b") == 0
    assert _summary(capsys.readouterr().out).startswith("membench: 0 regressed, 0 improved, 0 inconclusive, 8 ok;")
    bf16 = lambda r: "bf16" in r["config"]["technique"]  # noqa: E731
    for side in ("c", "d"):  # the old settings: bf16 cells 3 timed steps, fp32 cells 5
        for f in _copy(tmp_path / side):
            _edit(f, lambda r: r["timing"].update(step_times_s=r["timing"]["step_times_s"][: 3 if bf16(r) else 5]))
    assert _compare(tmp_path / "c", tmp_path / "d") == 3
    out = capsys.readouterr().out
    assert _summary(out) == (
        "membench: 0 regressed, 0 improved, 8 inconclusive, 0 ok; 0 missing in candidate, 0 new; "
        "exit 3 (nothing regressed, but some cells inconclusive)"
    )
    assert out.count("3 vs 3 steps: the test cannot reach p<0.01") == 4
    assert out.count("5 vs 5 steps: under the 20 per side for power") == 4


def test_thirty_percent_slower_over_3_steps_is_inconclusive_not_ok(tmp_path, capsys):
    _copy(tmp_path / "a", steps=3, seed=1)
    _copy(tmp_path / "b", steps=3, factor=1.30, seed=2)
    assert _compare(tmp_path / "a", tmp_path / "b") == 3
    out = capsys.readouterr().out
    assert "0 regressed, 0 improved, 8 inconclusive, 0 ok" in out
    assert out.count("| inconclusive | step ") == 8 and "3 vs 3 steps: the test cannot reach p<0.01" in out


def test_identical_step_times_with_enough_steps_are_ok(tmp_path, capsys):
    _copy(tmp_path / "a", steps=20, seed=1)
    _copy(tmp_path / "b", steps=20, seed=1)
    assert _compare(tmp_path / "a", tmp_path / "b") == 0
    assert "0 regressed, 0 improved, 0 inconclusive, 8 ok" in _summary(capsys.readouterr().out)


def test_ten_percent_slower_over_20_steps_is_flagged(tmp_path, capsys):
    _copy(tmp_path / "a", steps=20, seed=1)
    _copy(tmp_path / "b", steps=20, factor=1.10, seed=2)
    assert _compare(tmp_path / "a", tmp_path / "b") == 1
    out = capsys.readouterr().out
    assert "8 regressed, 0 improved, 0 inconclusive, 0 ok" in out and out.count("| regressed | step ") == 8


STUDIES = sorted(p.parent.name for p in (ROOT / "results").glob("*/runs"))


def _quiet(runs: list[dict]) -> set[str]:
    """The cells whose seed group's every record has steps spread (IQR / median) by at most 10%: compare pools a
    group's steps, so one loaded seed makes the whole group's verdict noisy."""
    from membench.report import seed_group

    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(seed_group(r), []).append(r)
    return {
        r["config_hash"]
        for g in groups.values()
        if all(_iqr_rel(x["timing"]["step_times_s"]) <= 0.10 for x in g)
        for r in g
    }


def _iqr_rel(times: list[float]) -> float:
    if len(times) < 2:  # one step: no spread to speak of (repeated to 40, it is a constant)
        return 0.0
    q = statistics.quantiles(times, n=4)
    return (q[2] - q[0]) / q[1]


def _copy_study(study: str, dst: Path, factor: float, steps: int | None = None) -> int:
    """A committed study's records with step times x factor; with `steps`, its own step times repeated to that
    many. Returns the number of cells."""
    (dst / "runs").mkdir(parents=True)
    files = sorted((ROOT / "results" / study / "runs").glob("*.json"))
    # the ok cells: a study may also hold runs that were meant to end oom (the verified plan study's "nofit" cells)
    files = [p for p in files if json.loads(p.read_text())["status"] == "ok"]
    for p in files:
        r = json.loads(p.read_text())
        own = r["timing"]["step_times_s"]
        r["timing"]["step_times_s"] = [own[i % len(own)] * factor for i in range(steps or len(own))]
        (dst / "runs" / p.name).write_text(json.dumps(r))
    return len({json.loads(p.read_text())["config_hash"] for p in files})  # cells (a re-run cell has 2+ records)


@pytest.mark.parametrize("study", STUDIES, ids=[f"study-{s}" for s in STUDIES])  # an id "gpu" would be skipped
def test_a_copy_of_a_committed_study_with_step_times_raised_ten_percent(study, tmp_path, capsys):
    """Committed with 20 timed steps per cell: +10% and +30% fail the compare (exit 1), no cell is ok, and every cell
    whose own steps spread (IQR / median) by at most 10% is regressed; a study committed with fewer (plan,
    plan_verified, gpu: 1-3) is inconclusive at +10% and +30%, never ok, exit 3. With the study's own step times
    repeated to 40 per cell: +10% fails again, and the unchanged copy passes with every cell ok."""
    n = _copy_study(study, tmp_path / "base", 1.0)
    runs = [r for r in latest_by_cell(load_records(ROOT / "results" / study)).values() if r["status"] == "ok"]
    if all(len(r["timing"]["step_times_s"]) >= 20 for r in runs):  # recorded with the gate's 20 timed steps
        # as committed, +10% and +30% fail the compare and leave no cell "ok"; every cell whose own 20 steps spread
        # (IQR / median) by at most 10% is regressed. A cell whose steps spread more (a loaded machine; the record
        # says its load) may stay inconclusive at +10%, never ok
        quiet = _quiet(runs)
        for factor in (1.10, 1.30):
            _copy_study(study, tmp_path / f"as_is_{factor}", factor)
            assert _compare(tmp_path / "base", tmp_path / f"as_is_{factor}", "--format", "json") == 1
            rows = json.loads(capsys.readouterr().out)["rows"]
            verdicts = {r["cell"]: r["verdict"] for r in rows}
            assert len(verdicts) == n and set(verdicts.values()) <= {"regressed", "inconclusive"}, verdicts
            assert all(verdicts[h] == "regressed" for h in quiet), [r for r in rows if r["cell"] in quiet]
    else:
        for factor in (1.10, 1.30):
            _copy_study(study, tmp_path / f"as_is_{factor}", factor)
            assert _compare(tmp_path / "base", tmp_path / f"as_is_{factor}") == 3
            assert f"0 regressed, 0 improved, {n} inconclusive, 0 ok" in capsys.readouterr().out
    _copy_study(study, tmp_path / "base40", 1.0, steps=40)
    _copy_study(study, tmp_path / "slow40", 1.10, steps=40)
    _copy_study(study, tmp_path / "same40", 1.0, steps=40)
    assert _compare(tmp_path / "base40", tmp_path / "slow40", "--format", "json") == 1
    rows = json.loads(capsys.readouterr().out)["rows"]
    verdicts = {
        r["cell"]: r["verdict"] for r in rows
    }  # a cell whose steps spread by more than 10% may stay inconclusive
    quiet = _quiet(runs)
    assert len(verdicts) == n and set(verdicts.values()) <= {"regressed", "inconclusive"}, verdicts
    assert all(verdicts[h] == "regressed" for h in quiet) and list(verdicts.values()).count("regressed") >= n / 2
    assert _compare(tmp_path / "base40", tmp_path / "same40") == 0
    assert f"0 regressed, 0 improved, 0 inconclusive, {n} ok" in capsys.readouterr().out


def test_faster_is_improved_and_passes(tmp_path, capsys):
    _copy(tmp_path / "a", steps=20, seed=1)
    _copy(tmp_path / "b", steps=20, factor=0.80, seed=2)
    assert _compare(tmp_path / "a", tmp_path / "b") == 0
    out = capsys.readouterr().out
    assert "0 regressed, 8 improved, 0 inconclusive, 0 ok" in out and "time improved" in out


def test_step_time_noise_of_the_same_size_is_not_flagged(tmp_path, capsys):
    _copy(tmp_path / "a", steps=20, seed=1)
    _copy(tmp_path / "b", steps=20, seed=2)  # fresh noise, same level
    assert _compare(tmp_path / "a", tmp_path / "b") == 0
    assert "0 regressed, 0 improved, 0 inconclusive, 8 ok" in capsys.readouterr().out


def test_fewer_steps_than_time_min_steps_are_inconclusive(tmp_path, capsys):
    """10 steps x1.30 reach p < 0.01, but 10 per side is under the default power threshold (20)."""
    _copy(tmp_path / "a", steps=10, seed=1)
    _copy(tmp_path / "b", steps=10, factor=1.30, seed=2)
    assert _compare(tmp_path / "a", tmp_path / "b") == 3
    assert "10 vs 10 steps: under the 20 per side for power" in capsys.readouterr().out
    assert _compare(tmp_path / "a", tmp_path / "b", "--time-min-steps", "10") == 1


def test_a_shift_inside_the_noise_floor_is_inconclusive(tmp_path, capsys):
    _copy(tmp_path / "a", steps=20, seed=1)
    _copy(tmp_path / "b", steps=20, factor=1.10, seed=2)
    assert _compare(tmp_path / "a", tmp_path / "b", "--time-noise-floor", "0.2") == 3
    out = capsys.readouterr().out
    assert out.count("inside the noise floor 20%") == 8 and "8 inconclusive" in out
    _copy(tmp_path / "c", steps=20, factor=1.30, seed=2)
    assert _compare(tmp_path / "a", tmp_path / "c", "--time-noise-floor", "0.2") == 1


def test_time_verdict_needs_both_significance_and_effect_size():
    rng = random.Random(3)
    base = [1.0 + rng.gauss(0, 0.001) for _ in range(200)]
    tiny = [1.01 + rng.gauss(0, 0.001) for _ in range(200)]  # significant, but a 1% shift
    v = time_verdict(base, tiny, Tolerances())
    assert v["p_value"] < 1e-6 and v["verdict"] == "ok" and v["why"] == "shift within ±5%"
    rng = random.Random(0)  # 30% noise: a +16% estimate over 20 steps is not significant, and not ok either
    v = time_verdict([rng.gauss(1.0, 0.3) for _ in range(20)], [rng.gauss(1.1, 0.3) for _ in range(20)], Tolerances())
    assert v["verdict"] == "inconclusive" and v["why"] == "shift beyond ±5% but not significant" and v["p_value"] > 0.01
    v = time_verdict([1.0, 1.1, 0.9], [2.0, 2.1, 2.2], Tolerances())  # 3 vs 3: p >= 1/20 = 0.05
    assert v["verdict"] == "inconclusive" and v["p_value"] == 0.05
    assert time_verdict([], [1.0], Tolerances()) == {"verdict": "inconclusive", "why": "no step times"}


def _seed_group(d: Path, factor: float, seeds=(0, 1, 2), steps: int = 8, noise_seed: int = 0) -> None:
    """One committed cell as a seed group: each seed `steps` step times around its median * factor."""
    r0 = json.loads(sorted(RECORDS.glob("*.json"))[0].read_text())
    rng = random.Random(noise_seed)
    (d / "runs").mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        r = json.loads(json.dumps(r0))
        r["config"]["run"]["seed"] = seed
        r["config_hash"] = config_hash(r["config"])
        r["run_id"] = f"{r['run_id']}-{seed}"
        med = r["timing"]["median_step_s"]
        r["timing"]["step_times_s"] = [med * factor * rng.gauss(1.0, 0.02) for _ in range(steps)]
        (d / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))


def test_seeds_of_a_cell_are_pooled_on_both_sides(tmp_path, capsys):
    """8 steps per seed is under the 20 a verdict needs; 3 seeds pooled give 24 per side: +10% is regressed."""
    _seed_group(tmp_path / "a", 1.0, noise_seed=1)
    _seed_group(tmp_path / "b", 1.10, noise_seed=2)
    assert _compare(tmp_path / "a", tmp_path / "b") == 1
    out = capsys.readouterr().out
    assert "3 regressed" in out and out.count("24 vs 24 steps, 3 seeds pooled") == 3
    _seed_group(tmp_path / "one", 1.10, seeds=(0,), noise_seed=2)  # one seed: 8 steps, not pooled with anything
    _seed_group(tmp_path / "base1", 1.0, seeds=(0,), noise_seed=1)
    assert _compare(tmp_path / "base1", tmp_path / "one") == 3
    assert "8 vs 8 steps: under the 20 per side" in capsys.readouterr().out


def test_from_five_runs_per_side_the_run_is_the_sample():
    """Five runs per side whose levels drift by +-10% between runs (as fresh runs do on a shared machine), 20 steps
    each with 2% noise: the pooled steps call a +8% drift a regression (p ~ 2e-6); Welch's t on the five run
    medians sees that the runs spread as much and says inconclusive. The same runs x1.10 are not enough either
    (p ~ 0.06: five runs this spread cannot show 10%); identical runs are ok."""
    rng = random.Random(0)

    def runs(levels):
        return [[lv * rng.gauss(1.0, 0.02) for _ in range(20)] for lv in levels]

    base, drifted = runs([0.9, 1.0, 1.1, 0.95, 1.05]), runs([1.2, 0.95, 1.15, 0.9, 1.2])
    steps = time_verdict([t for r in base for t in r], [t for r in drifted for t in r], Tolerances())
    assert steps["verdict"] == "regressed" and steps["p_value"] < 1e-5
    v = run_verdict(base, drifted, Tolerances())
    assert v["verdict"] == "inconclusive" and v["runs"] == [5, 5] and 0.1 < v["p_value"] < 0.2
    assert v["why"] == "5 vs 5 runs: shift beyond ±5% but not significant"
    v = run_verdict(base, [[t * 1.10 for t in r] for r in base], Tolerances())
    assert v["verdict"] == "inconclusive" and abs(v["shift_rel"] - 0.10) < 1e-12 and 0.05 < v["p_value"] < 0.06
    assert run_verdict(base, base, Tolerances())["verdict"] == "ok"
    tight = runs([1.0, 1.01, 0.99, 1.0, 1.0])  # runs that agree: x1.10 is significant
    v = run_verdict(tight, [[t * 1.10 for t in r] for r in runs([1.0, 1.01, 0.99, 1.0, 1.0])], Tolerances())
    assert v["verdict"] == "regressed" and v["p_value"] < 1e-4
    assert run_verdict([[1.0]], [[1.0], [1.1]], Tolerances())["verdict"] == "inconclusive"  # one run: no variance


def test_compare_switches_to_runs_at_time_min_runs(tmp_path, capsys):
    """A seed group of 5 per side is judged on its runs (Welch), one of 4 on its pooled steps; --time-min-runs
    moves the switch."""
    _seed_group(tmp_path / "a", 1.0, seeds=range(5), steps=20, noise_seed=1)
    _seed_group(tmp_path / "b", 1.10, seeds=range(5), steps=20, noise_seed=2)
    assert _compare(tmp_path / "a", tmp_path / "b") == 1
    out = capsys.readouterr().out
    assert "5 regressed" in out and out.count("5 vs 5 runs: Welch") == 5
    assert _compare(tmp_path / "a", tmp_path / "b", "--time-min-runs", "6") == 1
    assert capsys.readouterr().out.count("100 vs 100 steps, 5 seeds pooled") == 5
    _seed_group(tmp_path / "c", 1.0, seeds=range(4), steps=20, noise_seed=1)
    _seed_group(tmp_path / "d", 1.0, seeds=range(4), steps=20, noise_seed=2)
    assert _compare(tmp_path / "c", tmp_path / "d") == 0
    assert capsys.readouterr().out.count("80 vs 80 steps, 4 seeds pooled") == 4
    assert main(["compare", str(tmp_path / "c"), str(tmp_path / "d"), "--time-run-alpha", "1"]) == 2


def test_status_changes_are_judged_and_both_failed_is_inconclusive(tmp_path, capsys):
    _copy(tmp_path / "a", steps=20)
    files = _copy(tmp_path / "b", steps=20)
    base = sorted((tmp_path / "a" / "runs").glob("*.json"))
    _edit(base[0], lambda r: r.update(status="oom"))  # oom -> ok: improved
    _edit(base[1], lambda r: r.update(status="oom"))  # oom -> error: nothing to judge
    _edit(files[1], lambda r: r.update(status="error"))
    assert _compare(tmp_path / "a", tmp_path / "b") == 3
    out = capsys.readouterr().out
    assert "0 regressed, 1 improved, 1 inconclusive, 6 ok" in out
    assert "status oom -> ok" in out and "status oom -> error: nothing measured to compare" in out


def test_confirm_reruns_flagged_cells_and_counts_only_those_still_regressed(tmp_path, capsys, monkeypatch):
    """--confirm with a stand-in runner: a re-run that is slow again stays regressed, a fast one clears."""
    _copy(tmp_path / "a", steps=20, seed=1)
    _copy(tmp_path / "b", steps=20, factor=1.30, seed=2)
    reruns = []

    def rerun(record, results_dir):
        reruns.append(record["config_hash"])
        slow = 1.30 if len(reruns) % 2 else 1.0  # every other cell is fine on its re-run
        r = json.loads(json.dumps(record))
        r["run_id"] = "29991231T000000-000000-" + r["config_hash"][:10]
        r["timing"]["step_times_s"] = [t / 1.30 * slow for t in r["timing"]["step_times_s"]]
        (Path(results_dir) / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))

    monkeypatch.setattr(sweep_module, "rerun_cell", rerun)
    assert _compare(tmp_path / "a", tmp_path / "b") == 1
    assert "8 regressed" in capsys.readouterr().out and reruns == []
    assert _compare(tmp_path / "a", tmp_path / "b", "--confirm") == 1
    out = capsys.readouterr().out
    assert len(reruns) == 8 and "4 regressed, 0 improved, 0 inconclusive, 4 ok" in out
    assert out.count("confirmed: regressed again on a re-run") == 4 and out.count("flagged, cleared by a re-run") == 4


def test_two_percent_peak_is_flagged(tmp_path, capsys):
    _copy(tmp_path / "a")
    files = _copy(tmp_path / "b")
    _edit(files[0], lambda r: r["memory"].update(peak_bytes=int(r["memory"]["peak_bytes"] * 1.02)))
    assert _compare(tmp_path / "a", tmp_path / "b") == 1
    out = capsys.readouterr().out
    assert "1 regressed" in out and "| regressed | peak " in out


def test_one_byte_of_model_state_is_flagged(tmp_path, capsys):
    _copy(tmp_path / "a")
    files = _copy(tmp_path / "b")
    _edit(
        files[3], lambda r: r["memory"]["model_states"].update(optimizer=r["memory"]["model_states"]["optimizer"] + 1)
    )
    assert _compare(tmp_path / "a", tmp_path / "b") == 1
    out = capsys.readouterr().out
    assert "1 regressed" in out and "optimizer state bytes" in out


def test_flops_quality_and_status_regressions_are_flagged(tmp_path, capsys):
    _copy(tmp_path / "a")
    files = _copy(tmp_path / "b")
    _edit(files[1], lambda r: r["flops"].update(counted_per_step=r["flops"]["counted_per_step"] * 2))
    _edit(files[2], lambda r: r["quality"].update(value=r["quality"]["value"] + 1e-6))  # exact technique
    _edit(files[3], lambda r: r.update(status="oom", error="peak over budget"))
    assert _compare(tmp_path / "a", tmp_path / "b") == 1
    out = capsys.readouterr().out
    assert "3 regressed" in out
    assert "status ok -> oom" in out and "FLOPs" in out and "must reproduce" in out


def test_approximate_quality_is_judged_against_the_seed_band(tmp_path, capsys):
    """bf16 cell (approximate): baseline seeds 0,1,2 give a band; a candidate inside passes, outside fails."""
    src = next(p for p in sorted(RECORDS.glob("*.json")) if json.loads(p.read_text())["techniques"] == ["bf16"])
    r0 = json.loads(src.read_text())
    from membench.records import config_hash

    def put(d: Path, seed: int, value: float) -> None:
        r = json.loads(json.dumps(r0))
        r["config"]["run"]["seed"] = seed
        r["config_hash"] = config_hash(r["config"])
        r["run_id"] = f"{r['run_id']}-{seed}"
        r["quality"]["value"] = value
        (d / "runs").mkdir(parents=True, exist_ok=True)
        (d / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))

    for seed, v in enumerate((3.00, 3.02, 3.04)):  # band ~ 3.02 +- 0.05
        put(tmp_path / "a", seed, v)
    put(tmp_path / "ok", 0, 3.06)  # worse than seed 0 by 0.06 (> --quality-atol) but inside the band
    put(tmp_path / "bad", 0, 3.20)
    assert _compare(tmp_path / "a", tmp_path / "ok") == 1  # seeds 1, 2 are missing in the candidate
    out = capsys.readouterr().out
    assert "2 missing in candidate" in out and "0 regressed" in out
    assert _compare(tmp_path / "a", tmp_path / "bad") == 1
    assert "outside seed band" in capsys.readouterr().out
    # ten seeds, one of them an outlier outside the band its own group gives (as bf16's seed 4 in
    # results/checkpointing): an identical copy reproduces it and passes; the outlier worse again fails
    for seed in range(10):
        put(tmp_path / "ten", seed, 3.50 if seed == 4 else 3.00 + 0.01 * seed)
        put(tmp_path / "ten_same", seed, 3.50 if seed == 4 else 3.00 + 0.01 * seed)
        put(tmp_path / "ten_worse", seed, 3.60 if seed == 4 else 3.00 + 0.01 * seed)
    from membench.compare import _band

    assert _band([3.50 if k == 4 else 3.00 + 0.01 * k for k in range(10)])[1] < 3.50  # the outlier is outside
    assert _compare(tmp_path / "ten", tmp_path / "ten_same") == 0
    assert _compare(tmp_path / "ten", tmp_path / "ten_worse") == 1
    assert "1 regressed" in capsys.readouterr().out


def test_missing_and_new_cells_are_listed_and_missing_fails(tmp_path, capsys):
    _copy(tmp_path / "a")
    files = _copy(tmp_path / "b")
    files[0].unlink()
    _edit(files[1], lambda r: r.update(config_hash="0" * 16))
    assert _compare(tmp_path / "a", tmp_path / "b") == 1
    out = capsys.readouterr().out
    assert "2 missing in candidate, 1 new" in out
    assert out.count("| missing |") == 2 and out.count("| new |") == 1


def test_other_hardware_is_refused_unless_asked_for_then_labelled(tmp_path, capsys):
    _copy(tmp_path / "a", steps=20, seed=1)
    for f in _copy(tmp_path / "b", steps=20, seed=2):
        _edit(f, lambda r: r["env"].update(cpu="Another CPU", torch_threads=8))
    assert _compare(tmp_path / "a", tmp_path / "b") == 2
    err = capsys.readouterr().err
    assert (
        "different hardware profiles" in err
        and "cpu Intel(R) Xeon(R) Processor vs Another CPU" in err
        and "--any-hardware" in err
    )
    assert _compare(tmp_path / "a", tmp_path / "b", "--any-hardware") == 3  # times on other hardware: no verdict
    out = capsys.readouterr().out
    assert out.count("time inconclusive, other hardware") == 8 and "torch_threads 1 vs 8" in out
    assert "8 inconclusive, 0 ok" in out


def test_json_output_and_no_common_cell(tmp_path, capsys):
    _copy(tmp_path / "a")
    files = _copy(tmp_path / "b")
    _edit(files[0], lambda r: r["memory"].update(peak_bytes=r["memory"]["peak_bytes"] * 2))
    assert _compare(tmp_path / "a", tmp_path / "b", "--format", "json") == 1
    result = json.loads(capsys.readouterr().out)
    assert result["counts"] == {"regressed": 1, "improved": 0, "inconclusive": 0, "ok": 7, "missing": 0, "new": 0}
    assert [r["verdict"] for r in result["rows"]].count("regressed") == 1 and result["exit_code"] == 1
    (tmp_path / "c" / "runs").mkdir(parents=True)
    assert _compare(tmp_path / "a", tmp_path / "c") == 2
    assert "nothing to compare" in capsys.readouterr().err


def test_compare_names_a_missing_folder(tmp_path, capsys):
    assert _compare(tmp_path / "nope", tmp_path) == 2
    assert "has no runs/ folder" in capsys.readouterr().err


def _run_twice(a: Path, b: Path) -> None:
    """One sweep, two result folders: the same two gpt_tiny cells run twice, each in its own child process."""
    argv = [sys.executable, "-m", "membench.cli", "run", "-m", "workload=gpt_tiny", f"run.results_dir={a},{b}"]
    argv += ["technique=choice([],[activation_checkpointing])", "run.num_threads=1"]
    argv += ["run.train_steps=23", "run.warmup_steps=1", "run.measure_steps=20"]
    p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr


@pytest.mark.slow
def test_two_fresh_runs_of_the_same_cells_pass(tmp_path, capsys):
    """Real runs, twice: memory, FLOPs and quality must match exactly on any machine, and the gate passes with the
    time check off. Step times are not asserted here: one run per side on a shared 2-core machine shifts by tens of
    percent (this test failed on time at load 1.3-1.5), and a speed target belongs in the benchmarks. The time
    check's verdicts are tested on injected slowdowns above."""
    _run_twice(tmp_path / "a", tmp_path / "b")
    code = _compare(tmp_path / "a", tmp_path / "b", "--format", "json", "--time-min-effect", "0")
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) == 2
    assert [p for r in rows for p in r["problems"]] == []
    assert code == 0


def test_a_library_only_one_side_recorded_is_not_a_difference_but_a_changed_version_is(tmp_path, capsys):
    _copy(tmp_path / "a")
    files = _copy(tmp_path / "b")
    for f in files:
        _edit(f, lambda r: r["env"]["versions"].update(transformers="5.24.0"))
    assert _compare(tmp_path / "a", tmp_path / "b") == 0  # same profile: judged, the same step times: ok
    _edit(files[0], lambda r: r["env"]["versions"].update(torch="2.99.0"))
    assert _compare(tmp_path / "a", tmp_path / "b") == 2
    assert "1 of 8 cells ran on different hardware profiles (torch 2.13.0+cpu vs 2.99.0)" in capsys.readouterr().err


def _bench_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "scripts" / "bench_compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench_save(path: Path, factor: float, seed: int, data: bool = True) -> Path:
    """A pytest-benchmark save (--benchmark-save-data) of two benchmarks, 30 rounds each around 10 ms * factor."""
    rng = random.Random(seed)
    benches = []
    for name in ("test_step[baseline]", "test_step[bf16]"):
        stats = {"median": 0.01 * factor}
        if data:
            stats["data"] = [0.01 * factor * rng.gauss(1.0, 0.02) for _ in range(30)]
        benches.append({"group": None, "name": name, "fullname": f"benchmarks/test_steps.py::{name}", "stats": stats})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine_info": {"cpu": {"brand_raw": "AMD EPYC"}}, "benchmarks": benches}))
    return path


def test_bench_compare_judges_saved_rounds_like_compare(tmp_path, capsys):
    bench = _bench_script()
    m = tmp_path / ".benchmarks" / "Linux-CPython-3.12-64bit"
    _bench_save(m / "0001_old.json", 1.0, seed=1)
    _bench_save(m / "0002_new.json", 1.10, seed=2)
    assert bench.main(["--storage", str(tmp_path / ".benchmarks")]) == 1  # the two latest: 0001 -> 0002
    out = capsys.readouterr().out
    assert "2 regressed" in out and "30 vs 30 steps" in out and "0002_new.json" in out
    same = _bench_save(tmp_path / "same.json", 1.0, seed=2)
    assert bench.main([str(m / "0001_old.json"), str(same)]) == 0
    assert "0 regressed, 0 improved, 0 inconclusive, 2 ok" in capsys.readouterr().out
    nodata = _bench_save(tmp_path / "nodata.json", 1.10, seed=2, data=False)  # saved without --benchmark-save-data
    assert bench.main([str(m / "0001_old.json"), str(nodata)]) == 3
    assert "no step times" in capsys.readouterr().out
    assert bench.main(["--storage", str(tmp_path / "none")]) == 2
    assert "no saved run" in capsys.readouterr().err


@pytest.mark.slow
def test_confirm_reruns_a_real_cell(tmp_path, capsys):
    """--confirm with the real runner on a cheap gpt_tiny cell: a candidate 100x slower than its baseline (baseline
    step times scaled down) is re-run and stays regressed; a candidate whose record was scaled up 300x (against a
    baseline at 3x) is re-run, runs at its real speed and is cleared. Each re-run writes a fresh record into the candidate folder."""
    argv = [sys.executable, "-m", "membench.cli", "run", "workload=gpt_tiny", f"run.results_dir={tmp_path / 'real'}"]
    argv += ["run.num_threads=1", "run.train_steps=24", "run.warmup_steps=1", "run.measure_steps=20"]
    p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    (src,) = (tmp_path / "real" / "runs").glob("*.json")

    def put(d: str, factor: float) -> Path:
        (tmp_path / d / "runs").mkdir(parents=True)
        r = json.loads(src.read_text())
        r["timing"]["step_times_s"] = [t * factor for t in r["timing"]["step_times_s"]]
        (tmp_path / d / "runs" / src.name).write_text(json.dumps(r))
        return tmp_path / d

    assert _compare(put("fast_base", 0.01), put("cand", 1.0), "--confirm") == 1
    out = capsys.readouterr().out
    assert "1 regressed" in out and "confirmed: regressed again on a re-run" in out
    assert len(list((tmp_path / "cand" / "runs").glob("*.json"))) == 2
    # the baseline at 3x the measured times: a fresh run's speed differs from the first by up to 2x on a shared 2-core
    # machine (docs/tracking.md's run-to-run drift), so a baseline at 1x would make the re-run's verdict that noise
    code = _compare(put("base", 3.0), put("slow_cand", 300.0), "--confirm")
    out = capsys.readouterr().out
    assert code != 1 and "0 regressed" in out and "flagged, cleared by a re-run" in out


def test_gate_power_counts_detections_and_false_alarms(tmp_path):
    """scripts/gate_power.py analyse on synthetic runs with 1% step noise and no drift: the 10% injection is
    caught in every trial at 20 steps and more (and by the run-level rule from 3 runs per side), and identical code
    is never flagged."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gate_power", ROOT / "scripts" / "gate_power.py")
    gp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gp)
    rng = random.Random(0)
    runs = [[0.01 * rng.gauss(1.0, 0.01) for _ in range(40)] for _ in range(12)]
    raw = {"workloads": {"gpt_tiny": {"load_before": [1.0], "load_after": [1.0], "step_times_s": runs}}}
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    gp.analyse(tmp_path / "raw.json", tmp_path / "out.json")
    rates = json.loads((tmp_path / "out.json").read_text())["workloads"]["gpt_tiny"]["rates"]
    for r in rates:
        if r["rule"] == "plain" and r["seeds"] * r["steps"] >= 20:
            assert r["slowdown"] == {"regressed": r["trials"]}, r
            assert "regressed" not in r["identical"], r
    on_runs = [r for r in rates if r["rule"] == "runs"]  # Welch on run medians: 3 and 5 runs per side (12 runs)
    assert {(r["seeds"], r["steps"]) for r in on_runs} == {(3, 20), (3, 40), (5, 20), (5, 40)}
    for r in on_runs:
        assert r["slowdown"] == {"regressed": r["trials"]} and "regressed" not in r["identical"], r
    fresh = [r for r in rates if r["pairs"] == "fresh runs" and r["seeds"] == 1]
    assert {r["trials"] for r in fresh} == {6} and all(r["confirmed_false_alarms"] == 0 for r in fresh)


def test_step_times_taken_at_other_loads_are_not_judged(tmp_path, capsys):
    """The candidate's cells started at a 1-minute load 2 cores above the baseline's: a 30% slowdown there is the
    load's as much as the code's, so no time verdict (inconclusive, never ok and never regressed) unless
    --time-load-diff 0; memory and quality are still judged."""
    _copy(tmp_path / "a", steps=20, seed=1)
    for f in _copy(tmp_path / "b", steps=20, factor=1.30, seed=2):
        _edit(
            f,
            lambda r: r["timing"]["load"]["start"].update(
                load_avg_1m=r["timing"]["load"]["start"]["load_avg_1m"] + 2.0
            ),
        )
    assert _compare(tmp_path / "a", tmp_path / "b") == 3
    out = capsys.readouterr().out
    assert (
        out.count("time inconclusive, loads differ: ") == 8 and "0 regressed, 0 improved, 8 inconclusive, 0 ok" in out
    )
    assert _compare(tmp_path / "a", tmp_path / "b", "--time-load-diff", "0") == 1
    assert "8 regressed" in capsys.readouterr().out
    assert _compare(tmp_path / "a", tmp_path / "b", "--time-load-diff", "2.5") == 1  # within 2.5 cores: judged
    capsys.readouterr()


def test_a_shift_every_seed_group_shares_is_named_beside_the_verdicts(tmp_path, capsys):
    """Every cell 10% slower: each is regressed, and the line above the summary says that every group moved the same
    way (a change every cell shares, or the machine drifting between sweeps: the verdicts cannot tell which). One
    cell 30% slower: the groups' median shift stays near 0 and the line names no common shift."""
    from membench.compare import compare_once

    _copy(tmp_path / "a", steps=20, seed=1)
    _copy(tmp_path / "b", steps=20, factor=1.10, seed=2)
    ts = compare_once(str(tmp_path / "a"), str(tmp_path / "b"), Tolerances())["time_shift"]
    assert ts["groups"] == 8 and ts["same_direction"] == 8 and 0.08 < ts["median"] < 0.12
    assert _compare(tmp_path / "a", tmp_path / "b") == 1
    out = capsys.readouterr().out
    assert "step-time shift over 8 seed groups" in out and "8 of 8 moved that way" in out
    assert "a change every cell shares, or the machine drifting" in out
    c = _copy(tmp_path / "c", steps=20, seed=2)
    base = next(f for f in c if not json.loads(f.read_text())["techniques"])
    _edit(base, lambda r: r["timing"].update(step_times_s=[t * 1.3 for t in r["timing"]["step_times_s"]]))
    ts = compare_once(str(tmp_path / "a"), str(tmp_path / "c"), Tolerances())["time_shift"]
    assert ts["groups"] == 8 and abs(ts["median"]) < 0.02 and 0.25 < ts["max"] < 0.35
    _compare(tmp_path / "a", tmp_path / "c")
    assert "a change every cell shares" not in capsys.readouterr().out
