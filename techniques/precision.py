"""Lower-precision training: bf16/fp16 autocast (activations and matmuls in 16 bits, fp32 master weights)
and bf16_pure (parameters, gradients and optimizer state all stored in bf16).

Uses torch.autocast and torch.amp.GradScaler (fp16 only). Approximate: each declares a loss tolerance.
Composition: a later technique that runs the 16-bit compute itself (FSDP2's MixedPrecisionPolicy in
techniques/zero.py) says so with `replaces_autocast` in its Patch.applied; the autocast context then steps aside
(checked at step time, when every technique has been applied), while the dtype and fp16's GradScaler stay.
Limits: on CPUs without bf16/fp16 instructions autocast is far slower than fp32 (use it for memory
numbers, not speed); bf16_pure without stochastic rounding loses small updates.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from membench.techniques.base import Context, Patch, Prediction, States, Technique

REPLACES_AUTOCAST = "replaces_autocast"  # a Patch.applied key (techniques/zero.py sets it under FSDP2's policy)


@dataclass(frozen=True)
class _Autocast(Technique):
    dtype: ClassVar[torch.dtype]
    # Autocast only contributes a step context, so its position is free; it sits with precision, after the
    # blocks are wrapped and before the optimizer and sharding (which read the dtype in force).
    order: ClassVar[float] = 7
    loss_rtol: ClassVar[float] = 0.05
    family: ClassVar[str] = "precision"
    half_precision: ClassVar[bool] = True

    def _context(self, ctx: Context):
        autocast = functools.partial(torch.autocast, device_type=ctx.device.type, dtype=self.dtype)

        def make():
            if any(a.get(REPLACES_AUTOCAST) for a in ctx.applied.values()):
                return contextlib.nullcontext()
            return autocast()

        return make

    def activation_terms(self, pred: Prediction) -> None:
        pred.act_elem_bytes = 2
        pred.autocast_dtype = self.dtype

    def states(self, s: States) -> None:
        s.autocast = self.dtype  # fp32 master weights: the states keep their rates unless a wrapper says otherwise


@dataclass(frozen=True)
class BF16(_Autocast):
    kind: ClassVar[str] = "bf16"
    dtype: ClassVar[torch.dtype] = torch.bfloat16
    incompatible: ClassVar[dict[str, str]] = {
        "fp16": "two autocast dtypes in one step",
        "bf16_pure": "bf16_pure already runs everything in bf16; drop bf16",
    }

    def apply(self, model, ctx: Context) -> Patch:
        return Patch(step_context=self._context(ctx), applied={"autocast_dtype": self.dtype})


@dataclass(frozen=True)
class FP16(_Autocast):
    kind: ClassVar[str] = "fp16"
    order: ClassVar[float] = 8
    dtype: ClassVar[torch.dtype] = torch.float16
    init_scale: float = 65536.0  # GradScaler's starting loss scale

    def apply(self, model, ctx: Context) -> Patch:
        scaler = torch.amp.GradScaler(ctx.device.type, init_scale=self.init_scale)
        return Patch(step_context=self._context(ctx), grad_scaler=scaler, applied={"autocast_dtype": self.dtype})

    def simulated(self) -> Technique:
        return BF16()  # same bytes on fake tensors; GradScaler reads `found_inf` with .item(), which fake ones lack


@dataclass(frozen=True)
class BF16Pure(Technique):
    kind: ClassVar[str] = "bf16_pure"
    # After structural changes (it casts the pruned dense weights), before any quantizer reads them.
    order: ClassVar[float] = 3
    loss_rtol: ClassVar[float] = 0.1
    family: ClassVar[str] = "precision"
    half_precision: ClassVar[bool] = True
    incompatible: ClassVar[dict[str, str]] = {"fp16": "fp16 autocast over bf16 parameters mixes two 16-bit formats"}

    def apply(self, model: torch.nn.Module, ctx: Context) -> Patch:
        model.to(torch.bfloat16)  # params (and hence grads and Adam states) become bf16
        model.register_forward_pre_hook(_cast_float_inputs)
        return Patch()

    def activation_terms(self, pred: Prediction) -> None:
        pred.act_elem_bytes = 2

    def states(self, s: States) -> None:
        s.param_rate, s.grad_rate, s.opt_rate = 2, 2, 4  # AdamW exp_avg + exp_avg_sq in the parameter dtype
        elems, nbytes = s.float_buffers  # Module.to(bfloat16) casts the floating-point buffers too
        s.buffers += 2 * elems - nbytes
        s.float_buffers = (elems, 2.0 * elems)
        s.rule = ["bf16_pure 2+2+4"]

    def simulated(self) -> Technique:
        return _BuiltInBF16()


@dataclass(frozen=True)
class _BuiltInBF16(BF16Pure):
    """bf16_pure on fake tensors: Module.to() cannot swap fake parameters, so the simulation casts the built model
    itself, buffers included (membench.simulate.cast_floating), and only the input cast is applied."""

    fake_build_dtype: ClassVar[torch.dtype | None] = torch.bfloat16

    def apply(self, model: torch.nn.Module, ctx: Context) -> Patch:
        model.register_forward_pre_hook(_cast_float_inputs)
        return Patch()


def _cast_float_inputs(module, args):
    return tuple(a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
