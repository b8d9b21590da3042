"""What every workload provides to the harness. Concrete workloads: gpt.py, digits.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Workload config schemas by name: a preset YAML extends one (`- /schema/workload/NAME@_here_`); register_schema
# (membench/config.py) stores every entry. Filled by `@schema(...)` on each workload's config class.
SCHEMAS: dict[str, type] = {}


def schema(name: str, depth: str | None = None):
    """Register a workload config class under `name`. `depth`: the field counting its identical blocks (GPT:
    n_layer), which the fake-tensor simulation varies to extrapolate per layer; None where there is none."""

    def register(cls: type) -> type:
        cls.schema_name, cls.depth_knob = name, depth
        SCHEMAS[name] = cls
        return cls

    return register


@dataclass
class Quality:
    metric: str  # e.g. "eval_loss" or "test_accuracy"
    value: float
    higher_is_better: bool
    extra: dict[str, float]


class Workload:
    """A built workload: model, data, loss, quality metric, repeated blocks, analytic models."""

    name: str
    preset: str
    model: nn.Module
    tokens_per_sample: int = 1

    def blocks(self) -> nn.ModuleList:
        """The repeated blocks; techniques wrap or swap entries of this list, never match names."""
        return self.model.blocks

    def batch(self, step: int, batch_size: int, device: torch.device) -> Any:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, device: torch.device) -> Quality:
        raise NotImplementedError

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        raise NotImplementedError

    def lr_scale(self, step: int) -> float:
        """Linear LR warm-up over `lr_warmup_steps` (then constant): without it, Adam's first large updates
        make short runs spike and their quality numbers meaningless."""
        warm = getattr(self.c, "lr_warmup_steps", 0)
        return min(1.0, (step + 1) / warm) if warm > 0 else 1.0

    def activation_model(
        self, batch_size: int, elem_bytes: int, checkpoint: tuple[str, int] | None, autocast: bool = False
    ) -> dict[str, float]:
        """Predicted bytes saved for backward at the end of forward, by term; key `total` sums them.
        `autocast`: 16-bit autocast is on (mixed dtypes: some tensors stay fp32, weights get 16-bit copies)."""
        raise NotImplementedError

    def model_flops(self, batch_size: int) -> float:
        """Analytic training FLOPs per step (forward + backward, no recomputation)."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {}

    def linear_roles(self) -> dict[str, str]:
        """{module path in self.model: role} of the linear layers a technique may target by role (lora): q, k, v,
        o, mlp, head, or block (a linear inside the blocks with no finer role). Default: every nn.Linear (also a
        bitsandbytes one) inside the blocks is "block"; workloads that know their layers say more."""
        inside = {id(m) for m in self.blocks().modules()}
        return {n: "block" for n, m in self.model.named_modules() if id(m) in inside and isinstance(m, nn.Linear)}
