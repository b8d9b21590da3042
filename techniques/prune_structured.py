"""Structured pruning: removes whole channels, MLP neurons and attention heads, giving a smaller dense model.

Uses torch-pruning (tp.pruner.MetaPruner over its DependencyGraph, tp.importance.MagnitudeImportance), so
coupled layers (residual adds, BatchNorm, q/k/v/proj of one head) shrink together; the harness then builds the
optimizer and measures parameters, gradients, optimizer state, activations, FLOPs and step time of the pruned
model. Embeddings and the layer producing the model's output keep their width (GPT: residual width stays,
heads and MLP neurons go). Heads: attention modules in the blocks that declare `n_head` and separate q/k/v
nn.Linear children (workloads/gpt.py) are pruned by whole heads and their n_head updated.
Amounts: `amount_of=params` (the literature's "30% structured") makes `ratio` the fraction of the model's
parameters to remove: a bisection over the channel ratio, each trial pruning a deep copy and counting its
parameters (torch-pruning has no parameter-target mode), then the real model at the ratio found; the record
keeps the asked, achieved and channel ratios. `amount_of=channels`: `ratio` is the channel fraction per layer.
Limits: the workloads' analytic activation models use config dims, so the activation prediction over-estimates.
"""

from __future__ import annotations

import copy
import functools
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch_pruning as tp
from torch import nn

from membench.errors import ConfigError
from membench.techniques.base import Context, Patch, States, Technique
from membench.techniques.pruning import BOTH, check_fraction, check_not_negative, param_bytes, pretrain, quality

KEY = "technique.prune_structured"
PRUNABLE = (nn.Linear, nn.Conv2d)
AMOUNT_OF = ("params", "channels")
SEARCH_TOL = 0.01  # stop the bisection once the achieved parameter fraction is within 1 point of the asked one
# Bisection steps over the channel ratio: 0.99 / 2^8 ~ 0.004, under one channel in layers up to ~250 wide. Per-layer
# pruning rounds each layer's channel count, so on narrow models (digits_cnn_tiny: 8-16 channels) the reachable
# fractions are coarse and the achieved one can miss the asked one by more; global_pruning=true is finer.
SEARCH_STEPS = 8


