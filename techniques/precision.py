"""Lower-precision training: bf16/fp16 autocast (activations and matmuls in 16 bits, fp32 master weights)
and bf16_pure (parameters, gradients and optimizer state all stored in bf16).

Uses torch.autocast and torch.amp.GradScaler (fp16 only). Approximate: each declares a loss tolerance.
Limits: on CPUs without bf16/fp16 instructions autocast is far slower than fp32 (use it for memory
numbers, not speed); bf16_pure without stochastic rounding loses small updates.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from membench.techniques.base import Context, Patch, Prediction, Technique


@dataclass
class _Autocast(Technique):
    dtype: ClassVar[torch.dtype]
    loss_rtol: ClassVar[float] = 0.05

    def _context(self, ctx: Context):
        return functools.partial(torch.autocast, device_type=ctx.device.type, dtype=self.dtype)

    def predict(self, pred: Prediction, ctx: Context) -> None:
        pred.act_elem_bytes = 2
        pred.autocast_dtype = self.dtype


@dataclass
class BF16(_Autocast):
    kind: ClassVar[str] = "bf16"
    dtype: ClassVar[torch.dtype] = torch.bfloat16

    def apply(self, model, ctx: Context) -> Patch:
        return Patch(step_context=self._context(ctx))


@dataclass
class FP16(_Autocast):
    kind: ClassVar[str] = "fp16"
    dtype: ClassVar[torch.dtype] = torch.float16
    init_scale: float = 65536.0  # GradScaler's starting loss scale

    def apply(self, model, ctx: Context) -> Patch:
        scaler = torch.amp.GradScaler(ctx.device.type, init_scale=self.init_scale)
        return Patch(step_context=self._context(ctx), grad_scaler=scaler)


@dataclass
class BF16Pure(Technique):
    kind: ClassVar[str] = "bf16_pure"
    loss_rtol: ClassVar[float] = 0.1

    def apply(self, model: torch.nn.Module, ctx: Context) -> Patch:
        model.to(torch.bfloat16)  # params (and hence grads and Adam states) become bf16
        model.register_forward_pre_hook(_cast_float_inputs)
        return Patch()

    def predict(self, pred: Prediction, ctx: Context) -> None:
        pred.param_bytes = 2
        pred.grad_bytes = 2
        pred.optimizer_bytes = 4  # AdamW exp_avg + exp_avg_sq in the parameter dtype
        pred.act_elem_bytes = 2


def _cast_float_inputs(module, args):
    return tuple(a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
