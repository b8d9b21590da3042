"""GPU-only checks (skipped without CUDA): the tracker's split against the CUDA allocator, device vs host
bookkeeping, autocast on the CUDA path, budgets."""

from __future__ import annotations

import pytest

from tests.helpers import run_inprocess

pytestmark = pytest.mark.gpu
STEPS = ("run.device=cuda", "run.train_steps=6", "run.warmup_steps=1", "run.measure_steps=3")
# gpt2 geometry at batch 4: large enough that the allocator's fixed workspaces are a small part of the peak
GPT2 = ("workload=gpt2", "run.batch_size=4", *STEPS)


@pytest.mark.parametrize(
    "techs",
    [
        [],
        ["technique=[activation_checkpointing]"],
        ["technique=[bf16]"],
        ["technique=[quantized_base]", "technique.quantized_base.compute_dtype=bfloat16"],
    ],
    ids=["baseline", "full_ckpt", "bf16", "quantized_base"],
)
def test_tracker_split_agrees_with_the_allocator_within_5_percent(techs):
    r = run_inprocess(*GPT2, *techs)
    m = r["memory"]
    dev = m["by_device"][m["device_name"]]
    # same instrumented step, two independent counters: the tracker's storages and the allocator's peak
    assert abs(dev["tracker_peak_bytes"] / dev["allocator_peak_bytes"] - 1) <= 0.05
    # the headline is the allocator's peak over plain steps, and the memory step is no larger than them by > 5%
    assert m["peak_bytes"] == max(m["phases"][p]["cuda_max_allocated_bytes"] for p in ("timed", "rest"))
    assert dev["allocator_peak_bytes"] <= 1.05 * m["peak_bytes"]
    n = r["workload"]["num_params"]
    if not techs:
        assert m["model_states"]["params"] == 4 * n


def test_offloaded_optimizer_state_is_a_host_byte():
    r = run_inprocess(
        "workload=gpt_small",
        *STEPS,
        "technique=[zero,bf16]",
        "technique.zero.stage=1",
        "technique.zero.offload_optimizer=cpu",
    )
    m = r["memory"]
    host = m["model_states_by_device"]["cpu"]
    assert host.get("optimizer", 0) + host.get("fp32_master", 0) >= 12 * r["workload"]["num_params"]
    assert m["model_states_by_device"][m["device_name"]].get("optimizer", 0) == 0
    assert m["by_device"][m["device_name"]]["by_category"]["optimizer"] == 0  # never on the device's split
    assert m["by_device"]["cpu"]["by_category"]["optimizer"] > 0


@pytest.mark.parametrize("tech", ["bf16", "fp16", "bf16_pure"])
def test_precision_on_cuda_keeps_checkpointing_exact_and_shrinks_activations(tech):
    base = run_inprocess("workload=gpt_tiny", *STEPS, f"technique=[{tech}]")
    ckpt = run_inprocess("workload=gpt_tiny", *STEPS, f"technique=[{tech},activation_checkpointing]")
    assert ckpt["quality"]["loss_curve"] == base["quality"]["loss_curve"]
    assert ckpt["memory"]["held_after_forward"]["activations"] < base["memory"]["held_after_forward"]["activations"]


def test_cuda_memory_budget_turns_into_oom():
    import torch

    from membench.errors import MemoryBudgetExceeded

    with pytest.raises((MemoryBudgetExceeded, torch.OutOfMemoryError)):
        run_inprocess("workload=gpt_small", *STEPS, "run.memory_budget_mib=8")
