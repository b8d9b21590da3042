"""The CUDA caching allocator replayed over the simulated step (issue 17, item 6): the step's trace is complete
(its live-bytes peak is MemTracker's peak, by another mechanism), the replay follows the allocator's documented
rules (c10/cuda/CUDACachingAllocator.cpp: 512-byte rounding, 2 MiB small segments, 20 MiB large segments, own
segments from 10 MiB rounded to 2 MiB, block splitting and reuse), and, on a GPU, equals torch's own counters for
the same allocation sequence (marked gpu: skipped here)."""

from __future__ import annotations

import pytest
import torch

from membench.simulate import replay_allocator, simulate
from tests.helpers import compose, config_parts

MiB = 1 << 20


@pytest.mark.parametrize(
    "overrides",
    [
        ("workload=gpt_tiny",),
        ("workload=gpt_tiny", "technique=[activation_checkpointing]"),
        ("workload=llama_tiny", "technique=[bf16_pure]"),
        ("workload=digits_cnn_tiny",),
    ],  # fmt: skip
    ids=["gpt", "gpt-ckpt", "llama-bf16_pure", "digits"],
)
def test_the_step_trace_holds_every_byte_the_tracker_counts(overrides):
    """AllocTrace (a dispatch mode: every storage an op creates, freed by a weakref finalizer) peaks where MemTracker
    does, to the byte; the replay's requested bytes peak there too, and rounding and segments only add."""
    got = simulate(*config_parts(compose(*overrides)), 4)
    a = got["allocator"]
    assert a["trace_peak_bytes"] == got["peak_bytes"] == a["requested_bytes"]
    assert a["requested_bytes"] <= a["allocated_bytes"] <= a["reserved_bytes"]
    assert a["rounding_bytes"] == a["allocated_bytes"] - a["requested_bytes"] > 0
    assert a["reserved_bytes"] % (2 * MiB) == 0  # every segment size here is a multiple of 2 MiB


def _replay(*sizes: int) -> dict:
    """Allocations in order; a negative entry frees the allocation of that 1-based index."""
    events, live = [], {}
    for i, n in enumerate(sizes, 1):
        if n > 0:
            events.append((i, n))
            live[i] = n
        else:
            events.append((-n, -live.pop(-n)))
    return replay_allocator([], events, warm_up=False)


@pytest.mark.parametrize(
    ("sizes", "allocated", "reserved"),
    [
        ((1,), 512, 2 * MiB),  # rounded to 512 B, from a 2 MiB small segment
        ((1000, 1000), 2048, 2 * MiB),  # both in the same small segment
        ((MiB + 1,), MiB + 512, 20 * MiB),  # a large request under 10 MiB: a 20 MiB segment
        ((3 * MiB, 4 * MiB), 7 * MiB, 20 * MiB),  # split: the rest (> 1 MiB) stays cached, the next fits in it
        ((19 * MiB + 512 * 1024,), 20 * MiB, 20 * MiB),  # rest 512 KiB <= 1 MiB: not split, the block is counted whole
        ((10 * MiB + 1,), 10 * MiB + 512, 12 * MiB),  # 10 MiB and over: its own segment, rounded up to 2 MiB
        ((2 * MiB, 20 * MiB, -1, 3 * MiB), 23 * MiB, 40 * MiB),  # freed blocks are reused, not released
    ],
)
def test_replay_follows_the_caching_allocators_rules(sizes, allocated, reserved):
    got = _replay(*sizes)
    assert (got["allocated_bytes"], got["reserved_bytes"]) == (allocated, reserved)


@pytest.mark.gpu
def test_replay_equals_torch_cuda_counters_on_a_gpu():
    """The same sequences on the real allocator (a fresh process's device: nothing cached before)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_reserved()
    held = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in (1, 1000, MiB + 1, 3 * MiB, 4 * MiB)]
    got = replay_allocator([(i, t.numel()) for i, t in enumerate(held)], [])
    assert torch.cuda.max_memory_allocated() == got["allocated_bytes"]
    assert torch.cuda.max_memory_reserved() - base == got["reserved_bytes"]


def test_cpu_planned_allocator_peak_against_the_h200_records():
    """The committed H200 records of gpt2, batch 8 (results/gpu: baseline, activation checkpointing, bf16), against
    the replay of the step simulated here on CPU kernels: torch.cuda.max_memory_allocated of the memory step within
    5% (measured -1.9%, -3.6%, -2.7%: the CPU kernels' saved tensors and temporaries differ from CUDA's, as the
    tracker's own peak does). Reserved is documented, not held to a bound (docs/plan.md: -4.2%, -21.3%, -5.5%)."""
    import json

    from membench.readme import ROOT

    records = [json.loads(p.read_text()) for p in sorted((ROOT / "results" / "gpu" / "runs").glob("*.json"))]
    records = [r for r in records if r["status"] == "ok" and r["config"]["workload"]["preset"] == "gpt2"]
    assert len(records) == 3
    for r in records:
        techs = list(r["config"].get("technique") or {})
        overrides = ["workload=gpt2", f"technique=[{','.join(techs)}]", "run.batch_size=8"]
        overrides += [f"technique.{t}.{k}={v}" for t in techs for k, v in r["config"]["technique"][t].items()
                      if k != "_target_" and not isinstance(v, (dict, list))]  # fmt: skip
        got = simulate(*config_parts(compose(*overrides)), 8)["allocator"]
        recorded = r["memory"]["phases"]["memory_step"]["cuda_max_allocated_bytes"]
        assert abs(got["allocated_bytes"] - recorded) / recorded < 0.05, (techs, got, recorded)
