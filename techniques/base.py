"""The technique contract: a config dataclass with `apply(model, ctx) -> Patch` and `predict(pred, ctx)`.

A Patch never forks the training loop; it may give a step context (autocast), a grad scaler, an optimizer
factory, after-step hooks, or a replacement model. `compose.py` applies techniques in one fixed order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class Context:
    """What a technique may look at: the workload (blocks, presets), device, and the run knobs."""

    workload: Any
    device: torch.device
    run: Any


@dataclass
class Patch:
    step_context: Callable[[], contextlib.AbstractContextManager] | None = None
    grad_scaler: Any | None = None
    optimizer_factory: Callable[[torch.nn.Module], torch.optim.Optimizer] | None = None
    after_step: list[Callable[[], None]] = field(default_factory=list)
    # Called once after training, right before the final evaluation, with the trained model; may change it in
    # place (post-training quantization) and returns facts merged into the record's technique_info.
    before_eval: list[Callable[[torch.nn.Module], dict[str, Any]]] = field(default_factory=list)
    model: torch.nn.Module | None = None  # set when a technique replaces the model object
    # Tensors that hold model state but are neither parameters, buffers, grads nor optimizer.state entries
    # (e.g. quantization scales kept as attributes). Keyed by category; added to the exact state bytes and,
    # since MemTracker cannot see tensors created before tracking that it was not told about, to the peak.
    extra_state: Callable[[], dict[str, list[torch.Tensor]]] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # measured facts for the record (e.g. adapter counts)
    # Engines that own backward and the optimizer step (DeepSpeed): the loop calls these instead of
    # loss.backward() / optimizer.step(); zero_grad is still called after.
    backward: Callable[[torch.Tensor], None] | None = None
    optimizer_step: Callable[[], None] | None = None
    # Replaces membench.measure.measure_memory (same signature) where a wrapper's tracker knows more categories
    # (FSDP's unsharded parameters and all-gather buffers).
    measure_memory: Callable | None = None


@dataclass
class Prediction:
    """Analytic inputs the techniques adjust before the byte prediction is computed (see membench/predict.py)."""

    param_bytes: float  # bytes per parameter as stored
    grad_bytes: float  # bytes per trainable parameter
    optimizer_bytes: float  # bytes per trainable parameter (AdamW: 2 states)
    act_elem_bytes: int = 4  # bytes per activation element saved for backward
    checkpoint: tuple[str, int] | None = None  # (mode, every_k) when activation checkpointing is on
    autocast_dtype: torch.dtype | None = None
    trainable_fraction: float = 1.0
    # Absolute overrides (bytes) where a per-parameter rule does not fit (quantized formats, pruned models):
    params_total: float | None = None
    grads_total: float | None = None
    optimizer_total: float | None = None
    act_extra_bytes: float = 0.0  # bytes a technique adds to what forward holds (e.g. pruning's masked weights)
    notes: list[str] = field(default_factory=list)


class Technique:
    kind: ClassVar[str] = ""
    exact: ClassVar[bool] = False  # exact techniques must leave the loss bit-identical to the baseline
    loss_rtol: ClassVar[float] = 0.0  # declared tolerance on the training loss for approximate ones

    def apply(self, model: torch.nn.Module, ctx: Context) -> Patch:
        raise NotImplementedError

    def predict(self, pred: Prediction, ctx: Context) -> None:
        """Adjust the analytic prediction; default: no effect on bytes. Called after apply()."""

    def check(self, kinds: set[str], device_type: str) -> None:
        """Reject combinations/devices this technique cannot run with (raise membench.errors.ConfigError
        naming the key and why). `kinds` are all techniques of the run. Default: no constraint."""
