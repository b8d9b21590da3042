"""Fused linear cross-entropy: the loss never holds the full [tokens x vocab] logits, trading a second head matmul
in backward (each chunk's logits recomputed) for them and their gradient (fp32: 2 x 4 x tokens x vocab bytes).

impl: `liger` (liger-kernel's LigerFusedLinearCrossEntropyLoss, Triton, CUDA), `cce` (Apple's cut-cross-entropy,
Triton, CUDA), `torch_chunked` (written here: an autograd Function over token chunks). The CPU path is our own
because neither library has one: Liger is Triton only, and cut-cross-entropy's non-Triton impl (`torch_compile`)
computes `e @ c.T` whole and leaves the saving to torch.compile's fusion, which does not chunk on CPU. `auto`: liger
on CUDA where installed, else torch_chunked. The plain loss up to rounding (declared: loss_rtol 1e-4). Limits: a
plain nn.Linear head without bias; the workload must route its loss through `Workload.loss_fn` (gpt, llama, hf).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from membench.errors import ConfigError
from membench.techniques.base import Context, Patch, Prediction, Technique
from membench.workloads.base import loss_chunk

IMPLS = ("auto", "torch_chunked", "liger", "cce")
KEY = "technique.fused_ce"


class ChunkedLinearCE(torch.autograd.Function):
    """mean_i CE(hidden_i @ weight^T, targets_i), chunk by chunk. Forward saves hidden, weight, targets and an fp32
    logsumexp per token; backward recomputes each chunk's logits, forms (softmax - onehot) / N and accumulates the
    input and weight gradients (the weight's in fp32). `dtype` is the matmul dtype (16-bit under autocast)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, dtype: torch.dtype):
        n, acc = hidden.shape[0], torch.promote_types(dtype, torch.float32)  # fp32 (fp64 in gradcheck)
        w = weight.to(dtype)
        lse = hidden.new_empty(n, dtype=acc)
        total = hidden.new_zeros((), dtype=acc)
        for s in range(0, n, chunk):
            logits = F.linear(hidden[s : s + chunk].to(dtype), w).to(acc)
            lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
            total += (lse[s : s + chunk] - logits.gather(1, targets[s : s + chunk, None]).squeeze(1)).sum()
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return total / n

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        n, chunk, w = hidden.shape[0], ctx.chunk, weight.to(ctx.dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        scale = grad.to(lse.dtype) / n
        for s in range(0, n, chunk):
            h = hidden[s : s + chunk].to(ctx.dtype)
            p = (F.linear(h, w).to(lse.dtype) - lse[s : s + chunk, None]).exp_()
            p[torch.arange(p.shape[0], device=p.device), targets[s : s + chunk]] -= 1
            p = (p * scale).to(ctx.dtype)
            if need_h:
                gh[s : s + chunk] = p @ w
            if need_w and p.dtype == gw.dtype:
                gw.addmm_(p.t(), h)
            elif need_w:  # as the plain path: the product in the matmul dtype, accumulated in fp32
                gw += p.t() @ h
            del p
        return gh, (gw.to(weight.dtype) if need_w else None), None, None, None


def torch_chunked(chunk_size: int, hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    chunk = loss_chunk(hidden.shape[0], head.out_features, head.in_features, chunk_size)
    with torch.autocast(dev, enabled=False):  # the Function casts explicitly, as autocast would (matmuls in dtype)
        return ChunkedLinearCE.apply(hidden, head.weight, targets, chunk, dtype)


def liger(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss()(head.weight, hidden, targets)


def cce(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, head.weight, targets, impl="cce")


@dataclass(frozen=True)
class FusedCE(Technique):
    kind: ClassVar[str] = "fused_ce"
    # It swaps the workload's loss, not modules: after everything that replaces or casts the head (quantization,
    # bf16_pure) and after autocast, whose dtype its prediction reads; before the sharding wrappers.
    order: ClassVar[float] = 9.5
    # The same loss up to rounding: chunked sums round differently from one cross_entropy, so it is not bit-identical,
    # which is what `exact` promises (and plan.allow_approximate=false keeps); its tolerance is declared instead.
    loss_rtol: ClassVar[float] = 1e-4
    family: ClassVar[str] = "fused_ce"
    label_opts: ClassVar[tuple[str, ...]] = ("impl",)
    impl: str = "auto"
    chunk_size: int = 0  # tokens per chunk (torch_chunked); 0: workloads/base.py::loss_chunk (Liger's rule, >= 256)

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ConfigError(f"{KEY}.impl={self.impl!r}: allowed {', '.join(IMPLS)}")
        if self.chunk_size < 0:
            raise ConfigError(f"{KEY}.chunk_size={self.chunk_size}: must be >= 0 (0: automatic)")

    def resolved(self, device_type: str) -> str:
        if self.impl != "auto":
            return self.impl
        cuda_liger = device_type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
        return "liger" if cuda_liger else "torch_chunked"

    def simulated(self) -> Technique:
        """Fake tensors run no Triton kernels: the torch path stands in (same loss; Liger keeps the input and weight
        gradients from forward instead of recomputing, so its bytes differ by those)."""
        return dataclasses.replace(self, impl="torch_chunked")

    def check(self, kinds: set[str], device_type: str) -> None:
        if self.impl in ("liger", "cce") and device_type != "cuda":
            raise ConfigError(f"{KEY}.impl={self.impl}: Triton kernels need CUDA; on {device_type} use torch_chunked")
        pkg = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}.get(self.impl)
        if pkg and importlib.util.find_spec(pkg) is None:
            raise ConfigError(f"{KEY}.impl={self.impl}: needs {pkg}, not installed (pip install 'membench[fused]')")

    def check_model(self, model: torch.nn.Module, blocks) -> str | None:
        """The planner's early refusal, from the model alone: an LM workload's model takes the loss in its forward
        (gpt, llama: `loss_fn`) or can skip its logits (transformers: `logits_to_keep`); apply() asks lm_head()."""
        if {"loss_fn", "logits_to_keep"} & set(inspect.signature(model.forward).parameters):
            return None
        return f"technique=[fused_ce]: {type(model).__name__} has no language-model head to fuse with its loss"

    def apply(self, model: torch.nn.Module, ctx: Context) -> Patch:
        head = ctx.workload.lm_head()
        if type(head) is not nn.Linear or head.bias is not None:
            why = "has no language-model head" if head is None else f"has a {type(head).__name__} head with bias"
            if head is not None and type(head) is not nn.Linear:
                why = f"its head is a {type(head).__name__} (quantized?), not a plain nn.Linear"
            raise ConfigError(f"technique=[fused_ce] on workload {ctx.workload.name}: {why}")
        impl = self.resolved(ctx.device.type)
        fn = {"liger": liger, "cce": cce}.get(impl) or functools.partial(torch_chunked, self.chunk_size)
        ctx.workload.loss_fn = fn  # the workload hook (workloads/base.py: Workload.loss_fn)
        info = {"impl": impl}
        if impl == "torch_chunked" and ctx.run is not None:  # the planner's simulation has no run knobs
            tokens = ctx.run.batch_size * ctx.workload.tokens_per_sample
            info["chunk_tokens"] = loss_chunk(tokens, head.out_features, head.in_features, self.chunk_size)
        return Patch(info=info, applied={**info, "vocab": head.out_features})

    def activation_terms(self, pred: Prediction) -> None:
        pred.loss_chunk_tokens = self.chunk_size  # the workload's activation model drops its full logits

    def predict(self, pred: Prediction, ctx: Context) -> None:
        """The record's prediction: the activation model's difference without the full logits (as extra bytes: the
        harness passes the model no chunk), and backward's temporaries, a chunk of fp32 logits and its softmax."""
        args = (ctx.run.batch_size, pred.act_elem_bytes, pred.checkpoint, pred.autocast_dtype is not None)
        fused = ctx.workload.activation_model(*args, loss_chunk_tokens=self.chunk_size)["total"]
        plain = ctx.workload.activation_model(*args)["total"]
        if fused is not None and plain is not None:
            pred.act_extra_bytes += fused - plain
        applied = ctx.applied[self.kind]
        if applied.get("chunk_tokens"):
            pred.other["fused_ce_chunk_logits"] = 2 * applied["chunk_tokens"] * applied["vocab"] * 4

    def time_prior(self) -> float:
        # four head matmuls instead of three (the chunks' logits recomputed) and a loop over chunks: where the head
        # dominates the step (a large vocabulary on a small model) the loss part costs about twice the plain one
        return 1.2

    @classmethod
    def plan_values(cls, world_size: int, device_type: str) -> list[dict]:
        return [{}]
