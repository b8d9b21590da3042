"""Structured pruning: removes whole channels, MLP neurons and attention heads, giving a smaller dense model.

Uses torch-pruning (tp.pruner.MetaPruner over its DependencyGraph, tp.importance.MagnitudeImportance), so
coupled layers (residual adds, BatchNorm, q/k/v/proj of one head) shrink together; the harness then builds the
optimizer and measures parameters, gradients, optimizer state, activations, FLOPs and step time of the pruned
model. Embeddings and the layer producing the model's output keep their width (GPT: residual width stays,
heads and MLP neurons go). Heads: attention modules in the blocks that declare `n_head` and separate q/k/v
nn.Linear children (workloads/gpt.py) are pruned by whole heads and their n_head updated. Limits: the
workloads' analytic activation models use config dims, so the activation prediction over-estimates.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch_pruning as tp
from torch import nn

from membench.errors import ConfigError
from techniques.base import Context, Patch, Technique
from techniques.pruning import check_fraction, check_not_negative, param_bytes, pretrain, quality, reject_both

KEY = "technique.prune_structured"
PRUNABLE = (nn.Linear, nn.Conv2d)


@dataclass
class PruneStructured(Technique):
    kind: ClassVar[str] = "prune_structured"
    loss_rtol: ClassVar[float] = 0.1
    ratio: float = 0.3  # fraction of channels (CNN) / MLP neurons (GPT) removed in each layer
    head_ratio: float = 0.3  # fraction of attention heads removed in each attention layer (rounded down)
    global_pruning: bool = False  # rank channels across layers (uneven widths) instead of per layer
    pretrain_steps: int = 0  # dense training before pruning (0: prune the initial weights)
    pretrain_cache: bool = True  # reuse pretrained weights across runs (~/.cache/membench/pretrain)

    def __post_init__(self) -> None:
        check_fraction(f"{KEY}.ratio", self.ratio)
        if not 0.0 <= self.head_ratio < 1.0:
            raise ConfigError(f"{KEY}.head_ratio={self.head_ratio}: must be in [0, 1) (0 keeps every head)")
        check_not_negative(f"{KEY}.pretrain_steps", self.pretrain_steps)

    def check(self, kinds: set[str], device_type: str) -> None:
        reject_both(kinds)

    def apply(self, model: nn.Module, ctx: Context) -> Patch:
        info = pretrain(model, ctx, self.pretrain_steps, self.pretrain_cache)
        info["quality_dense"] = quality(model, ctx)
        before = {"params": sum(p.numel() for p in model.parameters()), "param_bytes": param_bytes(model)}
        widths_before = widths(ctx.workload.blocks())
        heads = attention_heads(ctx.workload.blocks())
        batch = ctx.workload.batch(0, 2, ctx.device)
        forward = functools.partial(_forward, ctx.workload)
        was_training = model.training
        model.eval()  # the tracing forward must not update BatchNorm running statistics
        pruner = tp.pruner.MetaPruner(
            model,
            batch,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=self.ratio,
            global_pruning=self.global_pruning,
            ignored_layers=ignored_layers(model, ctx.workload, batch),
            num_heads={lin: attn.n_head for attn in heads for lin in (attn.q, attn.k, attn.v)},
            prune_num_heads=bool(heads) and self.head_ratio > 0,
            prune_head_dims=False,
            head_pruning_ratio=self.head_ratio,
            forward_fn=forward,
        )
        pruner.step()
        for attn in heads:  # the forward reshapes by n_head: keep it equal to the heads left
            attn.n_head = pruner.num_heads[attn.q]
        model.train(was_training)
        after = {"params": sum(p.numel() for p in model.parameters()), "param_bytes": param_bytes(model)}
        info.update(before=before, after=after, params_removed_fraction=1 - after["params"] / before["params"])
        info["widths"] = {"before": widths_before, "after": widths(ctx.workload.blocks())}
        info["heads_per_layer"] = [attn.n_head for attn in heads]
        info["quality_pruned"] = quality(model, ctx)
        return Patch(info=info)


def _forward(workload, model: nn.Module, batch) -> torch.Tensor:
    return workload.loss(model, batch)


def attention_heads(blocks: nn.Module) -> list[nn.Module]:
    """Attention modules that declare their head count and keep q/k/v as separate nn.Linear layers."""
    return [
        m
        for m in blocks.modules()
        if isinstance(getattr(m, "n_head", None), int)
        and all(isinstance(getattr(m, n, None), nn.Linear) for n in ("q", "k", "v"))
    ]


def ignored_layers(model: nn.Module, workload, batch) -> list[nn.Module]:
    """Embeddings (their width is the residual stream) and the layer whose output is the model's output."""
    produced: dict[int, nn.Module] = {}
    outputs: list[int] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: produced.__setitem__(id(o), m))
        for m in model.modules()
        if isinstance(m, PRUNABLE)
    ]
    hooks.append(model.register_forward_hook(lambda m, i, o: outputs.append(id(o))))
    with torch.no_grad():
        workload.loss(model, batch)
    for h in hooks:
        h.remove()
    if outputs[0] not in produced:
        raise ConfigError(f"{KEY}: the model's output is not produced by a Linear/Conv2d layer; cannot keep its width")
    return [m for m in model.modules() if isinstance(m, nn.Embedding)] + [produced[outputs[0]]]


def widths(blocks: nn.Module) -> list[int]:
    """Output width of every Linear/Conv2d in the blocks, in module order."""
    return [
        m.out_features if isinstance(m, nn.Linear) else m.out_channels
        for m in blocks.modules()
        if isinstance(m, PRUNABLE)
    ]
