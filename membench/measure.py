"""Measurement: memory per phase and per device, the tracker's split by category, FLOPs, step-time statistics.

Two independent sources of memory figures, never mixed:
- the device's own counters, per phase of the step schedule (PhaseMeter): on CUDA the caching allocator's peak
  (allocated and reserved, reset at every phase boundary) and NVML's device-wide used memory (what nvidia-smi
  shows: CUDA context, NCCL and kernel workspaces outside torch's allocator); on every device the process RSS
  high-water (Linux's VmHWM, reset per phase through /proc/self/clear_refs);
- torch's MemTracker over one instrumented step, which attributes every storage it sees to a category, per device,
  at that device's own peak moment. On CUDA the allocator's peak of the same step minus the tracker's total is
  reported as `untracked` (kernel workspaces, allocations the dispatcher never sees), so the split adds up.
Host (cpu) and device figures are kept apart: an offloaded optimizer state is a host byte, never a device byte.
FlopCounterMode has no formula for the CPU flash-attention kernel in torch 2.x, so we register torch's own SDPA
formulas for it (forward 4bhs_qs_kd, backward 2.5x that: five matmuls against two); torch before 2.13 rejects
grouped k/v heads in its SDPA
formulas, so there the FLOP step counts them over the query heads as 2.13 does; the record says when either
was done.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.flop_counter import FlopCounterMode

from membench import gpuinfo
from membench.sections import CATEGORIES

T = TypeVar("T")
# MemTracker reference types -> record categories. Buffers (BN running stats) count as parameters' kin.
_MT_MAP = {
    "PARAM": "params",
    "BUFFER": "params",
    "GRAD": "grads",
    "OPT": "optimizer",
    "ACT": "activations",
    "TEMP": "temporaries",
}

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


def _repeat_heads(kv_shape, query_shape) -> tuple:
    b, _, s, d = kv_shape
    return (b, query_shape[1], s, d)


def _grouped_attention_formulas() -> dict:
    """FlopCounterMode formulas for SDPA on grouped k/v heads (enable_gqa), where torch's own reject them.

    torch 2.11's sdpa_flop_count asserts equal query and k/v heads, so a grouped-query model's FLOP step raised
    on the GPU (flash attention takes grouped k/v); torch 2.13's formula counts the products over the query
    heads (the kernel broadcasts k/v). Where torch's formula refuses a grouped shape, these count it that way:
    k/v shapes repeated to the query heads, then torch's own formulas. Empty where torch handles it."""
    try:
        flop_counter.sdpa_flop_count((1, 2, 4, 8), (1, 1, 4, 8), (1, 1, 4, 8))
        return {}
    except AssertionError:
        pass

    def fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        rep = functools.partial(_repeat_heads, query_shape=query_shape)
        return flop_counter.sdpa_flop_count(query_shape, rep(key_shape), rep(value_shape))

    def bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        rep = functools.partial(_repeat_heads, query_shape=query_shape)
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, rep(key_shape), rep(value_shape))

    ops = {}
    for name in ("flash_attention", "efficient_attention", "cudnn_attention", "flash_attention_for_cpu"):
        for suffix, formula in (("", fwd), ("_backward", bwd)):
            op = getattr(_aten, f"_scaled_dot_product_{name}{suffix}", None)
            if op is not None:
                ops[op] = formula
    return ops


GROUPED_ATTENTION_FORMULAS = _grouped_attention_formulas()


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    """One storage, wherever its views are: (device, data pointer)."""
    return str(t.device), t.untyped_storage().data_ptr()


# ---------------------------------------------------------------------------------------------------------------
# Device counters per phase


def _vm_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field_name}:\s+(\d+)", f.read()).group(1))


def machine_load() -> dict:
    """The machine's load now: 1-minute load average and runnable threads (/proc/stat procs_running, this
    process's own running threads included)."""
    with open("/proc/stat") as f:
        running = int(re.search(r"procs_running\s+(\d+)", f.read()).group(1))
    return {"load_avg_1m": os.getloadavg()[0], "procs_running": running}


