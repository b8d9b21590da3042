"""DeepSpeed's named buffers in zero's pure state rule (techniques/zero.py, `Zero.states`): which terms it prices, in
which phases, and its defaults against the installed DeepSpeed. The comparison with real gloo runs is
tests/e2e/test_zero_deepspeed_planned.py."""

from __future__ import annotations

import pytest

from membench.plan.predictors import analytic, fake_workload
from tests.helpers import compose, config_parts

ALLGATHER = 500_000


def _states(workload: str, stage: int, half: str = "", *extra: str, n: int = 2) -> tuple[dict, object]:
    techs = f"zero,{half}" if half else "zero"
    cfg = compose(f"workload={workload}", f"technique=[{techs}]", "technique.zero.backend=deepspeed",
                  f"technique.zero.stage={stage}", f"technique.zero.allgather_bucket_size={ALLGATHER}",
                  *extra)  # fmt: skip
    wcfg, techs = config_parts(cfg)
    wl = fake_workload(wcfg, 0)
    return analytic(wl, techs, 4, n, "cpu")["states"], wl.model


def test_max_live_parameters_is_the_installed_default():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from membench.techniques.zero import DS_MAX_LIVE_PARAMETERS

    assert DeepSpeedZeroConfig.model_fields["max_live_parameters"].default == DS_MAX_LIVE_PARAMETERS


@pytest.mark.parametrize(("half", "elem"), [("", 4), ("bf16", 2)])
def test_stage3_paper_knobs_hold_every_parameter_gathered_into_backward(half, elem):
    """stage3_knobs=paper partitions every parameter; llama_tiny's 125,248 elements fit the 5e5-element prefetch
    bucket, so all of them stay gathered from forward to their backward, in the parameters' dtype."""
    states, _ = _states("llama_tiny", 3, half, "technique.zero.stage3_knobs=paper")
    assert states["other"]["deepspeed_gathered_params"] == elem * 125_248
    assert states["live"]["deepspeed_gathered_params"] == ("forward", "backward_start", "backward")


def test_stage3_gathered_parameters_are_bounded_by_max_live_parameters():
    states, _ = _states("llama_tiny", 3, "", "technique.zero.stage3_knobs=paper",
                        "technique.zero.allgather_bucket_size=50000")  # fmt: skip
    assert states["other"]["deepspeed_gathered_params"] == 4 * 50_000


@pytest.mark.parametrize(("knobs", "stage"), [("deepspeed", 3), ("paper", 2), ("paper", 1)])
def test_nothing_gathered_where_no_parameter_is_partitioned(knobs, stage):
    """DeepSpeed's defaults keep tensors of at most 1e5 elements whole on every rank (all of llama_tiny's): nothing
    to gather; stages 1-2 never partition parameters."""
    states, _ = _states("llama_tiny", stage, "", f"technique.zero.stage3_knobs={knobs}")
    assert "deepspeed_gathered_params" not in states["other"]
