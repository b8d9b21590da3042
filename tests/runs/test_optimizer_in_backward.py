"""optimizer_in_backward is exact against AdamW and keeps one parameter's gradient alive, not all of them."""

from __future__ import annotations

import pytest

from membench.errors import ConfigError
from tests.helpers import compose, run_inprocess

# a step whose peak comes at the end of backward (small batch, wide model): there the baseline holds every gradient
SMALL = ("workload=gpt_tiny", "workload.d_model=128", "workload.seq_len=16", "run.batch_size=1")
STEPS = ("run.train_steps=5", "run.warmup_steps=1", "run.measure_steps=1")


@pytest.fixture(scope="module")
def runs():
    return {name: run_inprocess(*SMALL, *STEPS, *ov)
            for name, ov in (("adamw", ()), ("in_backward", ("technique=[optimizer_in_backward]",)))}  # fmt: skip


def _peak(r):
    return r["memory"]["by_device"]["cpu"]["by_category"]


def test_losses_are_bit_identical_to_adamw(runs):
    assert runs["in_backward"]["quality"]["loss_curve"] == runs["adamw"]["quality"]["loss_curve"]
    assert runs["in_backward"]["quality"]["value"] == runs["adamw"]["quality"]["value"]


def test_gradients_at_the_peak_are_the_largest_parameter_only(runs):
    from membench.config import build

    cfg = compose(*SMALL)
    model = build(cfg["workload"], "workload").build(0).model
    largest = max(p.numel() for p in model.parameters()) * 4  # fp32 gradient of the largest tensor
    base, oib = _peak(runs["adamw"]), _peak(runs["in_backward"])
    assert base["grads"] == base["params"]  # AdamW's peak holds every gradient
    assert 0 < oib["grads"] <= largest < base["params"] / 4
    assert oib["optimizer"] == base["optimizer"]  # per-parameter states are tracked as optimizer state
    assert runs["in_backward"]["memory"]["model_states"]["optimizer"] == base["optimizer"]
    assert runs["in_backward"]["memory"]["model_states"]["grads"] == 0
    assert runs["in_backward"]["memory"]["peak_bytes"] < runs["adamw"]["memory"]["peak_bytes"]


def test_pure_states_predict_one_parameter_of_gradients():
    from membench import technique as registry
    from membench.config import build

    cfg = compose(*SMALL, "technique=[optimizer_in_backward]")
    wl = build(cfg["workload"], "workload").build(0)
    techs = [build(node, f"technique.{k}") for k, node in cfg["technique"].items()]
    states = registry.model_states(wl.model, wl.blocks(), techs, 1)
    assert states["device"]["grads"] == max(p.numel() for p in wl.model.parameters()) * 4


@pytest.mark.parametrize("other", ["fp16", "optimizer_8bit", "zero"])
def test_rejects_what_needs_the_whole_gradient(other):
    with pytest.raises(ConfigError, match="optimizer_in_backward"):
        compose("workload=gpt_tiny", f"technique=[optimizer_in_backward,{other}]")


def test_record_predicts_the_gradients_at_the_peak(runs):
    r = runs["in_backward"]
    assert r["memory"]["predicted_by_category"]["grads"] == _peak(r)["grads"]
