"""`membench compare` flags regressions between record sets, and only real ones.

Synthetic record sets are copies of the committed checkpointing records with one field changed; step times
are replaced by 20 draws around the committed median (seeded), so the rank test has samples to work with.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from membench.cli import main
from membench.compare import Tolerances, time_verdict

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "results" / "checkpointing" / "runs"


def _copy(dst: Path, steps: int | None = None, factor: float = 1.0, seed: int = 0) -> list[Path]:
    """Copy the committed records; with `steps`, give each `steps` step times: median * factor * noise."""
    (dst / "runs").mkdir(parents=True)
    rng = random.Random(seed)
    files = []
    for p in sorted(RECORDS.glob("*.json")):
        r = json.loads(p.read_text())
        if steps:
            med = r["timing"]["median_step_s"]
            r["timing"]["step_times_s"] = [med * factor * rng.gauss(1.0, 0.02) for _ in range(steps)]
        f = dst / "runs" / p.name
        f.write_text(json.dumps(r))
        files.append(f)
    return files


def _edit(path: Path, fn) -> None:
    r = json.loads(path.read_text())
    fn(r)
    path.write_text(json.dumps(r))


def _compare(a, b, *extra) -> int:
    return main(["compare", str(a), str(b), *extra])


def test_identical_record_sets_do_not_regress(tmp_path, capsys):
    _copy(tmp_path / "a")
    _copy(tmp_path / "b")
    assert _compare(tmp_path / "a", tmp_path / "b") == 0
    assert "0 cell(s) regressed, 0 missing in candidate, 0 new, 8 ok" in capsys.readouterr().out


def test_ten_percent_slower_over_20_steps_is_flagged(tmp_path, capsys):
    _copy(tmp_path / "a", steps=20, seed=1)
    _copy(tmp_path / "b", steps=20, factor=1.10, seed=2)
    assert _compare(tmp_path / "a", tmp_path / "b") == 1
    out = capsys.readouterr().out
    assert "8 cell(s) regressed" in out and "step " in out


def test_step_time_noise_of_the_same_size_is_not_flagged(tmp_path, capsys):
    _copy(tmp_path / "a", steps=20, seed=1)
    _copy(tmp_path / "b", steps=20, seed=2)  # fresh noise, same level
    assert _compare(tmp_path / "a", tmp_path / "b") == 0
    assert "0 cell(s) regressed" in capsys.readouterr().out


def test_time_verdict_needs_both_significance_and_effect_size():
    rng = random.Random(3)
    base = [1.0 + rng.gauss(0, 0.001) for _ in range(200)]
    tiny = [1.01 + rng.gauss(0, 0.001) for _ in range(200)]  # significant, but a 1% shift
    v = time_verdict(base, tiny, Tolerances())
    assert v["p_value"] < 1e-6 and v["regressed"] is False
    assert time_verdict([1.0, 1.1, 0.9], [2.0, 2.1, 2.2], Tolerances())["regressed"] is None  # 3 vs 3: p >= 0.05


def test_two_percent_peak_is_flagged(tmp_path, capsys):
    _copy(tmp_path / "a")
    files = _copy(tmp_path / "b")
    _edit(files[0], lambda r: r["memory"].update(peak_bytes=int(r["memory"]["peak_bytes"] * 1.02)))
    assert _compare(tmp_path / "a", tmp_path / "b") == 1
    out = capsys.readouterr().out
    assert "1 cell(s) regressed" in out and "| REGRESSED | peak " in out


def test_one_byte_of_model_state_is_flagged(tmp_path, capsys):
    _copy(tmp_path / "a")
    files = _copy(tmp_path / "b")
    _edit(
        files[3], lambda r: r["memory"]["model_states"].update(optimizer=r["memory"]["model_states"]["optimizer"] + 1)
    )
    assert _compare(tmp_path / "a", tmp_path / "b") == 1
    out = capsys.readouterr().out
    assert "1 cell(s) regressed" in out and "optimizer state bytes" in out


def test_flops_quality_and_status_regressions_are_flagged(tmp_path, capsys):
    _copy(tmp_path / "a")
    files = _copy(tmp_path / "b")
    _edit(files[1], lambda r: r["flops"].update(counted_per_step=r["flops"]["counted_per_step"] * 2))
    _edit(files[2], lambda r: r["quality"].update(value=r["quality"]["value"] + 1e-6))  # exact technique
    _edit(files[3], lambda r: r.update(status="oom", error="peak over budget"))
    assert _compare(tmp_path / "a", tmp_path / "b") == 1
    out = capsys.readouterr().out
    assert "3 cell(s) regressed" in out
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
    assert "2 missing in candidate" in out and "0 cell(s) regressed" in out
    assert _compare(tmp_path / "a", tmp_path / "bad") == 1
    assert "outside seed band" in capsys.readouterr().out


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
    assert "different hardware profiles" in err and "cpu AMD EPYC vs Another CPU" in err and "--any-hardware" in err
    assert _compare(tmp_path / "a", tmp_path / "b", "--any-hardware") == 0
    out = capsys.readouterr().out
    assert out.count("(other hardware)") == 8 and "torch_threads 2 vs 8" in out


def test_json_output_and_no_common_cell(tmp_path, capsys):
    _copy(tmp_path / "a")
    files = _copy(tmp_path / "b")
    _edit(files[0], lambda r: r["memory"].update(peak_bytes=r["memory"]["peak_bytes"] * 2))
    assert _compare(tmp_path / "a", tmp_path / "b", "--format", "json") == 1
    result = json.loads(capsys.readouterr().out)
    assert result["counts"] == {"ok": 7, "REGRESSED": 1, "missing": 0, "new": 0}
    assert [r["verdict"] for r in result["rows"]].count("REGRESSED") == 1
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
    assert _compare(tmp_path / "a", tmp_path / "b") == 0
    _edit(files[0], lambda r: r["env"]["versions"].update(torch="2.99.0"))
    assert _compare(tmp_path / "a", tmp_path / "b") == 2
    assert "1 of 8 cells ran on different hardware profiles (torch 2.13.0+cpu vs 2.99.0)" in capsys.readouterr().err
