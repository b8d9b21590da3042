"""Fake-tensor simulation (membench/simulate.py) against an independent count of a real step's bytes (no MemTracker),
on tiny CPU workloads."""

from __future__ import annotations

import dataclasses

import pytest

from membench.simulate import STATE_CATEGORIES as STATES
from membench.simulate import replace_states, simulate
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
        ("workload=llama_tiny", "technique=[bf16_pure]"),  # fp32 RoPE tables: cast with the model, as in a run
        ("workload=llama_tiny", "workload.tie_embeddings=true", "technique=[bf16_pure]"),
    ],
    ids=[
        "base",
        "ac_selective",
        "ac_every_k",
        "fp16",
        "bf16_pure",
        "ac_bf16_b5",
        "digits_ac",
        "llama_bf16_pure",
        "llama_tied_bf16_pure",
    ],  # fmt: skip
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


def test_phases_hold_the_peak_and_the_states():
    """The step's phases: the peak is the largest phase; the optimizer step holds every model state; forward holds
    no gradients (zeroed with set_to_none); backward splits at the first parameter gradient: none before it, the
    gradients from it on."""
    wcfg, techs = _parts(compose("workload=gpt_tiny"))
    out = simulate(wcfg, techs, 4)
    assert tuple(out["phases"]) == ("forward", "backward_start", "backward", "optimizer")
    totals = {p: sum(c.values()) for p, c in out["phases"].items()}
    assert out["peak_bytes"] == max(totals.values()) and out["by_category"] == out["phases"][out["peak_phase"]]
    opt = out["phases"]["optimizer"]
    assert (opt["params"], opt["grads"], opt["optimizer"]) == tuple(out["states"][c] for c in STATES)
    assert out["phases"]["forward"]["grads"] == 0
    assert out["phases"]["backward_start"]["grads"] == 0 < out["phases"]["backward"]["grads"]


def test_replaced_states_never_subtract():
    """A left-out technique's states replace the simulated ones in each phase, scaled by how much of the category
    the phase held; the result is never below those states."""
    s = {"phases": {"forward": {"params": 4, "grads": 0, "optimizer": 8, "activations": 30},
                    "backward": {"params": 4, "grads": 2, "optimizer": 8, "activations": 10},
                    "optimizer": {"params": 4, "grads": 4, "optimizer": 8, "optimizer_temp": 1}},
         "states": {"params": 4, "grads": 4, "optimizer": 8}, "after_forward": {}}  # fmt: skip
    full = {"params": 1.0, "grads": 40.0, "optimizer": 80.0}
    h = replace_states(s, full, {"bucket": 3.0})
    assert h["phases"]["backward"] == {"params": 1, "grads": 20, "optimizer": 80, "activations": 10, "bucket": 3}
    assert h["peak_phase"] == "optimizer" and h["peak_bytes"] == 1 + 40 + 80 + 1 + 3  # the peak moved
    assert h["peak_bytes"] >= sum(full.values())


def test_replaced_states_follow_the_phases_a_library_holds_them_in():
    """`live`: a buffer allocated in the first gradient hook and freed at the end of backward is in "backward"
    only; a state category allocated whole at init is whole in every phase it names, not scaled with the
    simulated profile."""
    s = {"phases": {"forward": {"params": 4, "grads": 0, "optimizer": 8, "activations": 30},
                    "backward_start": {"params": 4, "grads": 0, "optimizer": 8, "activations": 28},
                    "backward": {"params": 4, "grads": 2, "optimizer": 8, "activations": 10},
                    "optimizer": {"params": 4, "grads": 4, "optimizer": 8, "optimizer_temp": 1}},
         "states": {"params": 4, "grads": 4, "optimizer": 8}, "after_forward": {}}  # fmt: skip
    full = {"params": 1.0, "grads": 40.0, "optimizer": 80.0}
    h = replace_states(
        s,
        full,
        {"bucket": 30.0, "master": 5.0},
        {"bucket": ("backward",), "grads": ("forward", "backward_start", "backward", "optimizer")},
    )
    assert [h["phases"][p]["bucket"] for p in s["phases"]] == [0, 0, 30, 0]
    assert [h["phases"][p]["master"] for p in s["phases"]] == [5, 5, 5, 5]
    assert [h["phases"][p]["grads"] for p in s["phases"]] == [40, 40, 40, 40]
    # the bucket moves the peak to "backward": 1 + 40 + 80 + 10 + 30 + 5, above backward_start's 1 + 40 + 80 + 28 + 5
    assert h["peak_phase"] == "backward" and h["peak_bytes"] == 166


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
    # the optimizer replacements are simulated: the simulation builds Patch.optimizer_factory's optimizer
    assert set(not_simulated) == {"optimizer_8bit", "quantized_base", "zero", "prune_structured", "prune_unstructured",
                                  "activation_offload", "optimizer_offload", "float8"}  # fmt: skip
