"""GPU-only checks (skipped without CUDA): device memory stats, fp16/bf16 autocast speed path, budgets."""

from __future__ import annotations

import pytest

from tests.helpers import run_inprocess

pytestmark = pytest.mark.gpu
STEPS = ("run.device=cuda", "run.train_steps=6", "run.warmup_steps=1", "run.measure_steps=3")


def test_cuda_run_records_device_peaks_and_tracker_agrees():
    r = run_inprocess("workload=gpt_tiny", *STEPS)
    dev = r["memory"]["device"]
    assert dev["cuda_max_allocated_bytes"] > 0
    assert dev["cuda_max_reserved_bytes"] >= dev["cuda_max_allocated_bytes"]
    n = r["workload"]["num_params"]
    assert r["memory"]["model_states"]["params"] == 4 * n


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
