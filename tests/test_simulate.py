"""Fake-tensor simulation (membench/simulate.py) against an independent count of a real step's bytes (no MemTracker),
on tiny CPU workloads."""

from __future__ import annotations

import dataclasses

import pytest

from membench.simulate import simulate
from membench.technique import discover
from tests.helpers import SHORT_RUN, compose, exact_step_bytes
from tests.helpers import config_parts as _parts

SHORT = (*SHORT_RUN, "run.device=cpu")


@pytest.mark.parametrize(
    "overrides",
    [
        ("workload=gpt_tiny",),
        (
            "workload=gpt_tiny",
            "technique=[activation_checkpointing]",
            "technique.activation_checkpointing.mode=selective",
        ),
        (
            "workload=gpt_tiny",
            "technique=[activation_checkpointing]",
            "technique.activation_checkpointing.mode=every_k",
        ),
        ("workload=gpt_tiny", "technique=[fp16]"),
        ("workload=gpt_tiny", "technique=[bf16_pure]"),
        ("workload=gpt_tiny", "technique=[activation_checkpointing,bf16]", "run.batch_size=5"),
        ("workload=digits_cnn_tiny", "technique=[activation_checkpointing]"),
    ],
    ids=["base", "ac_selective", "ac_every_k", "fp16", "bf16_pure", "ac_bf16_b5", "digits_ac"],
)
def test_fake_step_matches_real_tracker(overrides):
    """Category by category, the simulated step holds what a real step's tensors hold: parameters and optimizer
    state to the byte, the activations between forward and backward to the byte (the real count is storages saved
    for backward plus newly reachable tensors, tests/helpers.py::exact_step_bytes); its peak is at least that sum
    and sees no more gradient bytes than the real step makes."""
    cfg = compose(*overrides, *SHORT)
    real = exact_step_bytes(cfg)
    wcfg, techs = _parts(cfg)
    sim = simulate(wcfg, techs, cfg["run"]["batch_size"], cfg["run"]["seed"], max_layers=None)
    held = sim["after_forward"]
    assert {c: held[c] for c in ("params", "optimizer", "activations")} == {
        c: real[c] for c in ("params", "optimizer", "activations")
    }, (held, real)
    assert held["grads"] == 0 and 0 <= sim["by_category"]["grads"] <= real["grads"]
    assert sim["peak_bytes"] >= real["params"] + real["optimizer"] + real["activations"]


def test_per_layer_extrapolation_equals_full_simulation():
    wcfg, techs = _parts(compose("workload=gpt_tiny", "workload.n_layer=5", "technique=[activation_checkpointing]"))
    full = simulate(wcfg, techs, 4, max_layers=None)
    extrapolated = simulate(wcfg, techs, 4, max_layers=2)
    assert "extrapolated" in extrapolated["method"] and "full model" in full["method"]
    assert extrapolated["peak_bytes"] == full["peak_bytes"]
    assert simulate(dataclasses.replace(wcfg, n_layer=1), techs, 4)["peak_bytes"] < full["peak_bytes"]


def test_what_cannot_be_simulated_is_left_out_and_named():
    wcfg, techs = _parts(compose("workload=gpt_tiny", "technique=[optimizer_8bit,bf16]"))
    out = simulate(wcfg, techs, 2)
    not_simulated = {k: c.not_simulated for k, c in discover().items() if c.not_simulated}
    assert out["left_out"] == ["optimizer_8bit"] and "bitsandbytes" in not_simulated["optimizer_8bit"]
    assert set(not_simulated) == {"optimizer_8bit", "quantized_base", "zero", "prune_structured", "prune_unstructured",
                                  "optimizer_in_backward", "optimizer_lowmem"}  # fmt: skip
