"""The planner's simulation builds the optimizer a technique builds (Patch.optimizer_factory), so the per-parameter
steps in backward and the low-memory optimizers are simulated, not priced beside a simulation of AdamW (issue 17):
the simulated optimizer-state bytes equal a real CPU run's, to the byte."""

from __future__ import annotations

import pytest

from membench.simulate import simulate
from tests.helpers import SHORT_RUN, compose, config_parts, run_inprocess

CASES = [
    ("optimizer_in_backward", None),
    ("optimizer_lowmem", "adafactor"),
    ("optimizer_lowmem", "adam_mini"),
    ("optimizer_lowmem", "galore"),
    ("optimizer_lowmem", "apollo"),
]


@pytest.mark.parametrize(("kind", "algo"), CASES, ids=[a or k for k, a in CASES])
def test_simulated_optimizer_state_equals_a_real_run(kind, algo):
    overrides = ["workload=gpt_tiny", f"technique=[{kind}]", "run.batch_size=4"]
    if algo:
        overrides.append(f"technique.optimizer_lowmem.algo={algo}")
    wcfg, techs = config_parts(compose(*overrides))
    sim = simulate(wcfg, techs, 4)
    assert sim["left_out"] == []  # simulated, not hybrid
    measured = run_inprocess(*overrides, *SHORT_RUN)["memory"]["model_states"]
    assert sim["states"]["optimizer"] == measured["optimizer"]
    # the simulation's optimizer step holds the whole state in that category (GaLore's projections re-attributed from
    # the tracker's "other", as a run's measure_memory does)
    assert sim["phases"]["optimizer"]["optimizer"] == measured["optimizer"]
    if kind == "optimizer_in_backward":  # each gradient is freed by its own step: none is left at the end of backward
        assert sim["states"]["grads"] == measured["grads"] == 0
        assert sim["phases"]["backward"]["grads"] < measured["params"]
