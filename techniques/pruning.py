"""Shared pieces of the two pruning techniques (prune_unstructured.py, prune_structured.py).

Pruning only makes sense on a trained model, but the harness hands techniques a freshly initialised one, so
`pretrain()` first trains the dense model for `pretrain_steps` with the workload's own loss, optimizer and data
(batches drawn from an index range the run itself never uses); the run's own steps are then the fine-tune.
The pretrained weights are cached on disk, keyed by everything that determines them, so a study pays for them
once. `quality()` gives the "before pruning" and "right after pruning" numbers that the harness cannot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
from pathlib import Path

import torch

from membench.errors import ConfigError
from membench.techniques.base import Context

PRETRAIN_BATCH_OFFSET = 1_000_000  # pretraining batches use indices the run's own steps never reach
CACHE_DIR = Path("~/.cache/membench/pretrain").expanduser()


def check_fraction(key: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{key}={value}: must be in (0, 1) (a fraction; 0.8 prunes 80%)")


def check_not_negative(key: str, value: int) -> None:
    if value < 0:
        raise ConfigError(f"{key}={value}: must be >= 0")


def reject_both(kinds: set[str]) -> None:
    if {"prune_structured", "prune_unstructured"} <= kinds:
        raise ConfigError(
            "technique=[prune_structured,prune_unstructured]: incompatible: each pretrains and reports its own "
            "before/after quality; run them as separate cells"
        )


def quality(model: torch.nn.Module, ctx: Context) -> dict:
    q = ctx.workload.evaluate(model, ctx.device)
    return {"metric": q.metric, "value": q.value, **q.extra}


def _cache_key(ctx: Context, steps: int) -> str:
    wl = ctx.workload
    ident = {
        "workload": dataclasses.asdict(wl.c),
        "workload_source": hashlib.sha256(Path(inspect.getsourcefile(type(wl))).read_bytes()).hexdigest(),
        "seed": ctx.run.seed,
        "batch_size": ctx.run.batch_size,
        "steps": steps,
        "torch": torch.__version__,
        "device": ctx.device.type,
        "threads": torch.get_num_threads(),  # reductions, hence the trained bits, depend on it
        "lr_schedule": "linear-warmup-v1",
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


def pretrain(model: torch.nn.Module, ctx: Context, steps: int, cache: bool) -> dict:
    """Train the dense model for `steps` optimizer steps (fp32, no technique active). Returns facts for info."""
    if steps == 0:
        return {"pretrain_steps": 0}
    path = CACHE_DIR / f"{_cache_key(ctx, steps)}.pt"
    if cache and path.exists():
        model.load_state_dict(torch.load(path, map_location=ctx.device, weights_only=True))
        return {"pretrain_steps": steps, "pretrain_from_cache": str(path)}
    wl = ctx.workload
    opt = wl.make_optimizer([p for p in model.parameters() if p.requires_grad])
    model.train()
    losses = []
    base_lrs = [g["lr"] for g in opt.param_groups]
    for i in range(steps):
        for g, lr in zip(opt.param_groups, base_lrs, strict=True):  # the same LR warm-up as the harness's loop
            g["lr"] = lr * wl.lr_scale(i)
        loss = wl.loss(model, wl.batch(PRETRAIN_BATCH_OFFSET + i, ctx.run.batch_size, ctx.device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    tail = losses[-10:]
    return {"pretrain_steps": steps, "pretrain_from_cache": None, "pretrain_last10_loss": sum(tail) / len(tail)}


def cubic_sparsity(step: int, target: float, ramp_steps: int) -> float:
    """Zhu & Gupta 2017 ("To prune, or not to prune"), eq. 1 with s_i = 0, t_0 = 0: fast early, slow late."""
    t = min(step, ramp_steps) / ramp_steps
    return target * (1.0 - (1.0 - t) ** 3)


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def zero_fraction(tensors: list[torch.Tensor]) -> float:
    n = sum(t.numel() for t in tensors)
    return sum(int((t == 0).sum()) for t in tensors) / n if n else math.nan
