"""Unstructured magnitude pruning: zeroes the smallest weights, and during training saves no memory at all.

Uses torch.nn.utils.prune (L1Unstructured masks, global or per layer; custom_from_mask) on the nn.Linear and
nn.Conv2d weights inside the workload's blocks: each becomes `weight_orig` (parameter) x `weight_mask` (buffer,
same dtype), the product recomputed every forward, so dense+mask costs more than dense (measured). What pruning
can save is storage for evaluation/inference: `info.final` holds the bytes torch allocates for CSR copies of the
final weights (storage bytes: to_sparse_csr's int64 col_indices sit on twice their logical size) with int64 and
int32 indices, their logical sizes, next to the dense bytes and, with pattern=2:4 (CUDA only), torch's semi-structured format bytes.
Modes: one-shot (prune in apply(); the run's steps fine-tune) or gradual (cubic schedule, masks updated after
optimizer steps). The 2:4 mask is computed here: torch ships the 2:4 format but no mask helper for it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import prune

from membench.errors import ConfigError
from membench.techniques.base import Context, Patch, Prediction, States, Technique
from membench.techniques.pruning import check_fraction, check_not_negative, cubic_sparsity, pretrain, quality

SCOPES = ("global", "layer")
SCHEDULES = ("oneshot", "gradual")
PATTERNS = ("unstructured", "2:4")
KEY = "technique.prune_unstructured"


@dataclass(frozen=True)
class PruneUnstructured(Technique):
    kind: ClassVar[str] = "prune_unstructured"
    # Structural changes first: the masks sit on the dense weights every later technique sees.
    order: ClassVar[float] = 2
    not_simulated: ClassVar[str] = "magnitude thresholds read real weight values"
    incompatible: ClassVar[dict[str, str]] = dict.fromkeys(
        ("quantized_base", "weight_quant"), "the quantizer replaces the nn.Linear modules that hold the masks"
    )
    loss_rtol: ClassVar[float] = 0.1
    sparsity: float = 0.8  # fraction of the blocks' Linear/Conv weights set to zero
    scope: str = "global"  # global: one magnitude threshold over all pruned layers; layer: per layer
    pattern: str = "unstructured"  # unstructured | 2:4 (two of every four along the input dim; CUDA; sparsity 0.5)
    schedule: str = "oneshot"  # oneshot: prune in apply(); gradual: cubic ramp over the run's first ramp_steps
    ramp_steps: int = 100  # gradual: optimizer steps until the target sparsity is reached
    prune_every: int = 10  # gradual: steps between mask updates
    pretrain_steps: int = 0  # dense training before pruning (0: prune the initial weights)
    pretrain_cache: bool = True  # reuse pretrained weights across runs (~/.cache/membench/pretrain)

    def __post_init__(self) -> None:
        check_fraction(f"{KEY}.sparsity", self.sparsity)
        for key, value, allowed in (("scope", self.scope, SCOPES), ("schedule", self.schedule, SCHEDULES)):
            if value not in allowed:
                raise ConfigError(f"{KEY}.{key}={value!r}: allowed {', '.join(allowed)}")
        if self.pattern not in PATTERNS:
            raise ConfigError(f"{KEY}.pattern={self.pattern!r}: allowed {', '.join(PATTERNS)}")
        if self.pattern == "2:4" and (self.sparsity != 0.5 or self.schedule != "oneshot"):
            raise ConfigError(f"{KEY}.pattern=2:4: needs sparsity=0.5 and schedule=oneshot")
        for key in ("ramp_steps", "prune_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{KEY}.{key}={getattr(self, key)}: must be >= 1")
        check_not_negative(f"{KEY}.pretrain_steps", self.pretrain_steps)

    def check(self, kinds: set[str], device_type: str) -> None:
        if self.pattern == "2:4" and device_type != "cuda":
            raise ConfigError(f"{KEY}.pattern=2:4: torch's semi-structured sparsity is CUDA-only; use unstructured")

    def layers(self, blocks: nn.Module) -> list[nn.Module]:
        """The layers it prunes: every nn.Linear (and, unless 2:4, nn.Conv2d) inside the blocks."""
        kinds = (nn.Linear,) if self.pattern == "2:4" else (nn.Linear, nn.Conv2d)
        return [m for m in blocks.modules() if isinstance(m, kinds)]

    def targets(self, ctx: Context) -> list[nn.Module]:
        kinds = (nn.Linear,) if self.pattern == "2:4" else (nn.Linear, nn.Conv2d)
        mods = self.layers(ctx.workload.blocks())
        if not mods:
            raise ConfigError(f"{KEY}.pattern={self.pattern}: the workload's blocks have no {kinds} layer to prune")
        return mods

    def masks(self, weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
        """Magnitude masks (1 keep, 0 prune) with exactly round(sparsity * n) zeros per layer or overall."""
        if self.pattern == "2:4":
            return [two_four_mask(w) for w in weights]
        method = prune.L1Unstructured(amount=sparsity)
        if self.scope == "layer":
            return [method.compute_mask(w, torch.ones_like(w)) for w in weights]
        flat = torch.cat([w.flatten() for w in weights])
        mask = method.compute_mask(flat, torch.ones_like(flat))
        return [m.view_as(w) for m, w in zip(mask.split([w.numel() for w in weights]), weights, strict=True)]

    def apply(self, model: nn.Module, ctx: Context) -> Patch:
        if self.schedule == "gradual" and self.ramp_steps > ctx.run.train_steps:
            raise ConfigError(f"{KEY}.ramp_steps={self.ramp_steps}: must be <= run.train_steps={ctx.run.train_steps}")
        info = pretrain(model, ctx, self.pretrain_steps, self.pretrain_cache)
        mods = self.targets(ctx)
        info["quality_dense"] = quality(model, ctx)
        first = self.sparsity if self.schedule == "oneshot" else 0.0
        with torch.no_grad():
            for m, mask in zip(mods, self.masks([m.weight for m in mods], first), strict=True):
                prune.custom_from_mask(m, "weight", mask)
        if self.schedule == "oneshot":
            info["quality_pruned"] = quality(model, ctx)
        info.update(pruned_layers=len(mods), pruned_weights=sum(m.weight_mask.numel() for m in mods))
        info["mask_bytes"] = sum(m.weight_mask.numel() * m.weight_mask.element_size() for m in mods)
        semi = self.pattern == "2:4" and ctx.device.type == "cuda"
        done = [0]

        def after_step() -> None:
            done[0] += 1
            t = done[0]
            if t <= self.ramp_steps and (t % self.prune_every == 0 or t == self.ramp_steps):
                self.update_masks(mods, cubic_sparsity(t, self.sparsity, self.ramp_steps))

        return Patch(
            after_step=[after_step] if self.schedule == "gradual" else [],
            before_eval=[lambda m: {"final": storage(mods, semi)}],  # the trained weights, after the last step
            info=info,
        )

    @torch.no_grad()
    def update_masks(self, mods: list[nn.Module], sparsity: float) -> None:
        for m, mask in zip(mods, self.masks([effective(m) for m in mods], sparsity), strict=True):
            m.weight_mask.copy_(mask)  # in place: same buffer, so nothing the harness tracks is replaced

    def states(self, s: States) -> None:
        """torch.nn.utils.prune keeps the weight as `weight_orig` (same parameter count) and adds a `weight_mask`
        buffer of the weight's shape and dtype per pruned layer: no saving in any state, the masks on top."""
        weights = [m.weight for m in self.layers(s.blocks)]
        elems, nbytes = sum(w.numel() for w in weights), sum(w.numel() * w.element_size() for w in weights)
        s.buffers += nbytes
        s.float_buffers = (s.float_buffers[0] + elems, s.float_buffers[1] + nbytes)  # bf16_pure casts them too
        s.rule.append(f"prune_unstructured: + {len(weights)} weight masks")

    def predict(self, pred: Prediction, ctx: Context) -> None:
        # the states count weight_orig and the weight_mask buffers; forward adds weight = orig * mask per layer
        pred.act_extra_bytes += sum(nbytes(m.weight_orig) for m in self.targets(ctx))
        pred.notes.append("prune_unstructured: dense weight_orig + weight_mask buffer + a recomputed masked weight")


