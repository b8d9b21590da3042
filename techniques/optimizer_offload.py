"""Optimizer offload: the AdamW states (and a host copy of each parameter and of its gradient, at the parameter's
dtype) live in pinned host memory and the step runs on the CPU, trading a device-to-host gradient copy, a CPU step
and a host-to-device parameter copy per step for the device's 8 bytes per parameter of optimizer state.

torchao's CPUOffloadOptimizer (torchao.optim): per parameter of >= `minimal_size` elements a host copy, a host grad and
a host AdamW (fused CPU kernel), gradients copied out in their post-accumulate-grad hook on a side stream; smaller
tensors keep an on-device AdamW. `offload_gradients=true` also frees each device gradient once copied (torchao: not
with gradient accumulation). CUDA only (torchao asserts a CUDA/XPU device; on CPU the states are on the host anyway).
A thin subclass adds the `state` view torch optimizers have, so the record and MemTracker count the host states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from membench.errors import ConfigError
from membench.techniques.base import Context, Patch, States, Technique


def _offload_class():
    from torchao.optim import CPUOffloadOptimizer

    class Offloaded(CPUOffloadOptimizer):
        """CPUOffloadOptimizer with the `state` of its inner optimizers (host ones keyed by the host copies)."""

        @property
        def state(self) -> dict:
            inner = [*self.optim_dict.values(), *([self.d_opt] if self.d_opt is not None else [])]
            return {p: st for o in inner for p, st in o.state.items()}

        def host_tensors(self) -> dict[str, list[torch.Tensor]]:
            hosts = list(self.param_d2h_map.values())
            return {"params": hosts, "grads": [p.grad for p in hosts]}

    return Offloaded


@dataclass(frozen=True)
class OptimizerOffload(Technique):
    kind: ClassVar[str] = "optimizer_offload"
    # An optimizer replacement, built over the final parameter set (after casts and wrappers), like optimizer_8bit.
    order: ClassVar[float] = 9.3
    exact: ClassVar[bool] = False  # CPU fused AdamW against the device's AdamW: same update, other rounding
    loss_rtol: ClassVar[float] = 1e-3
    family: ClassVar[str] = "optimizer_offload"
    label_opts: ClassVar[tuple[str, ...]] = ("offload_gradients",)
    not_simulated: ClassVar[str] = "torchao's CPUOffloadOptimizer needs a CUDA device (pinned copies, streams)"
    incompatible: ClassVar[dict[str, str]] = {
        "optimizer_8bit": "both replace the optimizer",
        "optimizer_lowmem": "both replace the optimizer",
        "optimizer_in_backward": "both replace the optimizer (torchao steps on the CPU after backward)",
        "zero": "DeepSpeed/DDP/FSDP own the step; zero's own offload knobs do this for them",
    }
    offload_gradients: bool = False
    minimal_size: int = 4096

    def __post_init__(self) -> None:
        if self.minimal_size < 1:
            raise ConfigError(f"technique.optimizer_offload.minimal_size={self.minimal_size}: must be >= 1")

    def check(self, kinds: set[str], device_type: str) -> None:
        if device_type != "cuda":
            raise ConfigError(f"technique.optimizer_offload: needs run.device=cuda (torchao's CPUOffloadOptimizer; "
                              f"on {device_type} the optimizer states are already in host memory)")  # fmt: skip

    @classmethod
    def plan_values(cls, world_size: int, device_type: str) -> list[dict]:
        return [{"offload_gradients": False}, {"offload_gradients": True}] if device_type == "cuda" else []

    def check_run(self, run) -> None:
        if self.offload_gradients and run.grad_accum_steps > 1:
            raise ConfigError(f"run.grad_accum_steps={run.grad_accum_steps}: technique.optimizer_offload."
                              "offload_gradients=true frees each gradient after one backward")  # fmt: skip

    def apply(self, model, ctx: Context) -> Patch:
        c, made = ctx.workload.c, []

        def factory(m: torch.nn.Module) -> torch.optim.Optimizer:
            params = [p for p in m.parameters() if p.requires_grad]
            opt = _offload_class()(params, torch.optim.AdamW, offload_gradients=self.offload_gradients,
                                   minimal_size=self.minimal_size, lr=c.lr, weight_decay=c.weight_decay)  # fmt: skip
            made.append(opt)
            return opt

        return Patch(optimizer_factory=factory, extra_state=lambda: made[0].host_tensors() if made else {},
                     info={"optimizer": "torchao CPUOffloadOptimizer(AdamW)"})  # fmt: skip

    def states(self, s: States) -> None:
        # per tensor of >= minimal_size elements: host param copy and grad at the parameter's rate, host AdamW states
        # (two moments at opt_rate / 2 each, fused CPU AdamW's fp32 step); smaller tensors keep device AdamW
        def offload(device: dict, host: dict) -> None:
            big = [n for n in s.trainable if n >= self.minimal_size]
            small = [n for n in s.trainable if n < self.minimal_size]
            host["params"] += sum(big) * s.param_rate
            host["grads"] += sum(big) * s.param_rate
            host["optimizer"] += sum(big) * s.opt_rate + s.step_bytes * len(big)
            device["optimizer"] = float(sum(small) * s.opt_rate + s.step_bytes * len(small))
            if self.offload_gradients:  # each device gradient freed once copied: the largest one in flight bounds it
                device["grads"] = float((sum(small) + max(big, default=0)) * s.grad_rate)

        s.post.append(offload)
        s.rule.append(f"optimizer states of tensors >= {self.minimal_size} on the host (+ host param and grad copies)")

    def time_prior(self) -> float:
        return 1.5  # the step runs on the CPU; copies overlap backward only in part
