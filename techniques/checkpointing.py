"""Activation checkpointing: trades one extra forward of the wrapped blocks for not saving their activations.

Uses non-reentrant torch.utils.checkpoint through torch's checkpoint_wrapper on the workload's declared
blocks. Modes: `full` (every block keeps only its input), `every_k` (blocks 0, k, 2k, ...), `selective`
(torch's selective-checkpoint policy: save matmul/attention outputs, recompute norms and activations).
Exact: the loss must be bit-identical to the baseline. Limit: nothing outside the blocks is checkpointed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from membench.errors import ConfigError
from membench.techniques.base import Context, Patch, Prediction, Technique

MODES = ("full", "every_k", "selective")

_aten = torch.ops.aten
# Ops whose outputs selective mode keeps: the expensive ones (matmuls, convolutions, attention kernels).
SAVE_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.convolution.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
}


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


@dataclass
class ActivationCheckpointing(Technique):
    kind: ClassVar[str] = "activation_checkpointing"
    exact: ClassVar[bool] = True
    mode: str = "full"
    every_k: int = 2  # with mode=every_k: checkpoint blocks 0, k, 2k, ...

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"technique.activation_checkpointing.mode={self.mode!r}: allowed {', '.join(MODES)}")
        if self.every_k < 1:
            raise ConfigError(f"technique.activation_checkpointing.every_k={self.every_k}: must be >= 1")

    def selected(self, n_blocks: int) -> list[int]:
        if self.mode == "every_k":
            return list(range(0, n_blocks, self.every_k))
        return list(range(n_blocks))

    def apply(self, model: torch.nn.Module, ctx: Context) -> Patch:
        blocks = ctx.workload.blocks()
        kwargs = {}
        if self.mode == "selective":
            kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _policy)
        chosen = self.selected(len(blocks))
        for i in chosen:
            _freeze_bn_stats_during_recompute(blocks[i])
            blocks[i] = checkpoint_wrapper(blocks[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT, **kwargs)
        return Patch(info={"checkpointed_blocks": len(chosen), "total_blocks": len(blocks)})

    def predict(self, pred: Prediction, ctx: Context) -> None:
        pred.checkpoint = (self.mode, self.every_k)


def _freeze_bn_stats_during_recompute(block: torch.nn.Module) -> None:
    """Recomputation re-runs BatchNorm in train mode, which would update running stats a second time and
    change eval results; during backward (where non-reentrant recompute runs) momentum is set to 0."""

    def pre(m, args):
        if torch._C._current_graph_task_id() != -1:
            m._membench_momentum, m.momentum = m.momentum, 0.0

    def post(m, args, out):
        if hasattr(m, "_membench_momentum"):
            m.momentum = m._membench_momentum
            del m._membench_momentum

    for m in block.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post)
