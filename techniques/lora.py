"""LoRA through PEFT: the workload's linear layers chosen by role get rank-r adapters and only the adapters train.
The frozen base keeps its weight bytes but loses its grads and optimizer state (fp32 AdamW: 4 + 8 of 16 B/param);
the price is quality (a low-rank update of a frozen base) and two thin matmuls per target.

Upstream: `peft.inject_adapter_in_model(LoraConfig(target_modules=<exact module paths>), model)`, which keeps the
model object and marks only the adapters trainable. The paths come from the workload's `linear_roles()` (q, k, v,
o, mlp, head, block): nothing here matches module names. After `quantized_base` (model flagged `is_loaded_in_4bit`
/ `is_loaded_in_8bit`, as transformers does) the same call dispatches PEFT's bitsandbytes LoRA layers: QLoRA.
Limits: PEFT moves new adapters with Module.to(), which fake tensors cannot do, so the planner's fake-tensor step
runs a same-shape stand-in (SimLoRA below: the same parameters and matmuls, no PEFT).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from membench.errors import ConfigError
from membench.techniques.base import Context, Patch, Prediction, States, Technique

ROLES = ("q", "k", "v", "o", "mlp", "head", "block")  # what workloads declare (workloads/base.py: linear_roles)
GROUPS = {"attention": ("q", "k", "v", "o"), "blocks": ()}  # "blocks": every linear inside the blocks, any role
PURE = {"blocks", "block"}  # targets the pure steps resolve from the model and its blocks alone
ADAPTERS = "lora_adapters"  # States attribute: element counts of the adapters a technique added (see states())


def select(roles: dict[str, str], targets: tuple[str, ...], model: nn.Module, blocks: nn.Module) -> list[str]:
    """Module paths whose declared role is asked for ("attention" = q/k/v/o; "blocks": every linear inside the
    blocks, found by identity), in model order."""
    wanted = {r for t in targets for r in GROUPS.get(t, (t,))}
    inside = {id(m) for m in blocks.modules()}
    every = "blocks" in targets
    found = modules_at(model, [p for p, r in roles.items() if r not in wanted]) if every else {}
    return [p for p, r in roles.items() if r in wanted or (every and id(found[p]) in inside)]


def modules_at(model: nn.Module, paths: list[str]) -> dict[str, nn.Module]:
    """model.get_submodule(p) for each path, from one walk of the model (a get_submodule per linear of an 8B model
    was most of the planner's LoRA pricing); a path the walk does not name is looked up as get_submodule does."""
    every = dict(model.named_modules(remove_duplicate=False))
    return {p: every[p] if p in every else model.get_submodule(p) for p in paths}


def default_roles(model: nn.Module, blocks: nn.Module) -> dict[str, str]:
    """Every nn.Linear (bitsandbytes layers subclass it) inside the blocks: role "block", as the Workload default
    (workloads/base.py) declares them; for the pure steps, which see the model and its blocks only."""
    inside = {id(m) for m in blocks.modules()}
    return {n: "block" for n, m in model.named_modules() if id(m) in inside and isinstance(m, nn.Linear)}


def unwrap(model: nn.Module) -> int:
    """Replace PEFT LoRA wrappers by their base layers (adapters dropped); returns how many."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, m in found:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, m.get_base_layer())
    if found:
        del model.peft_config  # what inject_adapter_in_model recorded: the next injection starts afresh
    return len(found)


def inject(model: nn.Module, paths: list[str], rank: int, alpha: float, dropout: float,
           dtype: torch.dtype | None = None) -> list[nn.Parameter]:  # fmt: skip
    """PEFT LoRA adapters on exactly `paths`; only they train afterwards. Returns the adapter parameters.
    `dtype`: the adapters' dtype where the base has none PEFT can read (a bitsandbytes base stores uint8 codes, so
    PEFT leaves its adapters fp32; the callers pass the model's float dtype, bf16 after bf16_pure)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    # The whole path as a regex: PEFT full-matches a string target_modules, so no other module can match.
    pattern = "|".join(p.replace(".", r"\.") for p in paths)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=f"^(?:{pattern})$")
    # Adapters take the base's float dtype (bf16 under bf16_pure, as its state rates say): unlike get_peft_model,
    # inject_adapter_in_model does not upcast them to fp32.
    inject_adapter_in_model(config, model)
    if dtype is not None:
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.lora_A.to(dtype), m.lora_B.to(dtype)
    return [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's floating-point parameters are stored in (the adapters take it)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def adapter_sizes(model: nn.Module, paths: list[str], rank: int) -> list[int]:
    """Pure: rank * in and rank * out elements per targeted linear (A is [rank, in], B is [out, rank])."""
    found = modules_at(model, paths)
    lins = [found[p] for p in paths]
    return [n for lin in lins for n in (rank * lin.in_features, rank * lin.out_features)]


@dataclass(frozen=True)
class Lora(Technique):
    kind: ClassVar[str] = "lora"
    # After quantized_base (4: PEFT must see the bitsandbytes layers to dispatch its QLoRA layers), before
    # weight_quant (5) and activation checkpointing (6, which wraps the blocks the adapters live in).
    order: ClassVar[float] = 4.5
    loss_rtol: ClassVar[float] = 0.5  # a low-rank update of a frozen base trains differently from full training
    incompatible: ClassVar[dict[str, str]] = {
        "weight_quant": "post-training quantization would also quantize the adapters' A and B linears",
    }
    family: ClassVar[str] = "lora"
    label_opts: ClassVar[tuple[str, ...]] = ("rank",)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["blocks"])

    def __post_init__(self) -> None:
        key = "technique.lora"
        if self.rank < 1:
            raise ConfigError(f"{key}.rank={self.rank}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{key}.dropout={self.dropout}: must be in [0, 1)")
        allowed = (*ROLES, *GROUPS)
        bad = [t for t in self.targets if t not in allowed]
        if bad or not self.targets:
            raise ConfigError(f"{key}.targets={list(self.targets)}: allowed {', '.join(allowed)} (at least one)")
        object.__setattr__(self, "targets", tuple(self.targets))  # hashable, like every other frozen knob

    def time_prior(self) -> float:
        return 0.9  # no weight gradients for the base (Hu et al. 2021: ~25% faster on GPT-3); two thin matmuls more

    def paths(self, model: nn.Module, blocks: nn.Module, roles: dict[str, str]) -> list[str]:
        return select(roles, self.targets, model, blocks)

    def check_model(self, model: nn.Module, blocks) -> str | None:
        if set(self.targets) <= PURE and not select(default_roles(model, blocks), self.targets, model, blocks):
            return f"technique.lora.targets={list(self.targets)}: no nn.Linear inside the blocks"
        return None

    def apply(self, model: nn.Module, ctx: Context) -> Patch:
        replaced = unwrap(model) if ctx.applied.get("quantized_base", {}).get("adapters") else 0
        paths = self.paths(model, ctx.workload.blocks(), ctx.workload.linear_roles())
        if not paths:
            raise ConfigError(f"technique.lora.targets={list(self.targets)}: workload {ctx.workload.name} declares "
                              f"no linear with these roles ({sorted(set(ctx.workload.linear_roles().values()))})")  # fmt: skip
        adapters = inject(model, paths, self.rank, self.alpha, self.dropout, float_dtype(model))
        n = sum(p.numel() for p in adapters)
        info = {"adapters": len(paths), "adapter_params": n, "trainable_params": _trainable(model),
                "replaced_quantized_base_adapters": replaced}  # fmt: skip
        return Patch(info=info, applied={"paths": paths, "adapter_params": n, "adapter_tensors": len(adapters)})

    def states(self, s: States) -> None:
        """Adapters at the base's parameter rate; only they carry grads and optimizer state (PEFT freezes the rest,
        the base stays at its rate). Adapters an earlier technique added (quantized_base alone) are replaced."""
        roles = getattr(s, "roles", None)  # the workload's linear_roles(), where the harness passes them
        if roles is None:
            if not set(self.targets) <= PURE:
                raise ConfigError(f"technique.lora.targets={list(self.targets)}: the pure states step sees the model "
                                  "and its blocks only; roles other than blocks need the workload's linear_roles()")  # fmt: skip
            roles = default_roles(s.model, s.blocks)
        sizes = adapter_sizes(s.model, self.paths(s.model, s.blocks, roles), self.rank)
        s.dense += sum(sizes) - sum(getattr(s, ADAPTERS, []))
        s.trainable = sizes
        setattr(s, ADAPTERS, sizes)
        s.rule.append(f"rank-{self.rank} LoRA (PEFT) on {len(sizes) // 2} linears, base frozen")

    def activation_terms(self, pred: Prediction) -> None:
        """Modest and left out of the analytic model: per target and token, x @ A (rank values) is saved for B's
        backward (and the dropout mask when dropout > 0); the base's own input is saved anyway (A's backward
        reuses it). At rank 8 that is 1/8 of a 64-wide linear's saved input, 1/96 of a 768-wide one's."""

    def simulated(self) -> Technique | None:
        return SimLora(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=list(self.targets))


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class SimLoRA(nn.Module):
    """Fake-tensor stand-in for PEFT's LoRA layer: the same A [rank, in] and B [out, rank] parameters and the same
    forward, base(x) + B(A(dropout(x))) * alpha / rank, created in place (no Module.to())."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        w = base.weight
        self.base, self.scale = base, alpha / rank
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.drop = nn.Dropout(dropout)
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(self.drop(x))) * self.scale


@dataclass(frozen=True)
class SimLora(Lora):
    """What `lora` runs as on fake tensors (not registered: no `kind` of its own)."""

    def apply(self, model: nn.Module, ctx: Context) -> Patch:
        paths = self.paths(model, ctx.workload.blocks(), ctx.workload.linear_roles())
        model.requires_grad_(False)
        for path in paths:
            parent, _, attr = path.rpartition(".")
            base = model.get_submodule(path)
            setattr(model.get_submodule(parent), attr, SimLoRA(base, self.rank, self.alpha, self.dropout))
        return Patch(applied={"paths": paths})

    def simulated(self) -> Technique | None:
        return self
