"""zero on fake tensors (membench/simulate.py): FSDP2 (torch stages 2-3) over torch's fake process group at the
planned world size, and, where zero is left out (hybrid), FSDP2's MixedPrecisionPolicy acting on the activations.
The comparison with real 2-rank gloo runs is tests/e2e/test_zero_simulated.py."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from membench.plan.predictors import analytic, fake_workload, simulated
from membench.simulate import simulate
from tests.helpers import compose, config_parts

B = 8


def _parts(techs: str, backend: str = "torch", stage: int = 3):
    zero = [f"technique.zero.backend={backend}", f"technique.zero.stage={stage}"] if "zero" in techs else []
    return config_parts(compose("workload=gpt_tiny", f"technique=[{techs}]", *zero))


def _psi(wcfg) -> int:
    return sum(p.numel() for p in fake_workload(wcfg, 0).model.parameters())


@pytest.mark.parametrize("stage", [2, 3])
def test_fsdp_runs_sharded_on_the_fake_group(stage):
    wcfg, techs = _parts("zero", stage=stage)
    out = simulate(wcfg, techs, B, max_layers=None, world_size=2)
    assert out["left_out"] == [] and out["world_size"] == 2
    assert not dist.is_initialized()  # the fake group is torn down
    psi = _psi(wcfg)
    assert out["states"]["params"] == 4 * psi // 2  # rank 0's fp32 shard, as FSDP2 holds it at rest
    assert out["states"]["grads"] == 4 * psi // 2
    # stage 2 (reshard_after_forward=False) holds every parameter gathered through backward; stage 3 none at this
    # peak (the start of backward, before any block is re-gathered)
    assert out["by_category"].get("params_unsharded", 0) == (4 * psi if stage == 2 else 0)
    kind, pred = simulated(out, techs, analytic(fake_workload(wcfg, 0), techs, B, 2, "cpu")["states"], 2)
    assert kind == "simulation" and pred["peak_bytes"] == out["peak_bytes"]


def test_without_a_world_size_zero_is_left_out():
    wcfg, techs = _parts("zero")
    out = simulate(wcfg, techs, B, max_layers=None)
    assert out["left_out"] == ["zero"] and out["world_size"] == 1
    kind, _ = simulated(out, techs, analytic(fake_workload(wcfg, 0), techs, B, 2, "cpu")["states"])
    assert kind == "hybrid"


@pytest.mark.parametrize(("backend", "stage"), [("torch", 0), ("torch", 1), ("deepspeed", 3)])
def test_ddp_zero_optimizer_and_deepspeed_stay_hybrid(backend, stage):
    wcfg, techs = _parts("zero,bf16", backend, stage)
    out = simulate(wcfg, techs, B, max_layers=None, world_size=2)
    assert out["left_out"] == ["zero"] and not dist.is_initialized()
    alone = simulate(*_parts("bf16"), B, max_layers=None)
    if backend == "torch":  # DDP, ZeroRedundancyOptimizer keep autocast over fp32 parameters: bf16 alone's activations
        assert out["after_forward"]["activations"] == alone["after_forward"]["activations"]
    else:  # DeepSpeed's bf16 mode casts the parameters (not the buffers) to bf16 and keeps autocast: bf16 weights,
        # so a bf16 residual stream, fewer activation bytes (the real 2-rank runs: tests/e2e/test_zero_deepspeed_planned.py)
        psi = _psi(wcfg)
        assert out["states"]["params"] == 2 * psi + sum(b.numel() * b.element_size()
                                                        for b in fake_workload(wcfg, 0).model.buffers())  # fmt: skip
        assert out["after_forward"]["activations"] < alone["after_forward"]["activations"]


@pytest.mark.parametrize("stage", [2, 3])
def test_hybrid_follows_fsdp2_mixed_precision_policy(stage):
    """Issue 22 item 1: zero left out (no world size), the step runs as under FSDP2's MixedPrecisionPolicy (16-bit
    parameters in compute, no autocast): what forward holds equals FSDP2's own on the fake group, and is less than
    under autocast (whose residual stream and norms stay fp32)."""
    wcfg, techs = _parts("zero,bf16", stage=stage)
    hybrid = simulate(wcfg, techs, B, max_layers=None)
    fsdp = simulate(wcfg, techs, B, max_layers=None, world_size=2)
    autocast = simulate(*_parts("bf16"), B, max_layers=None)
    assert hybrid["left_out"] == ["zero"] and fsdp["left_out"] == []
    assert hybrid["after_forward"]["activations"] == fsdp["after_forward"]["activations"]
    assert hybrid["after_forward"]["activations"] < autocast["after_forward"]["activations"]
    # fsdp_param_dtype=float32 keeps autocast over fp32 all-gathers: autocast's activations
    cfg = compose("workload=gpt_tiny", "technique=[zero,bf16]", "technique.zero.backend=torch",
                  f"technique.zero.stage={stage}", "technique.zero.fsdp_param_dtype=float32")  # fmt: skip
    kept = simulate(*config_parts(cfg), B, max_layers=None)
    assert kept["after_forward"]["activations"] == autocast["after_forward"]["activations"]


def test_two_rank_zero_plan_rows_stay_at_or_above_their_model_states():
    """Every zero candidate of a 2-rank gpt_tiny plan (the hybrid ones now under FSDP2's policy where it applies):
    no prediction below the candidate's device-resident model states, categories adding up to the peak."""
    import membench.plan as pl
    from membench.config import build
    from membench.technique import model_states

    pc, user = pl.split_overrides(["run.device=cpu", "plan.records=[/nonexistent]", "workload=gpt_tiny",
                                   "run.world_size=2", "run.memory_budget_mib=64", "plan.techniques=[zero,precision]"])  # fmt: skip
    pc.simulate = 99
    r = pl.plan(user, pc, progress=lambda m: None)
    base = pl.compose_cells(user, [[]])[0]
    wl = fake_workload(build(base["workload"], "workload"), 0)
    cells = pl.compose_cells(pl.without_list(user), [row["overrides"] for row in r["rows"]])
    assert len(cells) >= 8
    for row, c in zip(r["rows"], cells, strict=True):
        assert row["best_predictor"] in ("simulation", "hybrid")
        _, _, techs = pl.validated(c, r["device"])
        states = model_states(wl.model, wl.blocks(), techs, 2)["device"]
        floor = states["params"] + states["grads"] + states["optimizer"]
        for name, p in row["predictions"].items():
            if p.get("peak_bytes") is None:
                continue
            assert p["peak_bytes"] >= floor * (1 - 1e-9), (row["label"], name, p["peak_bytes"], floor)
            if "by_category" in p:
                assert p["peak_bytes"] == pytest.approx(sum(v or 0 for v in p["by_category"].values()))
