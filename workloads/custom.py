"""The user's own model: `workload=custom workload.factory=package.module:function`.

The factory is called as `function(seed=..., **workload.options)` and returns a `CustomParts`: the model, a
batch function, a loss, the block classes (the repeated units techniques wrap or swap; they must sit in one
nn.ModuleList or nn.Sequential) and, optionally, a quality function. examples/custom_model.py is a template
to copy. Limits: no analytic activation model (the record's activation prediction is empty).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from membench.errors import ConfigError
from membench.workloads.base import Quality, Workload

HELD_OUT_STEP = 10_000_000  # batch indices the run's own steps never reach: the default quality's batches


@dataclass
class CustomParts:
    model: nn.Module
    batch: Callable[[int, int, torch.device], Any]  # (step, batch_size, device) -> one batch, deterministic in step
    loss: Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> scalar loss
    block_classes: tuple[type, ...]  # classes of the repeated blocks
    # optional quality: (model, device) -> value; default: mean loss on 4 held-out batches (lower is better)
    evaluate: Callable[[nn.Module, torch.device], float] | None = None
    metric: str = "heldout_loss"
    higher_is_better: bool = False
    tokens_per_sample: int = 1


@dataclass
class CustomConfig:
    preset: str = "custom"
    factory: str = "examples.custom_model:build"  # package.module:function returning CustomParts
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments passed to the factory
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_warmup_steps: int = 10
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"workload.batch_size={self.batch_size}: must be > 0")
        self.function()  # a bad path fails at composition

    def function(self) -> Callable[..., CustomParts]:
        module, sep, name = self.factory.partition(":")
        bad = f"workload.factory={self.factory}"
        if not sep or not module or not name:
            raise ConfigError(f"{bad}: expected package.module:function; allowed: e.g. examples.custom_model:build")
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(
                f"{bad}: cannot import {module} ({e}); allowed: a module importable from the repo root"
            ) from None
        fn = getattr(mod, name, None)
        if not callable(fn):
            raise ConfigError(f"{bad}: {module} has no function {name}; allowed: a function returning CustomParts")
        return fn

    def build(self, seed: int) -> CustomWorkload:
        return CustomWorkload(self, seed)


class CustomWorkload(Workload):
    name = "custom"

    def __init__(self, c: CustomConfig, seed: int):
        self.c, self.preset, self.seed = c, c.preset, seed
        torch.manual_seed(seed)
        parts = c.function()(seed=seed, **c.options)
        if not isinstance(parts, CustomParts):
            raise ConfigError(f"workload.factory={c.factory}: returned {type(parts).__name__}, not CustomParts")
        self.parts, self.model, self.tokens_per_sample = parts, parts.model, parts.tokens_per_sample
        self._blocks = find_container(parts.model, tuple(parts.block_classes), c.factory)

    def blocks(self) -> nn.Module:
        return self._blocks

    def batch(self, step: int, batch_size: int, device: torch.device):
        return self.parts.batch(step, batch_size, device)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        return self.parts.loss(model, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> Quality:
        was_training = model.training
        model.eval()
        if self.parts.evaluate is not None:
            value = float(self.parts.evaluate(model, device))
        else:
            n = 4
            value = (
                sum(self.loss(model, self.batch(HELD_OUT_STEP + i, self.c.batch_size, device)).item() for i in range(n))
                / n
            )
        model.train(was_training)
        return Quality(self.parts.metric, value, self.parts.higher_is_better, {})

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.c.lr, weight_decay=self.c.weight_decay)

    def activation_model(self, batch_size: int, elem_bytes: int, checkpoint=None, autocast: bool = False):
        """No analytic model for a user's model: the prediction is left empty (None), not guessed."""
        return {"total": None}

    def model_flops(self, batch_size: int) -> float:
        """6 x the multiply-accumulates of the Linear layers in one forward (measured with forward hooks)."""
        macs = 0

        def count(m, inp, out):
            nonlocal macs
            macs += out.numel() * m.in_features

        hooks = [m.register_forward_hook(count) for m in self.model.modules() if isinstance(m, nn.Linear)]
        dev = next(self.model.parameters()).device
        with torch.no_grad():
            self.loss(self.model, self.batch(HELD_OUT_STEP, batch_size, dev))
        for h in hooks:
            h.remove()
        return 6.0 * macs

    def info(self):
        return {"factory": self.c.factory, "block_classes": [c.__name__ for c in self.parts.block_classes]}


def find_container(model: nn.Module, classes: tuple[type, ...], factory: str) -> nn.Module:
    best = None
    for m in model.modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) and all(isinstance(x, classes) for x in m):
            best = m if best is None or len(m) > len(best) else best
    if best is None:
        names = ", ".join(c.__name__ for c in classes)
        raise ConfigError(f"workload.factory={factory}: no nn.ModuleList/Sequential holds only blocks of {names}")
    return best
