"""Predictor (b): one real training step of the configured model on fake tensors, measured by MemTracker.

torch's FakeTensorMode gives every tensor a shape, dtype and device but no storage, so the workload, its
techniques and a warm-up + measured step run as written (torchtitan estimates memory the same way) while
MemTracker counts bytes by category exactly as in a real run. Large presets: when `max_layers` is set and the
workload has more blocks, the step is simulated at two layer counts and extrapolated per layer (the blocks
are identical), which is exact when peak bytes are affine in the layer count.

Each technique declares how it runs here (membench/technique.py): as itself, as a stand-in (e.g. fp16 as bf16
autocast: same bytes), dropped (post-training techniques: a training step is the baseline's), or not at all, with
the reason in its `not_simulated` (no fake-tensor kernels, or data-dependent host reads). The planner adds the
analytic model-state difference for the techniques left out (predictor "hybrid").
"""

from __future__ import annotations

import dataclasses
import functools
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from membench import measure
from membench import technique as compose
from membench.technique import Context


def split(techniques) -> tuple[list, list]:
    """(what runs on fake tensors, left out): each technique's stand-in (`simulated()`, None drops it), unless it
    declares `not_simulated`."""
    sim, rest = [], []
    for t in techniques:
        if t.not_simulated:
            rest.append(t)
        elif (s := t.simulated()) is not None:
            sim.append(s)
    return sim, rest


def layer_key(wcfg) -> str | None:
    """The config field counting identical blocks, as the workload declares it (`@schema(depth=...)`)."""
    return getattr(wcfg, "depth_knob", None)


def _step(wl, model, optimizer, patch, batch_size, device, after_forward=None) -> None:
    batch = wl.batch(0, batch_size, device)  # made inside the step, as in execute.py: the tracker counts it
    with patch.step_context():
        loss = wl.loss(model, batch)
    if after_forward:
        after_forward()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def simulate_once(wcfg, techniques, batch_size: int, seed: int = 0, device: str = "cpu") -> dict:
    """One warm-up step (allocates optimizer state) then one MemTracker step, all on fake tensors. `device`:
    fake CUDA tensors need a CUDA build with a visible device; CUDA plans made without one use CPU kernels."""
    device = torch.device(device)
    build_dtype = next((t.fake_build_dtype for t in techniques if t.fake_build_dtype is not None), None)
    default_dtype = torch.get_default_dtype()
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.manual_seed(seed)
        # Module.to() cannot swap fake parameters: a stand-in may ask for the model built in its dtype (same bytes)
        torch.set_default_dtype(build_dtype or default_dtype)
        try:
            with device:  # Module.to() cannot swap fake parameters either: build on the device directly
                wl = wcfg.build(seed)
        finally:
            torch.set_default_dtype(default_dtype)
        ctx = Context(workload=wl, device=device, run=None)
        model, patch = compose.apply_all(compose.ordered(techniques), wl.model, ctx)
        wl.model = model
        optimizer = wl.make_optimizer([p for p in model.parameters() if p.requires_grad])
        _step(wl, model, optimizer, patch, batch_size, device)
        step = functools.partial(_step, wl, model, optimizer, patch, batch_size, device)
        split, _ = measure.measure_memory(step, model, optimizer)
        state = sum(
            v.untyped_storage().nbytes() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
        )
    dev = max(split.peak, key=split.total) if split.peak else str(device)  # the simulated device's own split
    cats = measure.categorise(split.peak.get(dev, {}), state, split.category_map)
    after = measure.categorise(split.after_forward.get(dev, {}), state, split.category_map)
    return {"peak_bytes": sum(cats.values()), "by_category": cats, "after_forward": after}


def simulate(wcfg, techniques, batch_size: int, seed: int = 0, max_layers: int | None = 4, device: str = "cpu") -> dict:
    """Fake-tensor peak of the simulatable `techniques`; per-layer extrapolation above `max_layers` blocks.
    Returns peak_bytes, by_category, method, the kinds left out, and the seconds it took."""
    t0 = time.perf_counter()
    sim, rest = split(techniques)
    key = layer_key(wcfg)
    n = getattr(wcfg, key) if key else None
    if key is None or max_layers is None or n <= max_layers:
        out = simulate_once(wcfg, sim, batch_size, seed, device)
        method = "fake-tensor step, full model"
    else:
        period = max([t.layer_period() for t in sim] + [1])
        lo, hi = period, 2 * period
        a = simulate_once(dataclasses.replace(wcfg, **{key: lo}), sim, batch_size, seed, device)
        b = simulate_once(dataclasses.replace(wcfg, **{key: hi}), sim, batch_size, seed, device)
        f = (n - lo) / (hi - lo)
        cats = {c: a["by_category"][c] + f * (b["by_category"][c] - a["by_category"][c]) for c in a["by_category"]}
        out = {"peak_bytes": a["peak_bytes"] + f * (b["peak_bytes"] - a["peak_bytes"]), "by_category": cats}
        method = f"fake-tensor steps at {key}={lo},{hi}, extrapolated per layer to {n}"
    out.update(device=str(device), method=method, left_out=[t.kind for t in rest], seconds=time.perf_counter() - t0)
    return out