def _reset_rss_peak() -> bool:
    """Linux resets VmHWM to the current RSS when "5" is written to clear_refs (since 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhaseMeter:
    """Per-phase device counters: `with meter.phase("timed"): ...`; results in `meter.phases[name]`.

    CUDA: allocator peak allocated/reserved (reset at the phase's start) and the allocation at its end; NVML's
    device-wide used bytes (max of the samples taken with `sample()` and at the phase's end) and the energy
    counter's difference over the phase. Every device: wall seconds and the process RSS high-water."""

    def __init__(self, device: torch.device, nvml_handle=None):
        self.device = device
        self.nvml = nvml_handle
        self.phases: dict[str, dict] = {}
        self._current: dict | None = None

    def sample(self) -> None:
        """Read NVML's used bytes now (call between steps: the allocator's peak needs no sampling)."""
        if self._current is not None and self.nvml is not None:
            used = gpuinfo.used_bytes(self.nvml)
            if used is not None:
                self._current["nvml_used_max_bytes"] = max(self._current.get("nvml_used_max_bytes") or 0, used)

    def phase(self, name: str):
        return _Phase(self, name)


class _Phase:
    def __init__(self, meter: PhaseMeter, name: str):
        self.meter, self.name = meter, name

    def __enter__(self) -> dict:
        m, dev = self.meter, self.meter.device
        rec: dict = {}
        m._current = rec
        rss_reset = _reset_rss_peak()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            rec["cuda_allocated_start_bytes"] = torch.cuda.memory_allocated(dev)
        if m.nvml is not None:
            self._energy0 = gpuinfo.energy_mj(m.nvml)
        self._rss_reset = rss_reset
        rec["load_start"] = machine_load()
        self._t0 = time.perf_counter()
        return rec

    def __exit__(self, exc_type, exc, tb) -> None:
        m, dev, rec = self.meter, self.meter.device, self.meter._current
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        rec["wall_s"] = time.perf_counter() - self._t0
        rec["load_end"] = machine_load()
        rec["rss_peak_bytes"] = _vm_kib("VmHWM") * 1024 if self._rss_reset else None
        rec["rss_end_bytes"] = _vm_kib("VmRSS") * 1024
        if dev.type == "cuda":
            rec["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
            rec["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
            rec["cuda_allocated_end_bytes"] = torch.cuda.memory_allocated(dev)
        if m.nvml is not None:
            m.sample()
            e1 = gpuinfo.energy_mj(m.nvml)
            rec["energy_j"] = (e1 - self._energy0) / 1e3 if e1 is not None and self._energy0 is not None else None
        m.phases[self.name] = rec
        m._current = None


# ---------------------------------------------------------------------------------------------------------------
# The tracker's split


@dataclass
class TrackerSplit:
    """MemTracker over one step, per device (str): categories at that device's peak moment, and right after the
    loss is computed (what is held for backward). `extra` = bytes re-attributed to technique categories."""

    peak: dict[str, dict[str, int]]
    after_forward: dict[str, dict[str, int]]
    extra: dict[str, dict[str, int]] = field(default_factory=dict)
    category_map: dict[str, str] = field(default_factory=lambda: dict(_MT_MAP))

    def total(self, dev: str) -> int:
        return sum(self.peak.get(dev, {}).values())


class _NoHook:
    @staticmethod
    def remove() -> None:
        pass


def by_name(snapshot: dict) -> dict[str, dict[str, int]]:
    """A MemTracker snapshot as {device: {reference type: bytes}}, its Total left out."""
    out: dict[str, dict[str, int]] = {}
    for dev, stats in snapshot.items():
        d = out.setdefault(str(dev), {})
        for ref, nbytes in stats.items():
            name = getattr(ref, "name", str(ref))
            if name != "Total":
                d[name] = d.get(name, 0) + int(nbytes)
    return out


@contextlib.contextmanager
def _mod_tracker_grad_hooks_removed():
    """torch's ModTracker (inside MemTracker and FSDPMemTracker) puts a multi-grad hook on every module's inputs and
    outputs and never removes it. An input's hook hangs on that tensor's grad_fn and its closure holds the same
    grad_fn: a cycle through C++ that Python's gc cannot see, so the instrumented step's autograd graph (every node
    upstream of a hooked input) outlives the step. Backward frees the graph's saved tensors, but not what a custom
    Function keeps as a ctx attribute: bitsandbytes' int8 matmuls keep their input there (MatMul8bitLt
    ctx.tensors, MatMul8bitFp ctx.A), so every later step carried the memory step's int8-layer inputs (gpt2 b=8:
    +2016 MiB from the FLOP step on). Keep the handles and remove the hooks once the step is done."""
    from torch.distributed._tools import mod_tracker

    register, handles = mod_tracker.register_multi_grad_hook, []

    def keep(*args, **kwargs):
        handles.append(register(*args, **kwargs))
        return handles[-1]

    mod_tracker.register_multi_grad_hook = keep
    try:
        yield
    finally:
        mod_tracker.register_multi_grad_hook = register
        for h in handles:
            h.remove()


def measure_memory(
    step: Callable[[Callable[[], None]], T],
    model,
    optimizer,
    extra: Callable[[], dict[str, list[torch.Tensor]]] | None = None,
    tracker_factory: Callable | None = None,
    category_map: dict[str, str] | None = None,
) -> tuple[TrackerSplit, T]:
    """Run one training step under MemTracker. `step(after_forward)` must call after_forward() between computing
    the loss and calling backward. `extra()`: tensors a technique holds as model state that are neither
    parameters, buffers, grads nor optimizer.state entries (by category). Called before the step, its storages are
    tracked from the first op (each once); called again after it (some exist only once a step has run), every
    storage the tracker saw is reported under the technique's category instead of the one the tracker gave it
    (DDP's gradient buckets, which it otherwise counts as activations). `tracker_factory(model, optimizer)` and
    `category_map` (its reference names -> ours) replace MemTracker for wrappers whose tracker knows more
    (FSDPMemTracker's unsharded parameters and all-gather buffers; DeepSpeed's inner optimizer)."""
    mt = _tracker(model, optimizer, tracker_factory)
    owned: dict[tuple[str, int], tuple[str, torch.UntypedStorage]] = {}  # extra storages -> (category, storage)
    _collect_extra(mt, extra, owned, register=True)
    held: dict = {}

    def after_forward():
        held.update(mt.get_tracker_snapshot("current"))

    with _mod_tracker_grad_hooks_removed(), mt:
        result = step(after_forward)
    _collect_extra(mt, extra, owned, register=False)
    peak, after = by_name(mt.get_tracker_snapshot("peak")), by_name(held)
    moved = _reattribute(mt, owned, peak, after)
    cmap = {**_MT_MAP, **(category_map or {})}
    return TrackerSplit(peak=peak, after_forward=after, extra=moved, category_map=cmap), result


def _tracker(model, optimizer, tracker_factory: Callable | None):
    """MemTracker over the model and optimizer, or the wrapper's own tracker."""
    if tracker_factory is not None:
        mt = tracker_factory(model, optimizer)
    else:
        # imported here: it pulls in dtensor/dynamo (~2 s), which planning a sweep never needs
        from torch.distributed._tools.mem_tracker import MemTracker

        mt = MemTracker()
        mt.track_external(model, optimizer)
    # MemTracker installs a grad hook on every parameter and raises on frozen ones (quantized or LoRA-frozen
    # bases); a no-op handle marks them hooked, so they are still tracked as PARAM, just without a grad hook.
    for p in model.parameters():
        if not p.requires_grad:
            mt._param_to_grad_hook_handles.setdefault(p, (_NoHook, _NoHook))
    return mt


def _collect_extra(mt, extra: Callable | None, owned: dict, register: bool) -> None:
    """Extra storages not already known as params/optimizer state: registered before the step (MemTracker's
    "other"), so they count from its first op; their final reference type says where the tracker put their bytes."""
    for cat, ts in (extra() if extra else {}).items():
        for t in ts:
            st = t.untyped_storage()
            if st.nbytes() > 0 and storage_key(t) not in owned:
                owned[storage_key(t)] = (cat, st)
                if register and st not in mt._WINFO:
                    mt.track_external(t)


def _reattribute(mt, owned: dict, peak: dict, after: dict) -> dict[str, dict[str, int]]:
    """Move each extra storage's bytes from the reference type the tracker gave it to the technique's category, in
    both snapshots; returns what moved at the peak, by device and category."""
    moved: dict[str, dict[str, int]] = {}
    for (dev, _), (cat, st) in owned.items():
        winfo = mt._WINFO.get(st, (None, None))[0]
        if winfo is None:
            continue
        ref, n = winfo.reftype.name, winfo.mem_consumed
        for snap in (peak, after):
            d = snap.get(dev)
            # a storage registered before the step sits in "other" until the tracker re-types it (DeepSpeed stage 3's
            # reduce bucket becomes GRAD at the first gradient it holds): a snapshot taken before then has it there
            src = "OTH" if d is not None and d.get(ref, 0) < n <= d.get("OTH", 0) else ref
            if d is not None and d.get(src, 0) >= n:
                d[src] -= n
                d[cat] = d.get(cat, 0) + n
                if snap is peak:
                    moved.setdefault(dev, {})
                    moved[dev][cat] = moved[dev].get(cat, 0) + n
    return moved


def with_tracker(tracker_factory: Callable, category_map: dict[str, str]) -> Callable:
    """measure_memory with a wrapper's own tracker, for Patch.measure_memory."""
    return functools.partial(measure_memory, tracker_factory=tracker_factory, category_map=category_map)


def categorise(
    by_ref: dict[str, int], optimizer_state_bytes: int, category_map: dict[str, str] = _MT_MAP
) -> dict[str, int]:
    """Reference-type bytes of one device -> record categories. Names that are not MemTracker's are a technique's
    own categories (re-attributed extra state, e.g. fp32_master) and pass through. The tracker calls everything
    allocated inside optimizer.step() optimizer memory; the part beyond the exact persistent state on this device
    is the step's temporaries."""
    out = dict.fromkeys(CATEGORIES, 0)
    for ref, n in by_ref.items():
        cat = category_map.get(ref) or ("other" if ref == "OTH" else ref)
        out[cat] = out.get(cat, 0) + n
    out["optimizer_temp"] = max(0, out["optimizer"] - optimizer_state_bytes)
    out["optimizer"] -= out["optimizer_temp"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and time


def count_flops(step: Callable[[], T]) -> tuple[int, dict[str, int], T]:
    with FlopCounterMode(display=False, custom_mapping=GROUPED_ATTENTION_FORMULAS) as fc:
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


# ---------------------------------------------------------------------------------------------------------------
# Where the allocator's peak lives (CUDA, opt-in: run.cuda_memory_history=true)

_OWN_CODE = ("/membench/", "/workloads/", "/techniques/", "/deepspeed/", "/bitsandbytes/", "/torchao/")


def _site(frames: list[dict]) -> str:
    """An allocation's site: the innermost frame in this project or a technique library, and the innermost frame."""
    own = next((f for f in frames if any(s in f["filename"] for s in _OWN_CODE)), None)
    inner = frames[0] if frames else None
    name = lambda f: f"{f['filename'].rsplit('/', 2)[-2:][-1]}:{f['line']} {f['name']}"  # noqa: E731
    if own is None:
        return name(inner) if inner else "(no python frame)"
    return name(own) + ("" if own is inner else f" <- {inner['name']}")


def cuda_history_at_peak(snapshot: dict, allocated_at_start: int, top: int = 12) -> dict:
    """From torch.cuda.memory._snapshot() taken after recording one step: the moment allocated bytes peaked and
    the live blocks at that moment allocated during the step, grouped by allocation site (largest first).
    Blocks allocated before recording began are one line, "before the step"."""
    live: dict[int, tuple[int, str]] = {}
    cur = peak = allocated_at_start
    at_peak: dict[int, tuple[int, str]] = {}
    for trace in snapshot.get("device_traces", []):
        for ev in trace:
            if ev["action"] == "alloc":
                live[ev["addr"]] = (ev["size"], _site(ev.get("frames", [])))
                cur += ev["size"]
                if cur > peak:
                    peak, at_peak = cur, dict(live)
            elif ev["action"] == "free_completed" and ev["addr"] in live:
                cur -= live.pop(ev["addr"])[0]
    sites: dict[str, int] = {}
    for size, site in at_peak.values():
        sites[site] = sites.get(site, 0) + size
    ranked = sorted(sites.items(), key=lambda kv: -kv[1])
    return {
        "peak_allocated_bytes": peak,
        "before_the_step_bytes": allocated_at_start,
        "live_at_peak_by_site": [{"site": s, "bytes": n} for s, n in ranked[:top]],
        "other_sites_bytes": sum(n for _, n in ranked[top:]),
    }


def next_micro_batch() -> None:
    """MemTracker refuses a module's second forward inside one tracked step ("multiple iterative calls") until its
    per-module stats are cleared; a record (and the simulation) reads only its per-device snapshots, which this
    leaves alone. Called between the micro-batches of one step (run.grad_accum_steps)."""
    for mode in _get_current_dispatch_mode_stack():
        if hasattr(mode, "reset_mod_stats"):
            mode.reset_mod_stats()
