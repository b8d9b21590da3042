"""Post-training weight-only quantization for evaluation/inference: the run trains in full precision, then the
linear layers of the workload's blocks are quantized to int8 or int4 and the model is evaluated again,
trading quality for weight bytes at inference (training memory is unchanged: the record's model states stay fp32).

Backends: bitsandbytes (Linear8bitLt int8 rows; Linear4bit nf4/fp4 packed two per byte) and torchao
(quantize_ with Int8WeightOnlyConfig, or IntxWeightOnlyConfig(int4, PerGroup) whose CPU layout keeps one
4-bit value per int8 byte: it measures ~8 bits, not 4; torchao's packed int4 layouts need kernels absent on
CPU). Limits: linear layers only (the digits CNN: quantize_outside_blocks=true quantizes its head only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from membench.errors import ConfigError
from membench.techniques import quantization as q
from membench.techniques.base import Context, Patch, Technique

BACKENDS = ("bitsandbytes", "torchao")


@dataclass
class WeightQuant(Technique):
    kind: ClassVar[str] = "weight_quant"
    loss_rtol: ClassVar[float] = 0.0  # the training loss is untouched; only the final evaluation sees int weights
    backend: str = "bitsandbytes"
    bits: int = 8
    quant_type: str = "nf4"  # bitsandbytes 4-bit format (nf4 | fp4)
    double_quant: bool = False  # bitsandbytes 4-bit only
    group_size: int = 64  # bitsandbytes 4-bit blocksize / torchao int4 group size
    quantize_outside_blocks: bool = False

    def __post_init__(self) -> None:
        key = "technique.weight_quant"
        if self.backend not in BACKENDS:
            raise ConfigError(f"{key}.backend={self.backend!r}: allowed {', '.join(BACKENDS)}")
        if self.bits not in (8, 4):
            raise ConfigError(f"{key}.bits={self.bits}: allowed 8, 4")
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"{key}.quant_type={self.quant_type!r}: allowed nf4, fp4 (used when bits=4)")
        if self.group_size not in q.BLOCKSIZES and not (self.backend == "torchao" and self.group_size == 32):
            raise ConfigError(f"{key}.group_size={self.group_size}: allowed {', '.join(map(str, q.BLOCKSIZES))}")
        if self.double_quant and (self.bits != 4 or self.backend != "bitsandbytes"):
            raise ConfigError(f"{key}.double_quant=true: needs backend=bitsandbytes and bits=4")

    def check(self, kinds: set[str], device_type: str) -> None:
        if "quantized_base" in kinds:
            raise ConfigError("technique=[quantized_base,weight_quant]: both quantize the same linear layers")

    @property
    def fmt(self) -> str:
        return "int8" if self.bits == 8 else self.quant_type

    def apply(self, model: nn.Module, ctx: Context) -> Patch:
        def before_eval(m: nn.Module) -> dict:
            before = ctx.workload.evaluate(m, ctx.device)
            targets = q.linear_targets(m, ctx.workload.blocks(), self.quantize_outside_blocks)
            if not targets:
                raise ConfigError(
                    f"technique.weight_quant: workload {ctx.workload.name} has no nn.Linear in its blocks; "
                    "quantize_outside_blocks=true quantizes the linear head only"
                )
            shapes = [(getattr(p, n).out_features, getattr(p, n).in_features) for p, n in targets]
            fp_bytes = sum(getattr(p, n).weight.untyped_storage().nbytes() for p, n in targets)
            trained = sum(p.numel() for p in m.parameters() if p.requires_grad)
            layers = self._quantize(m, targets, ctx.device)
            stored = sum(q.storage_bytes([w.weight, *q.side_tensors(w)]) for w in layers)
            after = ctx.workload.evaluate(m, ctx.device)  # bitsandbytes may repack its 4-bit weights here (CPU)
            at_eval = sum(q.storage_bytes([w.weight, *q.side_tensors(w)]) for w in layers)
            n = sum(o * i for o, i in shapes)
            return {
                "trainable_params": trained,
                "format": f"{self.backend} {self.fmt if self.backend == 'bitsandbytes' else f'int{self.bits}'}",
                "quantized_layers": len(layers),
                "quantized_params": n,
                "weight_bytes_before": fp_bytes,
                "weight_bytes_stored": stored,
                "bits_per_param_measured": 8 * stored / n,
                "bits_per_param_formula": sum(o * i * self._formula(i) for o, i in shapes) / n,
                "compression_vs_fp32": 32 * n / (8 * stored),
                "quality_metric": before.metric,
                "quality_before": before.value,
                "quality_after": after.value,
                "quality_delta": after.value - before.value,
                "weight_bytes_at_eval": at_eval,  # differs from stored where bitsandbytes repacked for its CPU kernel
                "bits_per_param_at_eval": 8 * at_eval / n,
            }

        return Patch(before_eval=[before_eval])

    def _formula(self, in_features: int) -> float:
        if self.backend == "bitsandbytes":
            return q.formula_bits(self.fmt, self.group_size, self.double_quant, in_features)
        if self.bits == 8:  # int8 codes + per-row fp32 scale and int8 zero point
            return 8 + 40 / in_features
        return 8 + 40 / self.group_size  # int4 values held one per int8 byte + per-group scale and zero point

    def _quantize(self, model: nn.Module, targets: list[tuple[nn.Module, str]], device) -> list[nn.Module]:
        if self.backend == "bitsandbytes":
            for parent, name in targets:
                lin = getattr(parent, name)
                setattr(parent, name, q.to_bnb(lin, self.fmt, self.group_size, self.double_quant, lin.weight.dtype,
                                               device))  # fmt: skip
            return [getattr(p, n) for p, n in targets]
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        layers = [getattr(p, n) for p, n in targets]
        chosen = {id(m) for m in layers}
        config = (
            Int8WeightOnlyConfig()
            if self.bits == 8
            else IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(self.group_size))
        )
        quantize_(model, config, filter_fn=lambda mod, fqn: id(mod) in chosen)  # by identity, not by name
        return layers
