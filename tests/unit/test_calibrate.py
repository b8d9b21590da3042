"""Calibration pairs each technique record with its own sweep's baseline (not whichever baseline loaded last)."""

from __future__ import annotations

import json

from membench.calibrate import Calibration, current_profile, load


def _rec(tmp_path, name, exp, tech, step_s, *, loaded=False, quality=2.0, tracker=None, peak=100):
    model, bf16 = current_profile("cpu")[1].rsplit(" ", 1)
    dev = {"cpu": {"tracker_peak_bytes": tracker}} if tracker else {}
    r = {
        "status": "ok",
        "run_id": name,
        "config": {
            "workload": {"preset": "p", "_target_": "W"},
            "run": {"batch_size": 4, "seed": 0},
            "technique": tech,
            "experiment": {"name": exp},
        },
        "env": {"cpu": model, "cpu_flags": ["avx512_bf16"] if bf16 == "+bf16" else []},
        "timing": {"device": "cpu", "median_step_s": step_s, "load": {"loaded": loaded}},
        "quality": {"metric": "eval_loss", "value": quality},
        "memory": {
            "peak_bytes": peak,
            "device_name": "cpu",
            "by_device": dev,
            "predicted_by_category": {"params": 100},
        },
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(r))


CK = {"activation_checkpointing": {"_target_": "x", "mode": "full"}}
KEY = "activation_checkpointing(mode=full)"


def test_a_technique_is_timed_against_its_own_sweeps_baseline(tmp_path):
    _rec(tmp_path, "a1", "ckpt", {}, 1.0)
    _rec(tmp_path, "a2", "ckpt", CK, 1.1)
    _rec(tmp_path, "z", "pruning", {}, 2.0, quality=3.0)  # another study's baseline, loaded last: not a pair
    cal = Calibration(load([str(tmp_path)], "cpu"))
    assert cal.time_ratio(KEY) == (1.1, 1)
    assert cal.quality_delta(KEY) == (0.0, "eval_loss", 1)
    assert cal.baseline_step_s("p", 4) == 1.5  # the median over both baselines


def test_quiet_pairs_win_over_loaded_ones(tmp_path):
    _rec(tmp_path, "q1", "quiet", {}, 1.0)
    _rec(tmp_path, "q2", "quiet", CK, 1.2)
    _rec(tmp_path, "l1", "busy", {}, 1.0, loaded=True)
    _rec(tmp_path, "l2", "busy", CK, 3.0, loaded=True)
    assert Calibration(load([str(tmp_path)], "cpu")).time_ratio(KEY) == (1.2, 1)


def test_peak_factor_reads_the_trackers_peak_not_the_headline(tmp_path):
    _rec(tmp_path, "t", "s", CK, 1.0, tracker=90, peak=120)  # schema 2: headline 120 (allocator), tracker 90
    assert Calibration(load([str(tmp_path)], "cpu")).peak_factor(KEY) == (0.9, 1)
