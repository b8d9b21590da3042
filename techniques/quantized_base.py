"""QLoRA: the linear layers of the workload's blocks are stored as frozen bitsandbytes Linear8bitLt (int8 rows) or
Linear4bit (nf4/fp4, optional double quantization) and only low-rank adapters train, trading quality (a frozen,
quantized base) and dequantization time for weight, grad and optimizer bytes.

Adapters come from PEFT (techniques/lora.py: `peft.inject_adapter_in_model` on the exact module paths of the
swapped layers; the model carries transformers' `is_loaded_in_4bit`/`is_loaded_in_8bit` flag, so PEFT dispatches
its bitsandbytes LoRA layers, which run on CPU too). Two spellings: `quantized_base` alone keeps its meaning in
the committed studies (quantized base + rank/alpha/dropout adapters on every swapped layer, the rest trainable
unless freeze_rest); `[quantized_base,lora]` quantizes here and takes the adapters (targets by role, base frozen)
from lora's knobs, lora replacing the ones added here. Limits: bitsandbytes has no conv layers (the digits CNN has
no linear layer in its blocks: quantize_outside_blocks=true quantizes its head only); embeddings stay full precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from membench.errors import ConfigError
from membench.techniques import lora
from membench.techniques import quantization as q
from membench.techniques.base import Context, Patch, States, Technique


@dataclass(frozen=True)
class QuantizedBase(Technique):
    kind: ClassVar[str] = "quantized_base"
    # Quantization swaps linear layers inside blocks: after pruning and bf16_pure's cast (it reads their weights),
    # before activation checkpointing wraps the blocks.
    order: ClassVar[float] = 4
    loss_rtol: ClassVar[float] = 0.5  # a frozen quantized base trains differently from full fine-tuning
    incompatible: ClassVar[dict[str, str]] = {"weight_quant": "both quantize the same linear layers"}
    not_simulated: ClassVar[str] = "bitsandbytes 4/8-bit matmuls have no fake-tensor implementation"
    family: ClassVar[str] = "quantized_base"
    # bitsandbytes' LoRA path allocates what neither the simulation nor the state rules see (dequantized weights,
    # adapter intermediates; docs/plan.md): a hybrid prediction must fit with this margin.
    hybrid_margin: ClassVar[float] = 0.10
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

    def time_prior(self) -> float:
        return 1.3

    def check_model(self, model: nn.Module, blocks) -> str | None:
        if not q.linear_targets(model, blocks, self.quantize_outside_blocks):
            return "technique.quantized_base: no nn.Linear in the blocks"
        return None

    def check(self, kinds: set[str], device_type: str) -> None:
        if device_type not in ("cpu", "cuda"):
            raise ConfigError(f"technique.quantized_base on {device_type}: bitsandbytes runs on cpu and cuda only")

    def apply(self, model: nn.Module, ctx: Context) -> Patch:
        targets = q.linear_targets(model, ctx.workload.blocks(), self.quantize_outside_blocks)
        if not targets:
            raise ConfigError(
                f"technique.quantized_base: workload {ctx.workload.name} has no nn.Linear in its blocks "
                "(bitsandbytes has no conv layers); quantize_outside_blocks=true quantizes the linear head only"
            )
        names = {id(m): n for n, m in model.named_modules()}
        paths = [f"{names[id(parent)]}.{name}".lstrip(".") for parent, name in targets]
        swapped = {id(p) for parent, name in targets for p in getattr(parent, name).parameters()}
        keep = [] if self.freeze_rest else [p for p in model.parameters() if p.requires_grad and id(p) not in swapped]
        shapes, layers = [], []
        for parent, name in targets:
            lin = getattr(parent, name)
            base = q.to_bnb(lin, self.quant_type, self.blocksize, self.double_quant, q.DTYPES[self.compute_dtype],
                            ctx.device)  # fmt: skip
            shapes.append((lin.out_features, lin.in_features))
            layers.append(base)
            setattr(parent, name, base)
        # transformers sets these on a model it loaded quantized; PEFT picks its bitsandbytes LoRA layers by them
        model.is_loaded_in_4bit, model.is_loaded_in_8bit = self.quant_type != "int8", self.quant_type == "int8"
        adapters = lora.inject(model, paths, self.rank, self.alpha, self.dropout, lora.float_dtype(model))
        for p in keep:  # PEFT froze all but the adapters; what was left alone trains as before, unless freeze_rest
            p.requires_grad_(True)
        return Patch(extra_state=q.extra_state_fn(model, layers), info=self._info(model, shapes, layers, adapters),
                     applied={"shapes": shapes, "layers": layers, "adapters": len(adapters)})  # fmt: skip

    def _info(self, model: nn.Module, shapes: list, layers: list, adapters: list) -> dict:
        n_q = sum(o * i for o, i in shapes)
        stored = sum(q.storage_bytes([b.weight, *q.side_tensors(b)]) for b in layers)
        return {
            "quantized_layers": len(layers),
            "quantized_params": n_q,
            "quantized_fraction_of_model": n_q
            / (n_q + sum(p.numel() for p in model.parameters() if p.is_floating_point())),
            "weight_bytes_stored": stored,
            "bits_per_param_measured": 8 * stored / n_q,
            "bits_per_param_formula": sum(
                o * i * q.formula_bits(self.quant_type, self.blocksize, self.double_quant, i) for o, i in shapes
            )
            / n_q,  # fmt: skip
            # these two as applied here; with lora in the run, lora's own info has the adapters that train
            "adapter_params": sum(p.numel() for p in adapters),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            # bitsandbytes ops whose FLOPs FlopCounterMode cannot see and that are counted from their shapes
            "flop_formulas_added": q.register_bnb_flop_formulas(),
        }

    def states(self, s: States) -> None:
        """Quantized bases at bitsandbytes' layout plus LoRA adapters; only adapters (and, unless freeze_rest, the
        layers left alone) train."""
        targets = [getattr(p, n) for p, n in q.linear_targets(s.model, s.blocks, self.quantize_outside_blocks)]
        dense = sum(lin.weight.numel() for lin in targets)
        adapters = [n for lin in targets for n in (self.rank * lin.in_features, self.rank * lin.out_features)]
        s.param_extra += sum(q.layout_bytes(lin.out_features, lin.in_features, self.quant_type, self.blocksize,
                                            self.double_quant) for lin in targets)  # fmt: skip
        # bitsandbytes casts a base's bias to compute_dtype in place on its first forward (fp32 under bf16_pure)
        bias = sum(lin.bias.numel() for lin in targets if lin.bias is not None)
        s.param_extra += bias * q.DTYPES[self.compute_dtype].itemsize
        s.dense += sum(adapters) - dense - bias
        frozen = {id(p) for lin in targets for p in lin.parameters()}  # the quantized base keeps its bias frozen
        rest = [p.numel() for p in s.model.parameters() if id(p) not in frozen]
        s.trainable = adapters if self.freeze_rest else adapters + rest
        setattr(s, lora.ADAPTERS, adapters)  # lora, when it follows, replaces these adapters with its own
        s.rule.append(f"{len(targets)} {self.quant_type} bases + rank-{self.rank} LoRA")
