"""The one place that fixes the order techniques are applied in and rejects combinations that cannot work."""

from __future__ import annotations

import contextlib
import functools

from membench.errors import ConfigError
from membench.techniques.base import Context, Patch, Technique

# Application order, and why:
# 1. structural changes first (pruning shrinks/masks the dense model that everything else then sees);
# 2. bf16_pure casts the (pruned) dense weights before any quantizer reads them;
# 3. quantization swaps linear layers inside blocks, before blocks are wrapped;
# 4. activation checkpointing wraps the (possibly quantized) blocks;
# 5. autocast only contributes a step context, so its position is free; it sits with precision;
# 6. optimizer replacements (8-bit states) are built over the final parameter set;
# 7. ZeRO/FSDP wrap last, over the finished model and optimizer.
ORDER = (
    "prune_structured",
    "prune_unstructured",
    "bf16_pure",
    "quantized_base",
    "weight_quant",
    "activation_checkpointing",
    "bf16",
    "fp16",
    "optimizer_8bit",
    "zero",
)

# Pairs that cannot run together, with the reason shown to the user.
INCOMPATIBLE = {
    frozenset({"bf16", "fp16"}): "two autocast dtypes in one step",
    frozenset({"bf16_pure", "fp16"}): "fp16 autocast over bf16 parameters mixes two 16-bit formats",
    frozenset({"bf16_pure", "bf16"}): "bf16_pure already runs everything in bf16; drop bf16",
}


def ordered(techniques: list[Technique]) -> list[Technique]:
    return sorted(techniques, key=lambda t: ORDER.index(t.kind))


def validate(techniques: list[Technique], device_type: str) -> None:
    kinds = [t.kind for t in techniques]
    for k in kinds:
        if k not in ORDER:
            raise ConfigError(f"technique={k}: not in the application order ({', '.join(ORDER)})")
    for pair, why in INCOMPATIBLE.items():
        if pair <= set(kinds):
            a, b = sorted(pair)
            raise ConfigError(f"technique=[{a},{b}]: incompatible: {why}")
    for t in techniques:
        t.check(set(kinds), device_type)


def apply_all(techniques: list[Technique], model, ctx: Context) -> tuple[object, Patch]:
    """Apply in ORDER; merge patches. Returns the (possibly replaced) model and one merged patch."""
    merged = Patch()
    contexts, extras = [], []
    for t in ordered(techniques):
        p = t.apply(model, ctx)
        if p.model is not None:
            model = p.model
        if p.step_context is not None:
            contexts.append(p.step_context)
        for name in ("grad_scaler", "optimizer_factory", "backward", "optimizer_step", "measure_memory"):
            if getattr(p, name) is not None:
                if getattr(merged, name) is not None:
                    raise ConfigError(f"technique={t.kind}: a second technique also sets the {name}")
                setattr(merged, name, getattr(p, name))
        merged.after_step += p.after_step
        merged.before_eval += [functools.partial(_prefixed, t.kind, h) for h in p.before_eval]
        if p.extra_state is not None:
            extras.append(p.extra_state)
        merged.info.update({f"{t.kind}.{k}": v for k, v in p.info.items()})

    def step_context():
        stack = contextlib.ExitStack()
        for make in contexts:
            stack.enter_context(make())
        return stack

    def extra_state():
        out: dict[str, list] = {}
        for fn in extras:
            for k, ts in fn().items():
                out.setdefault(k, []).extend(ts)
        return out

    merged.step_context = step_context
    merged.extra_state = extra_state
    return model, merged


def _prefixed(kind: str, hook, model) -> dict:
    return {f"{kind}.{k}": v for k, v in hook(model).items()}
