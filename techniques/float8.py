"""float8 training: the blocks' linears run their three matmuls (forward, grad input, grad weight) in float8 with dynamic
per-tensor scales. A throughput technique on GPUs with float8 tensor cores (SM 8.9+: Ada, Hopper), not a memory one:
parameters, gradients and optimizer states keep their dtype, and each linear still saves its high-precision input and
weight for backward (torchao recasts them there), so the saved activations do not shrink. What it adds is transient:
each matmul's float8 copies of its operands (1 byte per element) and their fp32 scales.

torchao's convert_to_float8_training (torchao.float8, Float8LinearConfig recipes) on the linears inside the workload's
blocks whose in and out widths are multiples of 16 (the float8 kernels' requirement); the head and embeddings stay.
CUDA only (check rejects CPU); an older GPU fails at its first float8 matmul, which the record says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from membench.errors import ConfigError
from membench.techniques.base import Context, Patch, Prediction, States, Technique

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")


def _eligible(m: torch.nn.Module) -> bool:
    return type(m) is torch.nn.Linear and m.in_features % 16 == 0 and m.out_features % 16 == 0


def eligible_linears(blocks) -> list[torch.nn.Linear]:
    return [m for b in blocks for m in b.modules() if _eligible(m)]


@dataclass(frozen=True)
class Float8(Technique):
    kind: ClassVar[str] = "float8"
    # After casts (bf16_pure 3) and checkpoint wrappers (6): it swaps Linear modules inside the blocks, which the
    # wrappers keep; before the optimizer (9), which sees the same parameters (Float8Linear keeps the weight object).
    order: ClassVar[float] = 6.5
    loss_rtol: ClassVar[float] = 0.05  # float8 matmuls with dynamic scales: an approximation of the 16/32-bit loss
    family: ClassVar[str] = "float8"
    label_opts: ClassVar[tuple[str, ...]] = ("recipe",)
    not_simulated: ClassVar[str] = "float8 matmuls (torch._scaled_mm) need an SM 8.9+ GPU; fake tensors run on this CPU"
    incompatible: ClassVar[dict[str, str]] = {
        "quantized_base": "the quantizer replaces the nn.Linear modules float8 converts",
        "weight_quant": "the quantizer replaces the nn.Linear modules float8 converts",
    }
    recipe: str = "tensorwise"

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(f"technique.float8.recipe={self.recipe!r}: allowed {', '.join(RECIPES)}")

    def check(self, kinds: set[str], device_type: str) -> None:
        if device_type != "cuda":
            raise ConfigError(f"technique.float8: needs run.device=cuda (float8 matmuls need an SM 8.9+ GPU; "
                              f"run.device is {device_type})")  # fmt: skip

    def check_model(self, model, blocks) -> str | None:
        return None if eligible_linears(blocks) else "no linear in the blocks has widths that are multiples of 16"

    @classmethod
    def plan_values(cls, world_size: int, device_type: str) -> list[dict]:
        return [{}] if device_type == "cuda" else []

    def apply(self, model, ctx: Context) -> Patch:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        chosen = {id(m) for m in eligible_linears(ctx.workload.blocks())}
        config = Float8LinearConfig.from_recipe_name(self.recipe)
        convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: id(m) in chosen)
        info = {"converted_linears": len(chosen), "recipe": self.recipe}
        return Patch(info=info, applied={"converted": len(chosen)})

    def states(self, s: States) -> None:
        # states unchanged; named transient: the float8 copy of the largest converted weight (1 byte per element)
        # while its matmul runs. The float8 copies of inputs and output gradients scale with the batch: not priced.
        largest = max((m.weight.numel() for m in eligible_linears(s.blocks)), default=0)
        s.other["float8_weight_copy"] = float(largest)
        s.rule.append("float8: states unchanged")

    def activation_terms(self, pred: Prediction) -> None:
        pred.notes.append("float8: linears save their high-precision input and weight (no activation saving); "
                          "per-matmul float8 copies of inputs and output gradients are transient, not priced")  # fmt: skip

    def time_prior(self) -> float:
        return 0.9  # a prior only: float8 matmuls are faster on large linears, the casts cost on small ones