@dataclass(frozen=True)
class PruneStructured(Technique):
    kind: ClassVar[str] = "prune_structured"
    # Structural changes first: pruning shrinks the dense model that every other technique then sees.
    order: ClassVar[float] = 1
    incompatible: ClassVar[dict[str, str]] = {"prune_unstructured": BOTH}
    not_simulated: ClassVar[str] = "torch-pruning traces and edits real weights"
    loss_rtol: ClassVar[float] = 0.1
    ratio: float = 0.3  # fraction removed, of what `amount_of` says
    amount_of: str = "params"  # params: of the model's parameters | channels: of channels/MLP neurons per layer
    head_ratio: float = 0.3  # fraction of attention heads removed in each attention layer (rounded down)
    global_pruning: bool = False  # rank channels across layers (uneven widths) instead of per layer
    pretrain_steps: int = 0  # dense training before pruning (0: prune the initial weights)
    pretrain_cache: bool = True  # reuse pretrained weights across runs (~/.cache/membench/pretrain)

    def __post_init__(self) -> None:
        check_fraction(f"{KEY}.ratio", self.ratio)
        if self.amount_of not in AMOUNT_OF:
            raise ConfigError(f"{KEY}.amount_of={self.amount_of!r}: allowed {', '.join(AMOUNT_OF)}")
        if not 0.0 <= self.head_ratio < 1.0:
            raise ConfigError(f"{KEY}.head_ratio={self.head_ratio}: must be in [0, 1) (0 keeps every head)")
        check_not_negative(f"{KEY}.pretrain_steps", self.pretrain_steps)

    def states(self, s: States) -> None:
        """The pruned model's tensors. amount_of=channels, per layer, with the workload at hand (States.workload):
        torch-pruning itself prunes a fake copy of the model as built (`pruned_sizes`), so every tensor's size is
        the library's, to the element (per-layer pruning removes int-rounded counts that do not depend on weight
        values; only which channels go does). Otherwise a rule: embeddings and the output layer keep their width,
        so only parameters inside the blocks shrink, each tensor by one factor: amount_of=params removes `ratio` of
        the whole model's parameters (what the search aims at, within SEARCH_TOL); amount_of=channels (without a
        workload, or with global_pruning, whose counts depend on the weights) removes `ratio` of each block tensor,
        an estimate: it misses layers that lose input and output channels both (a CNN: about (1 - ratio)^2 of a
        conv's weights stay, not 1 - ratio), the heads (head_ratio) and the residual width that stays."""
        traced = None
        if self.amount_of == "channels" and not self.global_pruning and s.workload is not None:
            traced = pruned_sizes(s.model, s.blocks, s.workload, self.ratio, self.head_ratio)
        if traced is not None:
            params, buffers = traced
            grads = [n for n, p in zip(params, s.model.parameters(), strict=True) if p.requires_grad]
            s.dense -= s.psi - sum(params)
            s.psi, s.trainable = sum(params), grads
            s.buffers = float(sum(n * e for n, e, _ in buffers))
            floats = [(n, e) for n, e, f in buffers if f]
            s.float_buffers = (sum(n for n, _ in floats), float(sum(n * e for n, e in floats)))
            s.rule.append(f"prune_structured: {self.ratio:g} of the channels per layer (torch-pruning on a fake copy)")
            return
        params = list(s.model.parameters())
        inside = {id(p) for p in s.blocks.parameters()}
        in_blocks = sum(p.numel() for p in params if id(p) in inside)
        removed = self.ratio * (s.psi if self.amount_of == "params" else in_blocks)
        keep = max(0.0, 1.0 - removed / in_blocks) if in_blocks else 1.0
        size = {id(p): round(p.numel() * keep) if id(p) in inside else p.numel() for p in params}
        after = sum(size.values())
        s.dense -= s.psi - after
        s.psi = after
        s.trainable = [size[id(p)] for p in params if p.requires_grad]
        s.rule.append(f"prune_structured: {self.ratio:g} of the {self.amount_of} (block tensors x {keep:.3f})")

    def apply(self, model: nn.Module, ctx: Context) -> Patch:
        info = pretrain(model, ctx, self.pretrain_steps, self.pretrain_cache)
        info["quality_dense"] = quality(model, ctx)
        before = {"params": sum(p.numel() for p in model.parameters()), "param_bytes": param_bytes(model)}
        widths_before = widths(ctx.workload.blocks())
        batch = ctx.workload.batch(0, 2, ctx.device)
        if self.amount_of == "params":
            channel_ratio, trials = self._search(model, ctx, batch, before["params"])
            info["search_trials"] = trials
        else:
            channel_ratio = self.ratio
        heads = self._prune(model, ctx.workload.blocks(), ctx, batch, channel_ratio)
        after = {"params": sum(p.numel() for p in model.parameters()), "param_bytes": param_bytes(model)}
        info.update(before=before, after=after, params_removed_fraction=1 - after["params"] / before["params"])
        info.update(amount_of=self.amount_of, ratio_asked=self.ratio, channel_ratio=channel_ratio)
        info["widths"] = {"before": widths_before, "after": widths(ctx.workload.blocks())}
        info["heads_per_layer"] = [attn.n_head for attn in heads]
        info["quality_pruned"] = quality(model, ctx)
        return Patch(info=info)

    def _prune(self, model: nn.Module, blocks: nn.Module, ctx: Context, batch, channel_ratio: float,
               importance: tp.importance.Importance | None = None) -> list:  # fmt: skip
        """Prune `model` in place (channels/neurons at channel_ratio, heads at head_ratio); its attention modules.
        `importance`: the channel ranking (default: L2 magnitude, as in a run)."""
        heads = attention_heads(blocks)
        was_training = model.training
        model.eval()  # the tracing forward must not update BatchNorm running statistics
        pruner = tp.pruner.MetaPruner(
            model,
            batch,
            importance=importance or tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=channel_ratio,
            global_pruning=self.global_pruning,
            ignored_layers=ignored_layers(model, ctx.workload, batch),
            num_heads={lin: attn.n_head for attn in heads for lin in (attn.q, attn.k, attn.v)},
            prune_num_heads=bool(heads) and self.head_ratio > 0,
            prune_head_dims=False,
            head_pruning_ratio=self.head_ratio,
            forward_fn=functools.partial(_forward, ctx.workload),
        )
        pruner.step()
        for attn in heads:  # the forward reshapes by n_head: keep it equal to the heads left
            attn.n_head = pruner.num_heads[attn.q]
        model.train(was_training)
        return heads

    def _search(self, model: nn.Module, ctx: Context, batch, n_before: int) -> tuple[float, list[dict]]:
        """The channel ratio whose pruning removes the fraction `ratio` of the parameters (closest found)."""
        lo, hi, best, trials = 0.0, 0.99, None, []
        for _ in range(SEARCH_STEPS):
            mid = (lo + hi) / 2
            memo: dict = {}
            clone = copy.deepcopy(model, memo)  # memo maps the workload's blocks onto the clone's
            self._prune(clone, memo[id(ctx.workload.blocks())], ctx, batch, mid)
            removed = 1 - sum(p.numel() for p in clone.parameters()) / n_before
            trials.append({"channel_ratio": mid, "params_removed_fraction": removed})
            if best is None or abs(removed - self.ratio) < abs(best[1] - self.ratio):
                best = (mid, removed)
            if abs(removed - self.ratio) <= SEARCH_TOL:
                break
            lo, hi = (mid, hi) if removed < self.ratio else (lo, mid)
        return best[0], trials


