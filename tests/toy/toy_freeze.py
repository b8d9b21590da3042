"""A toy technique defined outside membench (tests/e2e/test_registry.py, docs/extending.md): freezes the workload's
first block, trading its gradients and optimizer state for not training it. Approximate: the loss changes.
One module and one YAML (technique/toy_freeze.yaml); nothing in the repository names it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from membench.technique import Patch, States, Technique


@dataclass(frozen=True)
class ToyFreeze(Technique):
    kind: ClassVar[str] = "toy_freeze"
    # Before anything that builds over the trainable set (8-bit optimizer, ZeRO) and with the structural changes:
    # freezing decides which parameters train.
    order: ClassVar[float] = 0.5
    loss_rtol: ClassVar[float] = 0.5
    incompatible: ClassVar[dict[str, str]] = {"quantized_base": "its adapters decide what trains"}
    family: ClassVar[str] = "toy_freeze"  # the planner tries it on and off
    blocks: int = 1  # leading blocks frozen

    def apply(self, model, ctx) -> Patch:
        frozen = [p for b in list(ctx.workload.blocks())[: self.blocks] for p in b.parameters()]
        for p in frozen:
            p.requires_grad_(False)
        return Patch(info={"frozen_params": sum(p.numel() for p in frozen)})

    def states(self, s: States) -> None:
        for b in list(s.blocks)[: self.blocks]:
            for p in b.parameters():
                s.trainable.remove(p.numel())
        s.rule.append(f"first {self.blocks} block(s) frozen")

    def time_prior(self) -> float:
        return 0.9  # no weight gradients for the frozen blocks
