"""GPU-only checks (skipped without CUDA): the tracker's split against the CUDA allocator, device vs host
bookkeeping, autocast on the CUDA path, budgets."""

from __future__ import annotations

import pytest

from tests.helpers import compose, run_inprocess

pytestmark = pytest.mark.gpu
STEPS = ("run.device=cuda", "run.train_steps=6", "run.warmup_steps=1", "run.measure_steps=3")
# the `gpu` study's geometry (gpt2, batch 8 x 1024): the allocator's fixed workspaces are a small part of the peak
GPT2 = ("workload=gpt2", "run.batch_size=8", *STEPS)


@pytest.mark.parametrize(
    "techs, rtol",
    [
        ([], 0.05),
        (["technique=[activation_checkpointing]"], 0.05),
        (["technique=[bf16]"], 0.05),
        # nf4 base, no checkpointing (a multi-GiB peak, as for the other cases). On an H200 the nf4 + checkpointing +
        # bf16 cell held 0.920 (893 of 971 MiB): a ~1 GiB peak, where the allocator's fixed workspaces (cuBLAS; 64-
        # 180 MiB untracked in every cell) are a large share; this case is the 5% at the study's scale.
        (["technique=[quantized_base]", "technique.quantized_base.compute_dtype=bfloat16"], 0.05),
    ],
    ids=["baseline", "full_ckpt", "bf16", "quantized_base"],
)
def test_tracker_split_agrees_with_the_allocator(techs, rtol, tmp_path):
    """In a child process, as `membench run` runs it: an in-process run would see earlier tests' allocations."""
    from membench.sweep import run_cell

    r = run_cell(compose(*GPT2, *techs), str(tmp_path), 300)
    assert r["status"] == "ok", r.get("error")
    m = r["memory"]
    dev = m["by_device"][m["device_name"]]
    # same instrumented step, two independent counters: the tracker's storages and the allocator's peak
    assert abs(dev["tracker_peak_bytes"] / dev["allocator_peak_bytes"] - 1) <= rtol
    # the headline is the allocator's peak over plain steps
    assert m["peak_bytes"] == max(m["phases"][p]["cuda_max_allocated_bytes"] for p in ("timed", "rest"))
    if not techs:
        assert m["model_states"]["params"] == 4 * r["workload"]["num_params"]
        assert dev["allocator_peak_bytes"] == m["peak_bytes"]  # the tracker adds no allocation of its own


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


def test_cuda_memory_budget_turns_into_oom_and_is_lifted_after_the_run():
    import torch

    from membench.errors import MemoryBudgetExceeded

    with pytest.raises((MemoryBudgetExceeded, torch.OutOfMemoryError)):
        run_inprocess("workload=gpt_small", *STEPS, "run.memory_budget_mib=8")
    # the per-process fraction must not outlive the run (the first GPU check's later tests all failed at 8 MiB)
    torch.ones(64 * 2**20, device="cuda")
