"""QLoRA-style training: the linear layers of the workload's blocks are stored as frozen bitsandbytes
Linear8bitLt (int8 rows) or Linear4bit (nf4/fp4, optional double quantization) and only low-rank adapters
train, trading quality (a frozen, quantized base) and dequantization time for weight, grad and optimizer bytes.

Uses bitsandbytes layers; the LoRA adapter is our own 20-line module rather than peft's, because peft picks
targets by module-name patterns (we select the workload's declared blocks by identity) and imports
transformers in every run's process. Limits: bitsandbytes has no conv layers (the digits CNN has no linear
layer in its blocks: quantize_outside_blocks=true quantizes its head only); embeddings stay full precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from membench.errors import ConfigError
from membench.techniques import quantization as q
from membench.techniques.base import Context, Patch, Prediction, Technique


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * B(A(dropout(x))); B starts at zero so training starts from the base."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, dtype: torch.dtype, device):
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, dtype=dtype, device=device)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, dtype=dtype, device=device)
        nn.init.zeros_(self.lora_b.weight)
        self.drop = nn.Dropout(dropout)
        self.scale = alpha / rank

    @property
    def in_features(self) -> int:  # workloads read these (GPT derives its head size from q.out_features)
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(self.drop(x))) * self.scale


@dataclass
class QuantizedBase(Technique):
    kind: ClassVar[str] = "quantized_base"
    loss_rtol: ClassVar[float] = 0.5  # a frozen quantized base trains differently from full fine-tuning
    quant_type: str = "nf4"
    double_quant: bool = False
    blocksize: int = 64
    compute_dtype: str = "float32"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    quantize_outside_blocks: bool = False
    freeze_rest: bool = False

    def __post_init__(self) -> None:
        key = "technique.quantized_base"
        if self.quant_type not in q.FORMATS:
            raise ConfigError(f"{key}.quant_type={self.quant_type!r}: allowed {', '.join(q.FORMATS)}")
        if self.double_quant and self.quant_type == "int8":
            raise ConfigError(f"{key}.double_quant=true: applies to nf4/fp4 only, not quant_type=int8")
        if self.blocksize not in q.BLOCKSIZES:
            raise ConfigError(f"{key}.blocksize={self.blocksize}: allowed {', '.join(map(str, q.BLOCKSIZES))}")
        if self.compute_dtype not in q.DTYPES:
            raise ConfigError(f"{key}.compute_dtype={self.compute_dtype!r}: allowed {', '.join(q.DTYPES)}")
        if self.rank < 1:
            raise ConfigError(f"{key}.rank={self.rank}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{key}.dropout={self.dropout}: must be in [0, 1)")

    def check(self, kinds: set[str], device_type: str) -> None:
        if "weight_quant" in kinds:
            raise ConfigError("technique=[quantized_base,weight_quant]: both quantize the same linear layers")
        if device_type not in ("cpu", "cuda"):
            raise ConfigError(f"technique.quantized_base on {device_type}: bitsandbytes runs on cpu and cuda only")

    def apply(self, model: nn.Module, ctx: Context) -> Patch:
        targets = q.linear_targets(model, ctx.workload.blocks(), self.quantize_outside_blocks)
        if not targets:
            raise ConfigError(
                f"technique.quantized_base: workload {ctx.workload.name} has no nn.Linear in its blocks "
                "(bitsandbytes has no conv layers); quantize_outside_blocks=true quantizes the linear head only"
            )
        if self.freeze_rest:
            model.requires_grad_(False)
        self._shapes, self._layers = [], []
        for parent, name in targets:
            lin = getattr(parent, name)
            base = q.to_bnb(lin, self.quant_type, self.blocksize, self.double_quant, q.DTYPES[self.compute_dtype],
                            ctx.device)  # fmt: skip
            self._shapes.append((lin.out_features, lin.in_features))
            self._layers.append(base)
            setattr(parent, name, LoRALinear(base, self.rank, self.alpha, self.dropout, lin.weight.dtype, ctx.device))
        return Patch(extra_state=q.extra_state_fn(model, self._layers), info=self._info(model))

    def _info(self, model: nn.Module) -> dict:
        n_q = sum(o * i for o, i in self._shapes)
        stored = sum(q.storage_bytes([b.weight, *q.side_tensors(b)]) for b in self._layers)
        adapters = [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a.weight, m.lora_b.weight)]
        return {
            "quantized_layers": len(self._layers),
            "quantized_params": n_q,
            "quantized_fraction_of_model": n_q
            / (n_q + sum(p.numel() for p in model.parameters() if p.is_floating_point())),
            "weight_bytes_stored": stored,
            "bits_per_param_measured": 8 * stored / n_q,
            "bits_per_param_formula": sum(
                o * i * q.formula_bits(self.quant_type, self.blocksize, self.double_quant, i) for o, i in self._shapes
            )
            / n_q,  # fmt: skip
            "adapter_params": sum(p.numel() for p in adapters),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            # bitsandbytes ops whose FLOPs FlopCounterMode cannot see and that are counted from their shapes
            "flop_formulas_added": q.register_bnb_flop_formulas(),
        }

    def predict(self, pred: Prediction, ctx: Context) -> None:
        model = ctx.workload.model
        quantized = {id(b.weight) for b in self._layers}
        rest = sum(p.numel() for p in model.parameters() if id(p) not in quantized)
        layout = sum(q.layout_bytes(o, i, self.quant_type, self.blocksize, self.double_quant) for o, i in self._shapes)
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        pred.params_total = layout + rest * pred.param_bytes + buffers
        pred.grads_total = trainable * pred.grad_bytes
        tensors = sum(1 for p in model.parameters() if p.requires_grad)
        pred.optimizer_total = trainable * pred.optimizer_bytes + 4 * tensors  # + torch AdamW's fp32 step scalars
        pred.notes.append(
            f"quantized_base: {len(self._layers)} {self.quant_type} layers at their layout bytes; "
            f"{trainable:,} trainable params (adapters + unfrozen) carry grads and optimizer state"
        )
