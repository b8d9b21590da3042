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


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize(("half", "cuda"), [("", False), ("bf16", False), ("bf16", True)])
def test_stages_1_2_price_the_optimizer_step_on_one_flat_fp32_partition(stage, half, cuda):
    """At the inner optimizer's step: the rank's gradients as one fp32 partition (4 Psi/N bytes, also in fp32
    training), torch's AdamW temporaries over it (single-tensor on CPU: two partitions; foreach on CUDA: one)
    instead of the simulated optimizer's, and no 16/32-bit gradients left."""
    cfg = compose("workload=llama_tiny", f"technique=[zero{',' + half if half else ''}]",
                  "technique.zero.backend=deepspeed", f"technique.zero.stage={stage}")  # fmt: skip
    wcfg, techs = config_parts(cfg)
    states = analytic(fake_workload(wcfg, 0), techs, 4, 2, "cuda" if cuda else "cpu")["states"]
    partition = 4 * 125_248 // 2
    assert states["other"]["deepspeed_fp32_grad_partition"] == partition
    assert states["other"]["deepspeed_optimizer_temps"] == (1 if cuda else 2) * partition
    for name in ("deepspeed_fp32_grad_partition", "deepspeed_optimizer_temps"):
        assert states["live"][name] == ("optimizer",)
    assert states["live"]["optimizer_temp"] == ()
    assert "optimizer" not in states["live"]["grads"]


def test_deepspeed_adam_and_offload_price_no_inner_torch_step():
    states, _ = _states("llama_tiny", 2, "", "technique.zero.torch_adam=false")
    assert "deepspeed_optimizer_temps" not in states["other"] and "optimizer_temp" not in states["live"]
    assert "deepspeed_fp32_grad_partition" in states["other"]


def test_replace_states_follows_live_phases():
    """A state category live AS_SIMULATED follows the simulated profile in its phases and is 0 elsewhere; a
    simulated category outside the states that live names is dropped outside its phases."""
    from membench.simulate import AS_SIMULATED, PHASES, replace_states

    phases = {p: {"params": 10.0, "grads": g, "optimizer": 8.0, "optimizer_temp": 3.0} for p, g in
              zip(PHASES, (0.0, 0.0, 2.0, 4.0), strict=True)}  # fmt: skip
    sim = {"phases": phases, "states": {"params": 10.0, "grads": 4.0, "optimizer": 8.0}, "after_forward": {}}
    live = {"grads": (AS_SIMULATED, "forward", "backward_start", "backward"), "optimizer_temp": ()}
    out = replace_states(sim, {"params": 5.0, "grads": 40.0, "optimizer": 4.0}, {}, live)["phases"]
    assert [out[p]["grads"] for p in PHASES] == [0.0, 0.0, 20.0, 0.0]
    assert all(out[p]["optimizer_temp"] == 0 for p in PHASES)
    assert all(out[p]["params"] == 5.0 for p in PHASES)
