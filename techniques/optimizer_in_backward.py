"""The optimizer step in backward: each parameter steps as soon as its gradient is accumulated, so the whole
gradient buffer never exists at once (at most a few parameters' gradients are alive, not all of them).

PyTorch's tutorial pattern ("How to save memory by fusing the optimizer step into the backward pass"): one
optimizer per parameter, built by the workload's own `make_optimizer([p])` (so the same AdamW and hyper-parameters
as the baseline: exact), stepped and zeroed in `register_post_accumulate_grad_hook`. The training loop still
calls optimizer.step()/zero_grad(): it gets a facade whose step does nothing and whose `param_groups` and `state`
are the per-parameter optimizers' own (the loop's LR schedule reaches them, state bytes count them, and MemTracker's
global step hooks see each per-parameter step and call its state optimizer memory).
Limits: no gradient clipping, accumulation or GradScaler (each needs the whole gradient before any step); the
engines that own the step (zero) and the other optimizer replacements are rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from membench.errors import ConfigError
from membench.techniques.base import Context, Patch, States, Technique


class InBackwardOptimizer(torch.optim.Optimizer):
    """Facade over per-parameter optimizers that step in backward: step() is a no-op (the hooks stepped),
    zero_grad() drops whatever grads remain; `param_groups` and `state` are the per-parameter ones."""

    def __init__(self, params: list[torch.nn.Parameter], make):
        super().__init__(params, {})
        self.per_param = {p: make([p]) for p in params}
        self.param_groups = [g for o in self.per_param.values() for g in o.param_groups]
        # the per-parameter state dicts themselves (created empty now, filled by their first step): a live view
        self.state = {p: o.state[p] for p, o in self.per_param.items()}
        self.handles = [p.register_post_accumulate_grad_hook(self._step_one) for p in params]

    def _step_one(self, p: torch.Tensor) -> None:
        opt = self.per_param[p]
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure=None):
        return None


@dataclass(frozen=True)
class OptimizerInBackward(Technique):
    kind: ClassVar[str] = "optimizer_in_backward"
    # An optimizer replacement: built over the final parameter set (after casts, quantized bases, checkpoint
    # wrappers), like optimizer_8bit.
    order: ClassVar[float] = 9.1
    exact: ClassVar[bool] = True
    family: ClassVar[str] = "optimizer_in_backward"
    # simulated as itself: the simulation builds Patch.optimizer_factory's optimizer and its warm-up backward fires
    # the per-parameter hooks (membench/simulate.py), so the gradients held at each phase are measured, not priced
    # what needs the whole gradient before any step, or owns the step
    incompatible: ClassVar[dict[str, str]] = {
        "optimizer_8bit": "both replace the optimizer (per-parameter 8-bit optimizers are not built)",
        "zero": "DeepSpeed/DDP/FSDP own the backward and the step (reduction buckets, sharded step)",
        "fp16": "the GradScaler unscales and checks every gradient for inf/NaN before any step",
    }

    def check_run(self, run) -> None:
        if getattr(run, "grad_accum_steps", 1) > 1:
            raise ConfigError(f"run.grad_accum_steps={run.grad_accum_steps}: optimizer_in_backward steps in every "
                              "backward, so gradients cannot accumulate over micro-batches")  # fmt: skip

    def apply(self, model, ctx: Context) -> Patch:
        self.check_run(ctx.run)

        def factory(m: torch.nn.Module) -> torch.optim.Optimizer:
            params = [p for p in m.parameters() if p.requires_grad]
            return InBackwardOptimizer(params, ctx.workload.make_optimizer)

        return Patch(optimizer_factory=factory, info={"optimizer": "per-parameter, stepped in backward"})

    def states(self, s: States) -> None:
        # at the peak at most one parameter's gradient is alive (the one being stepped): the largest bounds it;
        # a post step, so that later steps' trainable tensors and rates count and the bytes stay an exact integer
        def largest(device: dict, host: dict) -> None:
            device["grads"] = float(max(s.trainable, default=0) * s.grad_rate)

        s.post.append(largest)
        s.rule.append("grads: the largest parameter's only (step in backward)")

    def time_prior(self) -> float:
        return 1.02  # per-parameter for-loop steps instead of one foreach step
