"""Activation checkpointing: trades one extra forward of the wrapped blocks for not saving their activations.

Uses non-reentrant torch.utils.checkpoint through torch's checkpoint_wrapper on the workload's declared
blocks. Modes: `full` (every block keeps only its input), `every_k` (blocks 0, k, 2k, ...), `selective`
(torch's selective activation checkpointing, SAC) with a named `policy`:
  matmul    save matmul/convolution/attention-kernel outputs, recompute norms and activations;
  megatron  Korthikanti et al. 2022's selective recompute: only the attention core is recomputed, everything else
            is saved as without checkpointing. The core is each F.scaled_dot_product_attention call inside a block,
            run under torch.utils.checkpoint (a function-level checkpoint, as Megatron-LM's CheckpointFunction
            around core attention; SAC cannot express it: it caches every op it is told to save, including outputs
            autograd would not keep). With a fused kernel only its output and logsumexp are dropped; the paper's
            5as^2b softmax/dropout terms exist only where SDPA runs its math (decomposed) path;
  op        torchtitan's op-level SAC (`_save_list`, `mm_recompute`): save matmuls and attention kernels, except
            every second matmul of each block, counted separately in forward and in recompute.
Exact: the loss must be bit-identical to the baseline. Limit: nothing outside the blocks is checkpointed. Not
here: torch's activation-memory-budget solver (`torch._functorch.config.activation_memory_budget`) is a
min-cut partitioner pass of torch.compile and does nothing in eager mode, where membench's steps run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from membench.errors import ConfigError
from membench.techniques.base import Context, Patch, Prediction, Technique

MODES = ("full", "every_k", "selective")
POLICIES = ("matmul", "megatron", "op")

_aten = torch.ops.aten
MATMUL_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.convolution.default}
ATTENTION_KERNELS = {
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}
# Ops whose outputs the matmul policy keeps: the expensive ones (matmuls, convolutions, attention kernels).
SAVE_OPS = MATMUL_OPS | ATTENTION_KERNELS


def _matmul(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class _RecomputeAttention(torch.overrides.TorchFunctionMode):
    """Runs every F.scaled_dot_product_attention under a non-reentrant checkpoint (the mode is off inside its own
    handler, so the checkpointed call and its recompute in backward run the plain function). The SDPA backends
    enabled at the call (a workload's `sdpa_kernel(MATH)`) are enabled again for the recompute, which runs in
    backward outside that context: another kernel would save other tensors and fail checkpoint's check."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        enabled = [b for b, on in _sdpa_backends() if on]

        def attention(*a, **k):
            with sdpa_kernel(enabled):
                return func(*a, **k)

        return torch.utils.checkpoint.checkpoint(attention, *args, use_reentrant=False, **kwargs)


def _sdpa_backends():
    cuda = torch.backends.cuda
    return ((SDPBackend.FLASH_ATTENTION, cuda.flash_sdp_enabled()),
            (SDPBackend.EFFICIENT_ATTENTION, cuda.mem_efficient_sdp_enabled()),
            (SDPBackend.MATH, cuda.math_sdp_enabled()), (SDPBackend.CUDNN_ATTENTION, cuda.cudnn_sdp_enabled()))  # fmt: skip


class AttentionRecomputed(torch.nn.Module):
    """A block whose attention core is recomputed in backward (policy=megatron)."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        with _RecomputeAttention():
            return self.block(*args, **kwargs)


def _op_level(counts: dict, ctx, op, *args, **kwargs):
    """torchtitan's policy: every second matmul is recomputed. Our linears with a bias run addmm, torchtitan's
    bias-free ones mm: both count. The count is kept per pass so recompute makes the same choices as forward."""
    if op in MATMUL_OPS:
        key = "recompute" if ctx.is_recompute else "forward"
        counts[key] = counts.get(key, 0) + 1
        return CheckpointPolicy.MUST_SAVE if counts[key] % 2 else CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_KERNELS else CheckpointPolicy.PREFER_RECOMPUTE


def _op_contexts():
    return create_selective_checkpoint_contexts(functools.partial(_op_level, {}))  # fresh counts per block call


CONTEXTS = {
    "matmul": functools.partial(create_selective_checkpoint_contexts, _matmul),
    "op": _op_contexts,
}


@dataclass(frozen=True)
class ActivationCheckpointing(Technique):
    kind: ClassVar[str] = "activation_checkpointing"
    # After structural changes, precision casts and quantization (it wraps the possibly quantized blocks), before
    # the optimizer and the sharding wrappers, which must see the wrapped blocks.
    order: ClassVar[float] = 6
    exact: ClassVar[bool] = True
    family: ClassVar[str] = "activation_checkpointing"
    label_opts: ClassVar[tuple[str, ...]] = ("mode",)  # not policy yet: records and docs name ac:selective
    # added after the checkpointing/llama/quantization studies were recorded: at its default (matmul, what selective
    # meant then) it stays out of the cell identity, so a fresh run of those cells matches their records
    identity_added: ClassVar[tuple[str, ...]] = ("policy",)
    mode: str = "full"
    every_k: int = 2  # with mode=every_k: checkpoint blocks 0, k, 2k, ...
    policy: str = "matmul"  # with mode=selective: what is saved (see the module docstring)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"technique.activation_checkpointing.mode={self.mode!r}: allowed {', '.join(MODES)}")
        if self.every_k < 1:
            raise ConfigError(f"technique.activation_checkpointing.every_k={self.every_k}: must be >= 1")
        if self.policy not in POLICIES:
            raise ConfigError(
                f"technique.activation_checkpointing.policy={self.policy!r}: allowed {', '.join(POLICIES)}"
            )

    def selected(self, n_blocks: int) -> list[int]:
        if self.mode == "every_k":
            return list(range(0, n_blocks, self.every_k))
        return list(range(n_blocks))

    def apply(self, model: torch.nn.Module, ctx: Context) -> Patch:
        blocks = ctx.workload.blocks()
        chosen = self.selected(len(blocks))
        if self.mode == "selective" and self.policy == "megatron":  # no op of a block but its attention is redone
            for i in chosen:
                blocks[i] = AttentionRecomputed(blocks[i])
            return Patch(info={"checkpointed_blocks": len(chosen), "total_blocks": len(blocks)})
        kwargs = {}
        if self.mode == "selective":
            kwargs["context_fn"] = CONTEXTS[self.policy]
        for i in chosen:
            _freeze_bn_stats_during_recompute(blocks[i])
            blocks[i] = checkpoint_wrapper(blocks[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT, **kwargs)
        return Patch(info={"checkpointed_blocks": len(chosen), "total_blocks": len(blocks)})

    def activation_terms(self, pred: Prediction) -> None:
        # the workloads' activation models know the matmul policy as "selective"; for the other policies they fall
        # back to their no-checkpoint terms: megatron with a fused kernel differs from them by the logsumexp only,
        # op is over-predicted until a workload models it (its saved set: block input, odd matmuls, attention)
        named = self.mode == "selective" and self.policy != "matmul"
        pred.checkpoint = (f"selective_{self.policy}" if named else self.mode, self.every_k)

    @classmethod
    def plan_values(cls, world_size: int, device_type: str) -> list[dict]:
        named = [{"mode": "selective", "policy": p} for p in POLICIES]
        return named + [{"mode": m} for m in ("every_k", "full")]

    def layer_period(self) -> int:
        return self.every_k if self.mode == "every_k" else 1

    def time_prior(self) -> float:
        # one extra forward of the checkpointed blocks is about 1/3 of forward + backward; selective recomputes
        # cheap ops only
        if self.mode == "selective":  # megatron redoes attention only; op also every second matmul
            return {"matmul": 1.1, "megatron": 1.03, "op": 1.2}[self.policy]
        return {"full": 1.33, "every_k": 1.17}[self.mode]


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
