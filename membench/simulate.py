"""Predictor (b): one real training step of the configured model on fake tensors, measured by MemTracker per phase.

torch's FakeTensorMode gives every tensor a shape, dtype and device but no storage, so the workload, its
techniques and a warm-up + measured step run as written (torchtitan estimates memory the same way) while
MemTracker counts bytes by category exactly as in a real run. The measured step is split into phases (forward,
backward, optimizer step): each phase keeps the categories at its own peak, so a technique left out of the
simulation can have its model-state bytes put in place of the simulated ones phase by phase (`replace_states`),
and the peak may move to another phase. Large presets: when `max_layers` is set and the workload has more
blocks, the step is simulated at two layer counts and each phase extrapolated per layer (the blocks are
identical), which is exact when each phase's bytes are affine in the layer count; `affine` does the same in batch.

Each technique declares how it runs here (membench/technique.py): as itself, as a stand-in (e.g. fp16 as bf16
autocast: same bytes), dropped (post-training techniques: a training step is the baseline's), or not at all, with
the reason in its `not_simulated` (no fake-tensor kernels, or data-dependent host reads): predictor "hybrid".

The step's allocations and frees are traced too (`AllocTrace`) and replayed through the rules of torch's CUDA
caching allocator (`replay_allocator`): the bytes torch.cuda would report as allocated and reserved. No library
replays a trace through those rules on a machine without the device (torch's allocator runs only on one; its
memory snapshots record a real device's history), hence this model of them.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import time
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from membench import measure
from membench import technique as compose
from membench.technique import Context

# "backward_start": from the loss to the first parameter gradient (the loss's and the head's backward, before any
# gradient hook fires); "backward": from there to the end of backward. A library buffer allocated in the first
# gradient hook (DeepSpeed's stage 1-2 reduce bucket) is live in the second only (replace_states' `live`).
PHASES = compose.STEP_PHASES
STATE_CATEGORIES = ("params", "grads", "optimizer")
AS_SIMULATED = "as_simulated"  # in States.live: a state category follows the simulated profile in the phases listed


def split(techniques, world_size: int | None = None) -> tuple[list, list]:
    """(what runs on fake tensors, left out): each technique's stand-in (`simulated()`, None drops it), unless it
    declares `not_simulated`, or it owns the process group (`distributed`) and the simulation was not given the
    world size to fake. A technique left out may still act on the step through its optional `hybrid_stand_in()`
    (zero: FSDP2's mixed-precision policy on the activations, its states replaced by its `states` step)."""
    sim, rest = [], []
    for t in techniques:
        if t.not_simulated or (t.distributed and world_size is None):
            rest.append(t)
            stand_in = getattr(t, "hybrid_stand_in", None)
            if stand_in is not None and (s := stand_in()) is not None:
                sim.append(s)
        elif (s := t.simulated()) is not None:
            sim.append(s)
    return sim, rest


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """torch's fake process group (torch.testing._internal.distributed.fake_pg, what torchtitan's memory estimation
    uses): collectives return at once without touching data, so FSDP2 shards fake parameters over `world_size` ranks
    in this one process and the tracker sees rank 0's bytes: its shards, all-gather and reduce-scatter buffers."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("simulate: a process group is already initialized; the simulation needs its own fake one")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _leaves(ts):
    """Plain tensors holding the bytes: a tensor subclass (FSDP2's DTensor shards) by its inner tensors."""
    for t in ts:
        if hasattr(t, "__tensor_flatten__"):
            yield from _leaves(getattr(t, n) for n in t.__tensor_flatten__()[0])
        elif torch.is_tensor(t):
            yield t


def layer_key(wcfg) -> str | None:
    """The config field counting identical blocks, as the workload declares it (`@schema(depth=...)`)."""
    return getattr(wcfg, "depth_knob", None)


def cast_floating(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """`model.to(dtype)` on fake tensors: Module.to() swaps fake parameters with swap_tensors, which refuses
    tensors FakeTensorMode holds weak references to; setting `.data` keeps each Parameter (and tied weights)
    as Module.to() does on real tensors. Buffers follow too (Llama's fp32 RoPE tables become bf16, as in a run)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    for m in model.modules():
        for k, b in m._buffers.items():
            if b is not None and b.is_floating_point():
                m._buffers[k] = b.to(dtype)


def _step(wl, model, optimizer, patch, batch_size, device, mark, accum: int = 1) -> None:
    """One step as execute.py runs it: `accum` micro-batches of `batch_size` (forward + backward each, the earlier
    ones' gradients alive through the later ones), then the optimizer step. "forward" ends with the last
    micro-batch's forward."""
    for j in range(accum):
        if j:
            measure.next_micro_batch()
        batch = wl.batch(j, batch_size, device)  # made inside the step, as in execute.py: the tracker counts it
        with patch.step_context():
            loss = wl.loss(model, batch)
        if accum > 1:
            loss = loss / accum
        hooks = []
        if j == accum - 1:
            mark("forward")
            hooks = _on_first_grad(model, lambda: mark("backward_start"))
        loss.backward()
        for h in hooks:
            h.remove()
    mark("backward")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mark("optimizer")


def _on_first_grad(model, fn) -> list:
    """Call `fn` once, when the first trainable parameter's gradient is accumulated (its post-accumulate-grad hook,
    the moment a library's gradient hook first fires); the hook handles, to remove after backward."""
    fired: list = []

    def hook(_p) -> None:
        if not fired:
            fired.append(True)
            fn()

    return [p.register_post_accumulate_grad_hook(hook) for p in model.parameters() if p.requires_grad]


def _warm_up(model, optimizer) -> None:
    """What a run's warm-up step leaves behind for the measured one: the optimizer's state. A backward of a loss
    that reads every trainable parameter once (zero times) gives each one a gradient without the model's forward
    (half of a simulation's time on large presets) and, unlike setting `.grad`, fires the gradient hooks, so an
    optimizer that steps in backward (post-accumulate-grad hooks) builds its state too; the measured step runs in
    full."""
    params = [p for p in model.parameters() if p.requires_grad]
    if params:
        torch.stack([(p * 0).sum().float() for p in params]).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _extra_bytes(patch) -> tuple[dict[str, int], list[torch.Tensor]]:
    """Bytes of the model state a technique keeps outside parameters and optimizer.state (Patch.extra_state: e.g.
    GaLore's projections in projector objects), by category, each storage once, and one tensor per storage. Fake
    storages all have data pointer 0, so a storage is told apart by its C++ object (`_cdata`)."""
    seen, out, held = set(), {}, []
    for cat, ts in (patch.extra_state() if patch.extra_state else {}).items():
        for t in ts:
            st = t.untyped_storage()
            if st._cdata not in seen and st.nbytes() > 0:
                seen.add(st._cdata)
                held.append(t)
                out[cat] = out.get(cat, 0) + st.nbytes()
    return out, held


def _attribute_extra(by_ref: dict, extra: dict[str, int]) -> dict:
    """The tracker counts extra state it was told about (track_external) as "other" (OTH); its category instead,
    as a run's measure_memory re-attributes it."""
    d = dict(by_ref)
    for cat, n in extra.items():
        moved = min(n, d.get("OTH", 0))
        d["OTH"] = d.get("OTH", 0) - moved
        d[cat] = d.get(cat, 0) + moved
    return d


def _phase_marker(holder: dict, phases: dict):
    """mark(name): the tracker's peak since the previous mark becomes that phase's; the peak restarts from now
    (MemTracker keeps one peak per step and has no public reset between phases, hence its two fields)."""

    def mark(name: str) -> None:
        mt = holder.get("mt")
        if mt is None:  # the warm-up step runs untracked
            return
        now = mt.get_tracker_snapshot("current")
        if name == "backward" and "backward_start" not in phases:  # no gradient hook fired (FSDP2 sets sharded
            phases["backward_start"] = phases["_end_forward"]  # grads itself): backward starts where forward ended
        phases[name] = measure.by_name(mt.get_tracker_snapshot("peak"))
        mt._peak_mem_snap = {d: dict(s) for d, s in now.items()}
        mt._peak_mem = {d: s["Total"] for d, s in now.items()}
        if name in ("forward", "backward"):  # held for backward; at the end of backward every gradient is live
            phases[f"_end_{name}"] = measure.by_name(now)
        if name == "backward" and holder.get("trace") is not None:  # where a first step creates optimizer state
            holder["trace"].events.append(STEP_MARK)

    return mark


def simulate_once(wcfg, techniques, batch_size: int, seed: int = 0, device: str = "cpu", accum: int = 1,
                  world_size: int | None = None) -> dict:  # fmt: skip
    """A warm-up (allocates optimizer state) then one MemTracker step, all on fake tensors. `device`:
    fake CUDA tensors need a CUDA build with a visible device; CUDA plans made without one use CPU kernels.
    A technique that owns the process group (zero's FSDP2) runs over a fake one of `world_size` ranks, as rank 0."""
    if any(t.distributed for t in techniques):
        if world_size is None:
            raise ValueError("simulate_once: a distributed technique needs world_size")
        with fake_process_group(world_size):
            return _simulate_once(wcfg, techniques, batch_size, seed, device, accum, sharded=True)
    return _simulate_once(wcfg, techniques, batch_size, seed, device, accum, sharded=False)


def _simulate_once(wcfg, techniques, batch_size: int, seed: int, device: str, accum: int, sharded: bool) -> dict:
    from torch.distributed._tools.mem_tracker import MemTracker

    device = torch.device(device)
    cast = next((t.fake_build_dtype for t in techniques if t.fake_build_dtype is not None), None)
    holder: dict = {}
    raw: dict = {}
    mark = _phase_marker(holder, raw)

    def tracker(model, optimizer):
        if own.get("tracker_factory") is not None:  # a wrapper's own tracker (FSDPMemTracker), as in its run
            holder["mt"] = mt = own["tracker_factory"](model, optimizer)
            if holder.get("extra"):
                mt.track_external(*holder["extra"])
            return mt
        holder["mt"] = mt = MemTracker()
        mt.track_external(model, optimizer, *holder.get("extra", ()))  # extra state: counted from the first op
        return mt

    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.manual_seed(seed)
        with device:  # Module.to(device) cannot move fake parameters: build on the device directly
            wl = wcfg.build(seed)
        if cast is not None:  # built as a run builds it (fp32), then cast as a run's model.to(dtype) does
            cast_floating(wl.model, cast)
        ctx = Context(workload=wl, device=device, run=None)
        model, patch = compose.apply_all(compose.ordered(techniques), wl.model, ctx)
        wl.model = model
        # the optimizer the run builds: a technique's (per-parameter steps in backward, low-memory optimizers), else
        # the workload's own
        make = patch.optimizer_factory or (lambda m: wl.make_optimizer([p for p in m.parameters() if p.requires_grad]))
        optimizer = make(model)
        # the tracker and categories a wrapper measures its run with (Patch.measure_memory = measure.with_tracker)
        own = getattr(patch.measure_memory, "keywords", {}) if patch.measure_memory else {}
        step = functools.partial(_step, wl, model, optimizer, patch, batch_size, device, mark, accum)
        if sharded:  # FSDP2's gradients come from its reduce-scatter hooks: a full step, as a run's warm-up
            step()
        else:
            _warm_up(model, optimizer)
        extra, held = _extra_bytes(patch)
        holder["extra"] = held
        # what the step allocates and frees, in order, over what is live before it (model, optimizer state, extra
        # state: what MemTracker counts too), for the caching allocator's replay (`replay_allocator`)
        opt_state = list(_leaves(v for st in optimizer.state.values() for v in st.values()))
        holder["trace"] = trace = AllocTrace(list(_leaves([*model.parameters(), *model.buffers(), *held])), opt_state)

        def traced() -> None:
            with trace:
                step()

        with wl.fake_tensor_context():  # the workload's word on what a fake step cannot read (hf: no packing)
            split, _ = measure.measure_memory(lambda after_forward: traced(), model, optimizer, tracker_factory=tracker,
                                              category_map=own.get("category_map"))  # fmt: skip
        state = extra.get("optimizer", 0) + sum(v.untyped_storage().nbytes() for v in opt_state)
    dev = max(split.peak, key=split.total) if split.peak else str(device)  # the simulated device's own split

    def cats(name: str) -> dict:
        return measure.categorise(_attribute_extra(raw[name].get(dev, {}), extra), state, split.category_map)

    phases = {p: cats(p) for p in PHASES}
    end = cats("_end_backward")
    states = {"params": end["params"], "grads": end["grads"], "optimizer": state}
    out = _summary(phases, states, cats("_end_forward"))
    out["allocator"] = replay_allocator(trace.initial, trace.events, deferred=trace.deferred)
    out["allocator"]["trace_peak_bytes"] = trace.peak()
    return out


def _summary(phases: dict, states: dict, after_forward: dict) -> dict:
    """`after_forward`: what the step holds right after the loss (what forward saved for backward)."""
    top = max(phases, key=lambda p: sum(phases[p].values()))
    return {"peak_bytes": sum(phases[top].values()), "by_category": dict(phases[top]), "peak_phase": top,
            "phases": phases, "states": states, "after_forward": after_forward}  # fmt: skip


def affine(a: dict, b: dict, f: float) -> dict:
    """a + f (b - a) for every phase category and measured state: two simulations (layer counts or batch sizes)
    extended along the line through them (the allocator replay's figures too: labelled as extrapolated)."""

    def line(x: dict, y: dict) -> dict:
        return {c: x[c] + f * (y[c] - x[c]) for c in x}

    phases = {p: line(a["phases"][p], b["phases"][p]) for p in PHASES}
    out = _summary(phases, line(a["states"], b["states"]), line(a["after_forward"], b["after_forward"]))
    if "allocator" in a and "allocator" in b:
        nums = {k: v for k, v in a["allocator"].items() if isinstance(v, (int, float))}
        out["allocator"] = {**line(nums, {k: b["allocator"][k] for k in nums}), "extrapolated": True}
    return out


def simulate(wcfg, techniques, batch_size: int, seed: int = 0, max_layers: int | None = 4, device: str = "cpu",
             accum: int = 1, world_size: int | None = None) -> dict:  # fmt: skip
    """Fake-tensor step of the simulatable `techniques`, per phase; per-layer extrapolation above `max_layers`
    blocks; `accum` micro-batches of `batch_size` per step (run.grad_accum_steps). Returns peak_bytes, by_category
    (at the peak phase), phases, states (the measured model states), method, the kinds left out, and the seconds it
    took. `world_size`: the ranks a distributed technique (zero's FSDP2) is simulated over (rank 0's bytes); None
    leaves such a technique out (hybrid)."""
    t0 = time.perf_counter()
    sim, rest = split(techniques, world_size)
    key = layer_key(wcfg)
    n = getattr(wcfg, key) if key else None
    if key is None or max_layers is None or n <= max_layers:
        out = simulate_once(wcfg, sim, batch_size, seed, device, accum, world_size)
        method = "fake-tensor step, full model"
    else:
        period = max([t.layer_period() for t in sim] + [1])
        lo, hi = period, 2 * period
        a = simulate_once(dataclasses.replace(wcfg, **{key: lo}), sim, batch_size, seed, device, accum, world_size)
        b = simulate_once(dataclasses.replace(wcfg, **{key: hi}), sim, batch_size, seed, device, accum, world_size)
        out = affine(a, b, (n - lo) / (hi - lo))
        method = f"fake-tensor steps at {key}={lo},{hi}, extrapolated per layer to {n}"
    ranks = world_size if any(t.distributed for t in sim) else 1
    if ranks > 1:
        method += f", rank 0 of {ranks} over a fake process group"
    out.update(device=str(device), method=method, left_out=[t.kind for t in rest], world_size=ranks,
               seconds=time.perf_counter() - t0)  # fmt: skip
    return out


def replace_states(s: dict, device_states: dict, other: dict, live: dict | None = None) -> dict:
    """The hybrid prediction: in every phase, the model-state categories of the simulation (which ran without the
    techniques it left out) are replaced by `device_states` (all techniques' pure `states` steps), each scaled by
    how much of that category the phase held (gradients build up during backward: a phase holding a third of the
    simulated gradients holds a third of the predicted ones); a category the simulation had none of is taken whole
    from the optimizer step on (params and optimizer state: in every phase). `other`: named device buffers the
    simulation cannot see (DeepSpeed's buckets), added to every phase, or only to the phases `live` names for it
    (a buffer the library allocates in its first gradient hook and frees at the end of backward: ("backward",)). A
    state category that `live` names is held whole in those phases (a buffer allocated at init, e.g. DeepSpeed stage
    3's flat gradient partition) instead of following the simulated profile; with AS_SIMULATED among its phases it
    follows the simulated profile in those phases and is not held in the others (DeepSpeed stage 1's gradients,
    freed before its optimizer step). A simulated category outside the states that `live` names is kept only in
    the phases it lists (the simulated optimizer's temporaries where the library steps its own optimizer, priced as
    a named buffer instead). Nothing is subtracted from a measured peak."""
    live = live or {}
    phases = {}
    for p in (p for p in PHASES if p in s["phases"]):
        cats = dict(s["phases"][p])
        for c in STATE_CATEGORIES:
            full, measured = device_states.get(c, 0.0), s["states"][c]
            held = live.get(c)
            if held is not None and p not in held:
                cats[c] = 0.0
            elif held is not None and AS_SIMULATED not in held:
                cats[c] = full
            elif measured > 0:
                cats[c] = cats[c] * full / measured
            else:
                cats[c] = full if (c != "grads" or p == "optimizer") else 0.0
        for c in [c for c in cats if c in live and c not in STATE_CATEGORIES and c not in other]:
            cats[c] = cats[c] if p in live[c] else 0
        for name, nbytes in other.items():
            cats[name] = cats.get(name, 0.0) + (nbytes if p in live.get(name, PHASES) else 0.0)
        phases[p] = cats
    return _summary(phases, dict(device_states), s["after_forward"])


# ---- the CUDA caching allocator, replayed over the simulated step -------------------------------------------------
STEP_MARK = (-1, 0)  # in a trace: the optimizer step begins (backward is done)


class AllocTrace(TorchDispatchMode):
    """Every storage an op of the step creates (its bytes) and when it is freed (a weakref finalizer on the storage,
    as MemTracker tracks them), in order, over what is alive before the step: `live` (model, extra state) and
    `optimizer` (its state, which a first step creates at its optimizer step). Its live-bytes peak equals
    MemTracker's total peak on the same step (tests/unit/test_plan_allocator.py)."""

    def __init__(self, live: list[torch.Tensor], optimizer: list[torch.Tensor] = ()):
        super().__init__()
        self.events: list[tuple[int, int]] = []  # (storage id, +bytes allocated | -bytes freed)
        self._ids: dict[int, int] = {}
        self._next = 0
        for t in live:
            self._add(t)
        self.initial, self.events = self.events, []
        for t in optimizer:
            self._add(t)
        self.deferred, self.events = self.events, []

    def _add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st._cdata in self._ids or st.nbytes() == 0:
            return
        self._ids[st._cdata] = i = self._next
        self._next += 1
        self.events.append((i, st.nbytes()))
        weakref.finalize(st, self._free, st._cdata, i, st.nbytes())

    def _free(self, key: int, i: int, nbytes: int) -> None:
        if self._ids.pop(key, None) is not None:
            self.events.append((i, -nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out

    def peak(self) -> int:
        cur = best = sum(n for _, n in self.initial + self.deferred)
        for _, n in self.events:
            cur += n
            best = max(best, cur)
        return best


# c10/cuda/CUDACachingAllocator.cpp (torch 2.x), default settings
MIN_BLOCK = 512  # kMinBlockSize: every request is rounded up to a multiple of 512 bytes
SMALL_SIZE = 1 << 20  # kSmallSize: requests up to 1 MiB come from the small pool
SMALL_BUFFER = 2 << 20  # kSmallBuffer: the small pool's segments are 2 MiB
LARGE_BUFFER = 20 << 20  # kLargeBuffer: large requests under kMinLargeAlloc share 20 MiB segments
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge: larger requests get a segment of their own, rounded up to 2 MiB


def replay_allocator(initial: list[tuple[int, int]], events: list[tuple[int, int]], warm_up: bool = True,
                     deferred: list[tuple[int, int]] = ()) -> dict:  # fmt: skip
    """The caching allocator's bytes over a simulated step: `initial` allocations (what is live before it), then
    the step's events twice (a warm-up step, whose freed blocks stay cached, then the measured one; once without
    `warm_up`; events are (id, +bytes) allocations and (id, -bytes) frees). `deferred` (the optimizer state) is
    allocated where the warm-up step reaches its optimizer step (STEP_MARK), among the blocks its backward left,
    as a run's first step creates it (without a warm-up: with `initial`). The model: one
    stream, best fit among the pool's cached free blocks (smallest that fits, lowest address first), a block split
    when the rest is >= 512 B (small pool) or > 1 MiB (large pool), neighbours merged on free, segments never
    released (no empty_cache, no out-of-memory retry, no expandable segments). Returns the peak of allocated block
    bytes (what torch.cuda.max_memory_allocated reports: requests rounded, unsplit remainders counted), the peak
    reserved (segments: torch.cuda.max_memory_reserved), and the requested bytes' peak; the differences are the
    named allocator terms: rounding (allocated - requested) and fragmentation (reserved - allocated)."""
    a = _Allocator()
    for i, n in [*initial, *(() if warm_up else deferred)]:
        a.malloc(("init", i), n)
    for rnd in ("warm", "step") if warm_up else ("step",):
        if rnd == "step":
            a.reset_peaks()
        for i, n in events:
            if (i, n) == STEP_MARK:
                for j, m in deferred if rnd == "warm" else ():
                    a.malloc(("init", j), m)
            elif n > 0:
                a.malloc((rnd, i), n)
            else:  # a storage the step frees: allocated in this round, else live before the step
                a.free((rnd, i)) or a.free(("init", i))
    return {"requested_bytes": a.peak_requested, "allocated_bytes": a.peak_allocated,
            "reserved_bytes": a.peak_reserved, "rounding_bytes": a.peak_allocated - a.peak_requested,
            "fragmentation_bytes": a.peak_reserved - a.peak_allocated}  # fmt: skip


class _Allocator:
    """Segments as lists of [offset, size, free] blocks; free blocks per pool in a sorted list for best fit."""

    def __init__(self):
        self.free_blocks = {True: [], False: []}  # small pool? -> sorted [(size, segment, offset)]
        self.segments: list[list[list]] = []
        self.small: list[bool] = []  # per segment: from the small pool
        self.owner: dict = {}  # allocation key -> (segment, offset, requested bytes)
        self.requested = self.allocated = self.reserved = 0
        self.peak_requested = self.peak_allocated = self.peak_reserved = 0

    def reset_peaks(self) -> None:
        self.peak_requested, self.peak_allocated = self.requested, self.allocated

    @staticmethod
    def round(n: int) -> int:
        return max(MIN_BLOCK, -(-n // MIN_BLOCK) * MIN_BLOCK)

    def malloc(self, key, n: int) -> None:
        size = self.round(n)
        small = size <= SMALL_SIZE
        pool = self.free_blocks[small]
        j = bisect.bisect_left(pool, (size, -1, -1))
        if j < len(pool):
            bsize, seg, off = pool.pop(j)
        else:  # a new segment
            bsize = (
                SMALL_BUFFER
                if small
                else LARGE_BUFFER
                if size < MIN_LARGE_ALLOC
                else -(-size // ROUND_LARGE) * ROUND_LARGE
            )
            seg, off = len(self.segments), 0
            self.segments.append([[0, bsize, True]])
            self.small.append(small)
            self.reserved += bsize
        blocks = self.segments[seg]
        k = next(k for k, b in enumerate(blocks) if b[0] == off)
        rest = bsize - size
        if rest >= MIN_BLOCK if small else rest > SMALL_SIZE:  # split: the rest stays cached
            blocks[k] = [off, size, False]
            blocks.insert(k + 1, [off + size, rest, True])
            bisect.insort(pool, (rest, seg, off + size))
        else:
            blocks[k] = [off, bsize, False]
        self.owner[key] = (seg, off, n)
        self.requested += n
        self.allocated += blocks[k][1]
        self.peak_requested = max(self.peak_requested, self.requested)
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def free(self, key) -> bool:
        got = self.owner.pop(key, None)
        if got is None:  # not this key's (the caller tries the next)
            return False
        seg, off, n = got
        blocks = self.segments[seg]
        k = next(k for k, b in enumerate(blocks) if b[0] == off)
        size = blocks[k][1]
        small = self.small[seg]
        self.requested -= n
        self.allocated -= size
        blocks[k][2] = True
        pool = self.free_blocks[small]
        for nb in (k + 1, k - 1):  # merge with free neighbours of the same segment
            if 0 <= nb < len(blocks) and blocks[nb][2] and nb != k:
                lo, hi = (k, nb) if nb > k else (nb, k)
                pool.remove((blocks[nb][1], seg, blocks[nb][0]))
                blocks[lo] = [blocks[lo][0], blocks[lo][1] + blocks[hi][1], True]
                del blocks[hi]
                k = lo
        bisect.insort(pool, (blocks[k][1], seg, blocks[k][0]))
        return True