class CountOnly(tp.importance.Importance):
    """A ranking that reads no weight value (channel order): on fake tensors, where magnitudes do not exist. Per-layer
    pruning removes the same number of channels whatever the ranking, so the pruned shapes are a run's."""

    def __call__(self, group, **kwargs) -> torch.Tensor:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # a real ranking: torch-pruning reads it back (.tolist())
            return torch.arange(len(group[0][1]), dtype=torch.float32)


_PRUNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model as built -> {(ratio, head_ratio): sizes}


def pruned_sizes(model: nn.Module, blocks, workload, ratio: float, head_ratio: float):
    """([elements per parameter, in model.parameters() order], [(elements, element size, floating) per buffer]) of
    `model` after per-layer structured pruning at `ratio` channels and `head_ratio` heads, found by running
    torch-pruning (the technique's own `_prune`, CountOnly ranking) on a fake copy: no weight is read or allocated.
    A real model is copied onto fake tensors (FakeCopyMode). None when the copy or the trace fails (the caller's
    rule applies). Cached per model and knobs: the planner prices many candidates over one model."""
    from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensor, FakeTensorMode

    key = (ratio, head_ratio)
    cached = _PRUNED.get(model, {})
    if key in cached:
        return cached[key]
    memo: dict = {}
    try:
        if any(isinstance(p, FakeTensor) for p in model.parameters()):
            clone = fake_clone(model, memo)
        else:
            with FakeCopyMode(FakeTensorMode(allow_non_fake_inputs=True)):
                clone = copy.deepcopy(model, memo)
        device = next(clone.parameters()).device
        ctx = Context(workload=workload, device=device, run=None)
        batch = workload.batch(0, 2, device)
        PruneStructured(ratio=ratio, amount_of="channels", head_ratio=head_ratio)._prune(
            clone, memo[id(blocks)], ctx, batch, ratio, CountOnly()
        )
    except Exception:  # noqa: BLE001 - a model torch-pruning cannot trace on fake tensors: the rule prices it
        return None
    out = ([p.numel() for p in clone.parameters()],
           [(b.numel(), b.element_size(), b.is_floating_point()) for b in clone.buffers()])  # fmt: skip
    _PRUNED.setdefault(model, {})[key] = out
    return out


def fake_clone(model: nn.Module, memo: dict) -> nn.Module:
    """A copy of `model`, whose tensors are fake already (the planner's), for torch-pruning to cut: every parameter,
    buffer and tensor attribute a new fake tensor of the same shape, dtype and device, made by the original's own
    FakeTensorMode (`empty_like`: no value exists to copy); the modules deep-copied around them (`memo` maps each
    original object to its copy). Not `copy.deepcopy(model)`: torch has no deep copy of a FakeTensor outside
    FakeCopyMode (Tensor.__deepcopy__ reads its data pointer, "undefined behavior" in torch's own warning, and
    deep-copies its FakeTensorMode with it), and that copy corrupted the heap: segfaults in later, unrelated code
    (Hydra's compose, datetime.strftime) and malloc aborts, in about one `make test` in three; a loop of plans
    crashed in its second iteration under glibc's malloc checks (MALLOC_CHECK_=3, MALLOC_PERTURB_)."""
    tensors = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        tensors += [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        if id(t) not in memo:
            new = torch.empty_like(t)
            memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    return copy.deepcopy(model, memo)


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
