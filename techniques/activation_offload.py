"""Activation offloading: every tensor autograd saves for backward is copied to pinned host memory as forward makes
it and its device memory is given back; backward fetches it again. Trades host-device traffic (overlapped with
compute on a side CUDA stream) for the device bytes of the saved activations.

torch's saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks), after the design torchtune's
OffloadActivations describes: device-to-host copies on a side stream the compute stream does not wait for, the device
block returned to the allocator once its copy has run (record_stream), in backward the tensors saved just before the
one being unpacked fetched ahead on the side stream. Written here because `torch.autograd.graph.save_on_cpu` copies
on the compute stream (no overlap) and moves parameters and tiny tensors too, and torchtune's class is an internal
of a training library, not an API. Kept on the device: parameters, tensors under `min_bytes`, non-CUDA tensors.
Under activation_checkpointing (non-reentrant) a checkpointed block saves only its input through these hooks, so
only that moves; the recomputation in backward saves nothing here.
CPU: the host is the device, so nothing moves (accepted as a measured no-op: the hooks run, 0 bytes move, the
record says so). The planner offers it on CUDA only.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch

from membench.errors import ConfigError
from membench.techniques.base import Context, Patch, Prediction, Technique


class _Saved:
    """One offloaded tensor: its host copy, the device copy fetched back and the event that ends that fetch. The
    fetch runs on the same side stream as the copy out, so it starts only once the host copy is complete."""

    __slots__ = ("host", "device", "fetched", "index", "__weakref__")

    def __init__(self, host, index: int):
        self.host, self.index = host, index
        self.device, self.fetched = None, None


class Offloader:
    """The pack/unpack pair for saved_tensors_hooks. `source`: the device type whose tensors move ("cuda"; the tests
    use "cpu", where the copies are plain synchronous ones, to check what moves and that backward is exact)."""

    def __init__(self, source: str = "cuda", min_bytes: int = 1024, prefetch: int = 2):
        self.source, self.min_bytes, self.prefetch = source, min_bytes, prefetch
        self.cuda = source == "cuda"
        self._side: torch.cuda.Stream | None = None  # made at the first CUDA tensor: a CPU run never touches CUDA
        self.order: list[weakref.ref] = []  # this forward's offloaded tensors, in the order they were saved
        self.seen: dict[int, tuple[weakref.ref, weakref.ref]] = {}  # a tensor saved twice (q, k, v's input) moves once
        self.moved_bytes = self.moved_tensors = self.peak_moved_bytes = 0

    @property
    def side(self) -> torch.cuda.Stream:
        if self._side is None:
            self._side = torch.cuda.Stream()
        return self._side

    def hooks(self) -> contextlib.AbstractContextManager:
        """One forward's hooks; backward unpacks through the functions stored with each saved tensor."""
        self.order, self.seen, self.moved_bytes, self.moved_tensors = [], {}, 0, 0
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        # a parameter (or a view of one: linear saves weight.t()) is state, not an activation; subclasses (quantized
        # or float8 layouts, DTensor) have no plain host copy
        plain = type(t) is torch.Tensor and not isinstance(t._base, torch.nn.Parameter)
        if t.device.type != self.source or not plain or nbytes < self.min_bytes:
            return t
        ref, saved_ref = self.seen.get(id(t), (None, None))
        saved = saved_ref() if ref is not None and ref() is t else None
        if saved is not None:
            return saved
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=self.cuda)
        if self.cuda:
            self.side.wait_stream(torch.cuda.current_stream())  # t is complete on the compute stream
            with torch.cuda.stream(self.side):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.side)  # its block is not reused before the copy has read it
        else:
            host.copy_(t)
        saved = _Saved(host, len(self.order))
        self.order.append(weakref.ref(saved))
        self.seen[id(t)] = (weakref.ref(t), weakref.ref(saved))
        self.moved_bytes += nbytes
        self.moved_tensors += 1
        self.peak_moved_bytes = max(self.peak_moved_bytes, self.moved_bytes)
        return saved

    def unpack(self, packed):
        if not isinstance(packed, _Saved):
            return packed
        self._fetch(packed)
        for i in range(packed.index - 1, max(packed.index - 1 - self.prefetch, -1), -1):  # backward runs in reverse
            ahead = self.order[i]() if i < len(self.order) else None
            if ahead is not None:
                self._fetch(ahead)
        if self.cuda:
            torch.cuda.current_stream().wait_event(packed.fetched)
        dev, packed.device = packed.device, None  # the next unpack (retain_graph) fetches again
        return dev

    def _fetch(self, s: _Saved) -> None:
        if s.device is not None:
            return
        if not self.cuda:
            s.device = s.host.clone()  # the host -> device copy, on a machine whose device is its host
            return
        compute = torch.cuda.current_stream()
        with torch.cuda.stream(self.side):  # after its own device -> host copy (same stream)
            s.device = s.host.to("cuda", non_blocking=True)
            s.fetched = torch.cuda.Event()
            s.fetched.record()
        s.device.record_stream(compute)  # made on the side stream, used and freed on the compute stream


@dataclass(frozen=True)
class ActivationOffload(Technique):
    kind: ClassVar[str] = "activation_offload"
    # After checkpointing (6) and autocast (7-8): its hooks wrap the forward they set up (the step context), so what
    # a checkpointed block keeps and the 16-bit tensors autocast saves are what it moves.
    order: ClassVar[float] = 8.5
    exact: ClassVar[bool] = True  # copies, bit for bit
    family: ClassVar[str] = "activation_offload"
    label_opts: ClassVar[tuple[str, ...]] = ()
    not_simulated: ClassVar[str] = (
        "fake tensors run on this machine's CPU, where nothing moves: the hybrid keeps its activations on the device"
    )
    min_bytes: int = 1024
    prefetch: int = 2

    def __post_init__(self) -> None:
        if self.min_bytes < 0:
            raise ConfigError(f"technique.activation_offload.min_bytes={self.min_bytes}: must be >= 0")
        if self.prefetch < 0:
            raise ConfigError(f"technique.activation_offload.prefetch={self.prefetch}: must be >= 0")

    @classmethod
    def plan_values(cls, world_size: int, device_type: str) -> list[dict]:
        return [{}] if device_type == "cuda" else []  # on CPU it moves nothing: not a candidate

    def apply(self, model, ctx: Context) -> Patch:
        # on CPU the hooks run all the same and find no CUDA tensor: the record measures that nothing moved
        off = Offloader("cuda", self.min_bytes, self.prefetch)
        note = "saved activations to pinned host memory" if ctx.device.type == "cuda" else (
            f"nothing: on {ctx.device.type} the host is the device")  # fmt: skip

        def facts(_model) -> dict:
            return {"moved_bytes_per_forward": off.peak_moved_bytes, "moved_tensors_last_forward": off.moved_tensors}

        return Patch(step_context=off.hooks, before_eval=[facts], info={"moves": note})

    def activation_terms(self, pred: Prediction) -> None:
        pred.act_offload = True  # membench.predict.place_activations moves them, on CUDA only

    def time_prior(self) -> float:
        return 1.1  # copies overlap compute; what is not hidden behind it shows up here
