"""Measurement: memory by category (torch's MemTracker), FLOPs (FlopCounterMode), step-time statistics.

Memory and FLOPs are measured in their own instrumented steps; timed steps run with no instrumentation.
FlopCounterMode has no formula for the CPU flash-attention kernel in torch 2.x, so we register torch's own
SDPA formulas for it (forward 4bhs_qs_kd, backward 2x that); the record says when this was done.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")
CATEGORIES = ("params", "grads", "optimizer", "activations", "other")
# MemTracker reference types -> record categories. Buffers (BN running stats) count as parameters' kin.
_MT_MAP = {"PARAM": "params", "BUFFER": "params", "GRAD": "grads", "OPT": "optimizer", "ACT": "activations"}

_aten = torch.ops.aten
_CPU_FLASH = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BWD = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
CPU_ATTENTION_FORMULA_ADDED = False


def _register_cpu_attention_formula() -> None:
    global CPU_ATTENTION_FORMULA_ADDED
    if _CPU_FLASH is None or _CPU_FLASH.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(_CPU_FLASH)
    def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(_CPU_FLASH_BWD)
    def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    CPU_ATTENTION_FORMULA_ADDED = True


_register_cpu_attention_formula()


def _categorise(snapshot: dict) -> dict[str, int]:
    out = dict.fromkeys(CATEGORIES, 0)
    for dev_stats in snapshot.values():
        for ref, nbytes in dev_stats.items():
            name = getattr(ref, "name", str(ref))
            if name == "Total":
                continue
            out[_MT_MAP.get(name, "other")] += int(nbytes)
    return out


@dataclass
class MemoryMeasurement:
    peak_bytes: int
    by_category: dict[str, int]  # split at the peak
    after_forward: dict[str, int]  # split right after the loss is computed: what is held for backward
    device: dict[str, int] = field(default_factory=dict)


class _NoHook:
    @staticmethod
    def remove() -> None:
        pass


def measure_memory(step: Callable[[Callable[[], None]], T], model, optimizer) -> tuple[MemoryMeasurement, T]:
    """Run one training step under MemTracker. `step(after_forward)` must call after_forward() between
    computing the loss and calling backward. Returns the measurement and the step's own result."""
    mt = MemTracker()
    # MemTracker installs a grad hook on every parameter and raises on frozen ones (quantized or LoRA-frozen
    # bases); a no-op handle marks them hooked, so they are still tracked as PARAM, just without a grad hook.
    for p in model.parameters():
        if not p.requires_grad:
            mt._param_to_grad_hook_handles[p] = (_NoHook, _NoHook)
    mt.track_external(model, optimizer)
    held: dict[str, int] = {}

    def after_forward():
        held.update(_categorise(mt.get_tracker_snapshot("current")))

    with mt:
        result = step(after_forward)
    peak = _categorise(mt.get_tracker_snapshot("peak"))
    return MemoryMeasurement(peak_bytes=sum(peak.values()), by_category=peak, after_forward=held), result


def count_flops(step: Callable[[], T]) -> tuple[int, dict[str, int], T]:
    with FlopCounterMode(display=False) as fc:
        result = step()
    by_op = {str(op): int(n) for op, n in fc.get_flop_counts().get("Global", {}).items()}
    return int(fc.get_total_flops()), by_op, result


def timing_stats(step_times_s: list[float], samples_per_step: int, tokens_per_sample: int) -> dict:
    """Throughput = samples / total measured time (not 1 / mean of anything)."""
    total = sum(step_times_s)
    q = statistics.quantiles(step_times_s, n=4, method="inclusive") if len(step_times_s) > 1 else [0, 0, 0]
    samples = samples_per_step * len(step_times_s)
    return {
        "step_times_s": step_times_s,
        "median_step_s": statistics.median(step_times_s),
        "iqr_step_s": q[2] - q[0],
        "total_measured_s": total,
        "samples_per_s": samples / total,
        "tokens_per_s": samples * tokens_per_sample / total,
    }
