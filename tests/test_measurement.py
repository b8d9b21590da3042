"""Measurement proxies that must hold exactly: state bytes per parameter, FLOPs, throughput arithmetic."""

from __future__ import annotations

import pytest

from membench.measure import timing_stats
from tests.helpers import run_inprocess

STEPS = ("run.train_steps=4", "run.warmup_steps=1", "run.measure_steps=1")


@pytest.fixture(scope="module")
def gpt_base():
    return run_inprocess("workload=gpt_tiny", *STEPS)


def test_fp32_adamw_holds_16_bytes_per_parameter(gpt_base):
    n = gpt_base["workload"]["num_params"]
    n_tensors = 2 + 2 * 16 + 2 + 1  # tok+pos, 2 blocks x (2 LN + 6 Linear) x (w, b), ln_f w+b, head w
    states = gpt_base["memory"]["model_states"]
    assert states["params"] == 4 * n
    assert states["grads"] == 4 * n
    # AdamW: exp_avg + exp_avg_sq (8 bytes/param) + one fp32 `step` scalar per parameter tensor
    assert states["optimizer"] == 8 * n + 4 * n_tensors
    assert states["params"] + states["grads"] + states["optimizer"] - 4 * n_tensors == 16 * n
    assert gpt_base["memory"]["predicted_by_category"]["params"] == 4 * n
    assert gpt_base["memory"]["by_category"]["params"] == 4 * n  # MemTracker at the peak agrees


def test_counted_flops_equal_the_analytic_model_plus_flash_recompute(gpt_base):
    # FlopCounterMode (with the CPU flash-attention formula added) vs model FLOPs 6*N*T + 12*L*s*h*T.
    # Hardware FLOPs exceed model FLOPs by exactly the score recompute of flash backward: 2*b*s^2*h per layer.
    L, b, s, h = 2, 8, 64, 64
    assert gpt_base["flops"]["counted_per_step"] == gpt_base["flops"]["model_per_step"] + L * 2 * b * s * s * h


def test_memory_peak_is_the_sum_of_its_categories(gpt_base):
    m = gpt_base["memory"]
    assert m["peak_bytes"] == sum(m["by_category"].values())


def test_throughput_is_samples_over_total_measured_time():
    t = timing_stats([0.1, 0.2, 0.3, 0.6], samples_per_step=8, tokens_per_sample=64)
    assert t["samples_per_s"] == pytest.approx(32 / 1.2)
    assert t["tokens_per_s"] == pytest.approx(32 * 64 / 1.2)
    assert t["median_step_s"] == pytest.approx(0.25)
    assert t["iqr_step_s"] == pytest.approx(0.375 - 0.175)
    assert t["samples_per_s"] != pytest.approx(8 / 0.25)  # not samples / median


def test_timed_steps_are_separate_from_instrumented_ones(gpt_base):
    assert len(gpt_base["timing"]["step_times_s"]) == 1
    assert len(gpt_base["quality"]["loss_curve"]) == 4
