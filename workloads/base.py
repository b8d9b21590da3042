"""What every workload provides to the harness. Concrete workloads: gpt.py, digits.py."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Workload config schemas by name: a preset YAML extends one (`- /schema/workload/NAME@_here_`); register_schema
# (membench/config.py) stores every entry. Filled by `@schema(...)` on each workload's config class.
SCHEMAS: dict[str, type] = {}


def schema(name: str, depth: str | None = None):
    """Register a workload config class under `name`. `depth`: the field counting its identical blocks (GPT:
    n_layer), which the fake-tensor simulation varies to extrapolate per layer; None where there is none."""

    def register(cls: type) -> type:
        cls.schema_name, cls.depth_knob = name, depth
        SCHEMAS[name] = cls
        return cls

    return register


# The language-model loss from the hidden states the head reads: (hidden [N, d], head module, targets [N]) -> mean
# cross-entropy. LM workloads route their loss through `Workload.loss_fn`, so a technique may replace it (fused_ce).
LossFn = Callable[[torch.Tensor, nn.Module, torch.Tensor], torch.Tensor]


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """The plain loss: the head's full logits, upcast to fp32, then cross-entropy (the default `loss_fn`)."""
    return F.cross_entropy(head(hidden).float(), targets)


MIN_LOSS_CHUNK = 256  # tokens: below this, re-reading the head weight for every chunk dominates the step on CPU


def loss_chunk(tokens: int, vocab: int, d_model: int, chunk_size: int = 0) -> int:
    """Tokens per chunk of a fused linear-cross-entropy: `chunk_size`, or for 0 Liger's rule (chunks whose logits
    are about as large as the hidden states: tokens / ceil(vocab / d_model), rounded up to a power of 2), but at
    least MIN_LOSS_CHUNK tokens."""
    if chunk_size:
        return min(chunk_size, tokens)
    liger = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(vocab / d_model)))))
    return min(tokens, max(liger, MIN_LOSS_CHUNK))


def logits_bytes(tokens: int, vocab: int, d_model: int, autocast: bool, fused: bool) -> float:
    """What the loss saves of the logits for backward: all of them in fp32 (plus the 16-bit head weight copy under
    autocast), or with a fused linear-cross-entropy (`fused`) an fp32 logsumexp per token; its chunks of logits are
    backward's temporaries (techniques/fused_ce.py names them in the prediction's other terms)."""
    if fused:
        return tokens * 4
    return tokens * vocab * 4 + (2 * d_model * vocab if autocast else 0)


@dataclass
class Quality:
    metric: str  # e.g. "eval_loss" or "test_accuracy"
    value: float
    higher_is_better: bool
    extra: dict[str, float]


class Workload:
    """A built workload: model, data, loss, quality metric, repeated blocks, analytic models."""

    name: str
    preset: str
    model: nn.Module
    tokens_per_sample: int = 1
    # LM workloads: a technique may set another loss (same signature) on the built workload in its apply (fused_ce:
    # logits never materialised); the loss is then loss_fn(hidden, lm_head(), targets), taken inside the model's
    # forward. With this default the loss is taken on the model's logits as it always was (tracing by hooks, such as
    # prune_structured's, sees the head's output as the model's).
    loss_fn: LossFn = staticmethod(linear_cross_entropy)

    def plain_loss(self) -> bool:
        return self.loss_fn is linear_cross_entropy

    def blocks(self) -> nn.ModuleList:
        """The repeated blocks; techniques wrap or swap entries of this list, never match names."""
        return self.model.blocks

    def lm_head(self) -> nn.Module | None:
        """The output head of a language model (the nn.Linear mapping the last hidden states to the vocabulary),
        which `loss_fn` receives; None for workloads without one (a technique needing it rejects them)."""
        return None

    def batch(self, step: int, batch_size: int, device: torch.device) -> Any:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, device: torch.device) -> Quality:
        raise NotImplementedError

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        raise NotImplementedError

    def lr_scale(self, step: int) -> float:
        """Linear LR warm-up over `lr_warmup_steps` (then constant): without it, Adam's first large updates
        make short runs spike and their quality numbers meaningless."""
        warm = getattr(self.c, "lr_warmup_steps", 0)
        return min(1.0, (step + 1) / warm) if warm > 0 else 1.0

    def activation_model(
        self, batch_size: int, elem_bytes: int, checkpoint: tuple[str, int] | None, autocast: bool = False
    ) -> dict[str, float]:
        """Predicted bytes saved for backward at the end of forward, by term; key `total` sums them.
        `autocast`: 16-bit autocast is on (mixed dtypes: some tensors stay fp32, weights get 16-bit copies)."""
        raise NotImplementedError

    def model_flops(self, batch_size: int) -> float:
        """Analytic training FLOPs per step (forward + backward, no recomputation)."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {}

    def fake_tensor_context(self) -> contextlib.AbstractContextManager:
        """Entered around the planner's fake-tensor step (membench/simulate.py): where a library branches on whether
        its inputs are fake (it cannot read their values), the workload says what the values are, so the fake step
        takes the branch a real step takes. Default: nothing to say."""
        return contextlib.nullcontext()

    def linear_roles(self) -> dict[str, str]:
        """{module path in self.model: role} of the linear layers a technique may target by role (lora): q, k, v,
        o, mlp, head, or block (a linear inside the blocks with no finer role). Default: every nn.Linear (also a
        bitsandbytes one) inside the blocks is "block"; workloads that know their layers say more."""
        inside = {id(m) for m in self.blocks().modules()}
        return {n: "block" for n, m in self.model.named_modules() if id(m) in inside and isinstance(m, nn.Linear)}
