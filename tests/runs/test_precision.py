"""Precision: exact byte proxies for bf16/fp16 autocast and pure bf16, and the declared loss tolerances."""

from __future__ import annotations

import pytest

from tests.helpers import held_activations as _held
from tests.helpers import run_inprocess

STEPS = ("run.train_steps=4", "run.warmup_steps=1", "run.measure_steps=1")


@pytest.fixture(scope="module")
def gpt():
    cells = {
        "fp32": (),
        "bf16": ("technique=[bf16]",),
        "fp16": ("technique=[fp16]",),
        "bf16_pure": ("technique=[bf16_pure]",),
    }
    return {k: run_inprocess("workload=gpt_tiny", *STEPS, *v) for k, v in cells.items()}


@pytest.fixture(scope="module")
def digits():
    cells = {"fp32": (), "bf16": ("technique=[bf16]",), "bf16_pure": ("technique=[bf16_pure]",)}
    return {k: run_inprocess("workload=digits_cnn_tiny", *STEPS, *v) for k, v in cells.items()}


def test_bf16_pure_halves_every_model_state(gpt):
    a, b = gpt["fp32"]["memory"]["model_states"], gpt["bf16_pure"]["memory"]["model_states"]
    assert b["params"] * 2 == a["params"]
    assert b["grads"] * 2 == a["grads"]
    # Adam moments halve; the per-tensor fp32 `step` scalars do not
    n_tensors = 37
    assert (b["optimizer"] - 4 * n_tensors) * 2 == a["optimizer"] - 4 * n_tensors


def test_autocast_halves_conv_activations_of_the_cnn(digits):
    # every tensor the CNN saves is a conv/BN/ReLU output: 16-bit under autocast, except the fp32 loss input
    ratio = _held(digits["bf16"]) / _held(digits["fp32"])
    assert 0.5 <= ratio < 0.56


def test_autocast_does_not_halve_gpt_activations_and_the_model_says_why(gpt):
    # fp32 residual stream + one 16-bit copy of the LayerNorm output per q/k/v matmul + 16-bit weight
    # copies: the ratio is well above 0.5, and the analytic model predicts the measured bytes.
    for k in ("bf16", "fp16"):
        ratio = _held(gpt[k]) / _held(gpt["fp32"])
        assert 0.6 < ratio < 0.8, (k, ratio)
        assert abs(gpt[k]["memory"]["relative_error"]["activations"]) < 0.03
    assert _held(gpt["bf16"]) == _held(gpt["fp16"])  # same byte width, same tensors


def test_bf16_pure_activations_are_16_bit_except_the_fp32_loss(gpt):
    ratio = _held(gpt["bf16_pure"]) / _held(gpt["fp32"])
    assert 0.5 < ratio < 0.6
    assert abs(gpt["bf16_pure"]["memory"]["relative_error"]["activations"]) < 0.03


def test_approximate_techniques_stay_within_their_declared_loss_tolerance(gpt):
    base = gpt["fp32"]["quality"]["loss_curve"]
    for k in ("bf16", "fp16", "bf16_pure"):
        rtol = gpt[k]["exactness"][k]["loss_rtol"]
        assert rtol > 0
        for a, b in zip(gpt[k]["quality"]["loss_curve"], base, strict=True):
            assert abs(a - b) <= rtol * abs(b), (k, a, b)


def test_fp16_uses_a_grad_scaler_and_stays_finite(gpt):
    assert all(x == x and abs(x) < 1e4 for x in gpt["fp16"]["quality"]["loss_curve"])