def effective(m: nn.Module) -> torch.Tensor:
    return m.weight_orig * m.weight_mask


def two_four_mask(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest-magnitude weights of every 4 consecutive ones along the input dimension."""
    groups = w.detach().abs().reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(groups).scatter_(-1, groups.topk(2, dim=-1).indices, 1.0)
    return keep.reshape(w.shape)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def to_csr(w: torch.Tensor, index_dtype: torch.dtype) -> torch.Tensor:
    """A real torch CSR tensor of `w` (conv weights as out x in*kh*kw) with the given index dtype: torch's own
    to_sparse_csr (int64 indices), its indices cast to int32 when asked."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = w.detach().reshape(w.shape[0], -1).to_sparse_csr()
        crow, col = csr.crow_indices().to(index_dtype), csr.col_indices().to(index_dtype)  # no copy for int64
        return torch.sparse_csr_tensor(crow, col, csr.values(), size=csr.shape, check_invariants=True)


def csr_nbytes(w: torch.Tensor, index_dtype: torch.dtype, logical: bool = False) -> int:
    """Bytes torch allocates for the CSR copy of `w`: the storages behind values, crow_indices and col_indices
    (to_sparse_csr over-allocates col_indices); logical=True gives numel x element size instead."""
    t = to_csr(w, index_dtype)
    parts = (t.values(), t.crow_indices(), t.col_indices())
    if logical:
        return nbytes(*parts)
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in parts}.values())


def semi_structured_nbytes(w: torch.Tensor) -> int:
    """Bytes of torch's 2:4 semi-structured tensor (packed values + metadata) of `w` in fp16. CUDA only."""
    from torch.sparse import to_sparse_semi_structured

    s = to_sparse_semi_structured(w.detach().to(torch.float16).contiguous())
    names, _ = s.__tensor_flatten__()
    return nbytes(*(getattr(s, n) for n in names))


@torch.no_grad()
def storage(mods: list[nn.Module], semi_structured: bool) -> dict:
    """Measured sparsity of the final weights and what storing them costs, dense vs compressed."""
    ws = [effective(m) for m in mods]
    n, nnz = sum(w.numel() for w in ws), sum(int(w.count_nonzero()) for w in ws)
    out = {
        "sparsity": 1 - nnz / n,
        "nnz": nnz,
        "dense_bytes": nbytes(*ws),
        "csr_int64_bytes": sum(csr_nbytes(w, torch.int64) for w in ws),
        "csr_int32_bytes": sum(csr_nbytes(w, torch.int32) for w in ws),
        "csr_int64_logical_bytes": sum(csr_nbytes(w, torch.int64, logical=True) for w in ws),
        "csr_int32_logical_bytes": sum(csr_nbytes(w, torch.int32, logical=True) for w in ws),
        "value_dtype": str(ws[0].dtype),
    }
    if semi_structured:
        out["dense_fp16_bytes"] = sum(w.numel() * 2 for w in ws)
        out["semi_structured_2of4_fp16_bytes"] = sum(semi_structured_nbytes(w) for w in ws)
    return out
