"""ZeRO sharding: trades extra communication (1x-1.5x plain data parallelism) for holding only 1/N of the
optimizer state (stage 1), also of the gradients (2), also of the parameters (3) on each of N ranks.

Backends: `deepspeed` (deepspeed.initialize with a generated config; torch's AdamW via `torch_adam`, since
DeepSpeed's CPU Adam is a minutes-long C++ build) and `torch` (0: DDP, 1: DDP + ZeroRedundancyOptimizer,
2: FSDP2 fully_shard(reshard_after_forward=False), 3: FSDP2 fully_shard). Exact: fp32 losses match stage 0 up to
float reassociation. Limits: torch stage 2 is not ZeRO-2 (FSDP2 also shards parameters at rest and all-gathers
them once per step); ZeroRedundancyOptimizer shards whole parameters; offload needs a CUDA device.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from membench import distributed, measure
from membench.errors import ConfigError
from membench.techniques.base import Context, Patch, States, Technique

BACKENDS = ("deepspeed", "torch")
OFFLOAD = ("none", "cpu")
STAGE3_KNOBS = ("paper", "deepspeed")
# Techniques whose parameters or optimizer these wrappers cannot shard or rebuild.
CANNOT = {
    "optimizer_8bit": "zero builds its own (sharded) optimizer from the workload's AdamW",
    "quantized_base": "FSDP/DeepSpeed shard floating-point parameters only",
    "weight_quant": "FSDP/DeepSpeed shard floating-point parameters only",
}
MT_CATEGORIES = {"PARAM": "params", "BUFFER": "params", "GRAD": "grads", "OPT": "optimizer", "ACT": "activations"}
# FSDPMemTracker reference types -> record categories (FSDP's extra copies keep names of their own).
FSDP_CATEGORIES = {
    "SHARDED_PARAM": "params",
    "BUFFER": "params",
    "UNSHARDED_PARAM": "params_unsharded",
    "SHARDED_GRAD": "grads",
    "UNSHARDED_GRAD": "grads_unsharded",
    "ALL_GATHER": "comm_buffers",
    "REDUCE_SCATTER": "comm_buffers",
    "ACT": "activations",
    "OPT": "optimizer",
}


@dataclass(frozen=True)
class Zero(Technique):
    kind: ClassVar[str] = "zero"
    # ZeRO/FSDP wrap last, over the finished model and optimizer.
    order: ClassVar[float] = 10
    exact: ClassVar[bool] = True
    loss_rtol: ClassVar[float] = 1e-5  # sharded reductions reorder float sums
    incompatible: ClassVar[dict[str, str]] = CANNOT
    not_simulated: ClassVar[str] = "DeepSpeed engines and process groups do not run on fake tensors here"
    family: ClassVar[str] = "zero"
    label_opts: ClassVar[tuple[str, ...]] = ("stage", "offload_optimizer", "offload_params")
    distributed: ClassVar[bool] = True
    stage: int = 2
    backend: str = "deepspeed"
    offload_optimizer: str = "none"
    offload_params: str = "none"
    reduce_bucket_size: int = 5_000_000
    allgather_bucket_size: int = 5_000_000
    torch_adam: bool = True  # deepspeed: torch's AdamW instead of DeepSpeed's compiled Fused/CPU Adam
    stage3_knobs: str = (
        "paper"  # deepspeed stage 3: paper (shard and release every parameter) | deepspeed (its defaults)
    )

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"technique.zero.stage={self.stage}: allowed 0, 1, 2, 3")
        if self.backend not in BACKENDS:
            raise ConfigError(f"technique.zero.backend={self.backend!r}: allowed {', '.join(BACKENDS)}")
        for key in ("offload_optimizer", "offload_params"):
            if getattr(self, key) not in OFFLOAD:
                raise ConfigError(f"technique.zero.{key}={getattr(self, key)!r}: allowed {', '.join(OFFLOAD)}")
        if self.offload_params != "none" and self.stage != 3:
            raise ConfigError(f"technique.zero.offload_params={self.offload_params}: needs stage=3")
        if self.offload_optimizer != "none" and self.stage == 0:
            raise ConfigError("technique.zero.offload_optimizer=cpu: needs stage >= 1")
        if self.stage3_knobs not in STAGE3_KNOBS:
            raise ConfigError(f"technique.zero.stage3_knobs={self.stage3_knobs!r}: allowed {', '.join(STAGE3_KNOBS)}")
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"technique.zero.{key}={getattr(self, key)}: must be > 0")

    @classmethod
    def plan_values(cls, world_size: int, device_type: str) -> list[dict]:
        """Stages over N > 1 ranks; offload (CUDA only) at any N."""
        out = []
        if world_size > 1:
            out += [{"stage": s, "offload_optimizer": "none", "offload_params": "none"} for s in range(4)]
        if device_type == "cuda":
            out += [{"stage": s, "offload_optimizer": "cpu", "offload_params": "none"} for s in (1, 2, 3)]
            out += [{"stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"}]
        return out

    def time_prior(self) -> float:
        if self.offload_optimizer != "none":
            return 1.5
        return 1.15 if self.stage == 3 else 1.0

    def check(self, kinds: set[str], device_type: str) -> None:
        offload = self.offload_optimizer != "none" or self.offload_params != "none"
        if offload and device_type != "cuda":
            raise ConfigError("technique.zero.offload_*=cpu: the run is already on CPU; offload needs run.device=cuda")
        if self.backend == "torch" and self.offload_optimizer != "none":
            raise ConfigError(
                "technique.zero.offload_optimizer=cpu: backend=torch offloads only with stage=3 offload_params=cpu "
                "(FSDP2's CPUOffloadPolicy moves params, grads and the optimizer step together)"
            )
        if self.backend == "deepspeed":
            if "fp16" in kinds and device_type == "cpu":
                raise ConfigError("technique=[zero,fp16]: DeepSpeed's CPU accelerator has no fp16; use bf16 or cuda")
            if "bf16_pure" in kinds:
                raise ConfigError("technique=[zero,bf16_pure]: DeepSpeed keeps fp32 masters; use technique=[zero,bf16]")

    # ---- apply -------------------------------------------------------------------------------------------
    def apply(self, model: torch.nn.Module, ctx: Context) -> Patch:
        # sizes before wrapping (stage 3 partitions parameters to empty tensors) and the precision in force
        dtype = next((a["autocast_dtype"] for a in ctx.applied.values() if "autocast_dtype" in a), torch.float32)
        facts = {
            "psi": sum(p.numel() for p in model.parameters()),
            "buffers": sum(b.numel() * b.element_size() for b in model.buffers()),
            "largest": max(p.numel() for p in model.parameters()),
            "n": distributed.world_size(),
            "dtype": dtype,
        }
        patch = (_apply_deepspeed(self, facts, model, ctx) if self.backend == "deepspeed"
                 else _apply_torch(self, model, ctx))  # fmt: skip
        patch.info.update(psi=facts["psi"], world_size=facts["n"], stage=self.stage, backend=self.backend)
        patch.applied = facts
        return patch

    # ---- predict (per rank) ------------------------------------------------------------------------------
    def bucket_bytes(self, psi: int, elem_bytes: float) -> float:
        """DeepSpeed stages 1-2 reduce gradients through a bucket of reduce_bucket_size elements (no more than the
        model has) in the gradient dtype, allocated during the step (docs/zero.md)."""
        if self.backend != "deepspeed" or self.stage not in (1, 2):
            return 0.0
        return float(min(self.reduce_bucket_size, psi) * elem_bytes)

    def states(self, s: States) -> None:
        """ZeRO paper (Rajbhandari et al. 2020, sec. 5): stage s divides optimizer (s >= 1), grads (s >= 2),
        params (s = 3) by N; offload moves them to the host. DeepSpeed mixed precision: 2 + 2 + K=12."""
        if self.backend == "deepspeed" and s.autocast is not None:
            s.param_rate, s.grad_rate, s.opt_rate = 2, 2, 12
            s.rule = ["DeepSpeed mixed precision 2+2+12"]
        s.step_bytes = 0  # the wrappers' optimizers are counted by the paper's K alone
        bucket = self.bucket_bytes(s.psi, s.grad_rate)
        if bucket:
            s.other["deepspeed_reduce_bucket"] = bucket
        n, buffers = s.world_size, s.buffers

        def shard(device: dict, host: dict) -> None:
            if self.stage >= 1:
                device["optimizer"] /= n
            if self.stage >= 2:
                device["grads"] /= n
            if self.stage >= 3:
                device["params"] = (device["params"] - buffers) / n + buffers
            if self.offload_optimizer == "cpu":
                host["optimizer"], device["optimizer"] = device["optimizer"], 0.0
            if self.offload_params == "cpu":
                host["params"], device["params"] = device["params"] - buffers, float(buffers)

        s.post.append(shard)
        s.rule.append(f"ZeRO stage {self.stage} over N={n}"
                      + ("; DeepSpeed's fp32 master partition is recorded as fp32_master" if self.backend == "deepspeed"
                         else ""))  # fmt: skip

    def expected_comm(self, facts: dict) -> dict:
        """ZeRO paper sec. 7: 2 Psi elements per rank per step for DP and stages 1-2, 3 Psi for stage 3.
        `facts`: what apply learned (Patch.applied)."""
        factor = 3 if self.stage == 3 else 2
        return {"paper_elements": factor * facts["psi"], "factor_of_psi": factor, "psi": facts["psi"]}


# ---- torch backend -----------------------------------------------------------------------------------------
def _optimizer_spec(ctx: Context, params) -> tuple[type, dict]:
    """The workload's optimizer class and its hyper-parameters, read off a throwaway instance."""
    probe = ctx.workload.make_optimizer(params)
    cls = type(probe)
    names = inspect.signature(cls).parameters
    return cls, {k: v for k, v in probe.defaults.items() if k in names}


def _apply_torch(z: Zero, model: torch.nn.Module, ctx: Context) -> Patch:
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    if z.stage >= 2:
        offload = CPUOffloadPolicy() if z.offload_params == "cpu" else OffloadPolicy()
        reshard = z.stage == 3
        for block in ctx.workload.blocks():
            fully_shard(block, reshard_after_forward=reshard, offload_policy=offload)
        fully_shard(model, reshard_after_forward=reshard, offload_policy=offload)
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        return Patch(model=model, measure_memory=measure.with_tracker(FSDPMemTracker, FSDP_CATEGORIES))
    # gradient_as_bucket_view: grads live in DDP's buckets instead of a second full-size copy
    ddp = DDP(model, gradient_as_bucket_view=True)
    holder: dict = {}

    def bucket_grads():  # grads are views into DDP's persistent buckets, which MemTracker does not see
        live = {p.grad.untyped_storage().data_ptr(): p.grad for p in ddp.parameters() if p.grad is not None}
        holder["grads"] = list(live.values()) or holder.get("grads", [])  # one view per bucket storage
        return holder["grads"]

    if z.stage == 0:
        return Patch(model=ddp, extra_state=lambda: {"grads": bucket_grads()})
    from torch.distributed.optim import ZeroRedundancyOptimizer

    def factory(m):
        cls, kw = _optimizer_spec(ctx, list(m.parameters()))
        holder["opt"] = ZeroRedundancyOptimizer(list(m.parameters()), optimizer_class=cls, **kw)
        return holder["opt"]

    def local_state():  # the rank's own shard of the optimizer state, held by the wrapped local optimizer
        return {
            "optimizer": [v for s in holder["opt"].optim.state.values() for v in s.values()],
            "grads": bucket_grads(),
        }

    return Patch(model=ddp, optimizer_factory=factory, extra_state=local_state)


# ---- deepspeed backend -------------------------------------------------------------------------------------
def _ds_config(z: Zero, ctx: Context, opt_cls: type, opt_kw: dict, dtype: torch.dtype) -> dict:
    if opt_cls.__name__ not in ("Adam", "AdamW"):
        raise ConfigError(f"technique.zero.backend=deepspeed: workload optimizer {opt_cls.__name__} is not Adam(W)")
    zo = {
        "stage": z.stage,
        "reduce_bucket_size": z.reduce_bucket_size,
        "allgather_bucket_size": z.allgather_bucket_size,
        # DeepSpeed's own default, stated: overlap reduction with backward at stage 3 only (two reduce buffers)
        "overlap_comm": z.stage == 3,
        **_stage3_knobs(z),
    }
    if z.offload_optimizer == "cpu":
        zo["offload_optimizer"] = {"device": "cpu"}
    if z.offload_params == "cpu":
        zo["offload_param"] = {"device": "cpu"}
    params = {k: opt_kw[k] for k in ("lr", "betas", "eps", "weight_decay") if k in opt_kw}
    return {
        "train_micro_batch_size_per_gpu": ctx.run.batch_size,
        "gradient_accumulation_steps": 1,
        # DeepSpeed clips at 1.0 when the key is absent; the workloads have no clipping knob and the torch backend
        # does not clip, so state "off" (0.0) to train the same model as torch DDP/FSDP.
        "gradient_clipping": 0.0,
        "optimizer": {"type": opt_cls.__name__, "params": dict(params, torch_adam=z.torch_adam)},
        "zero_optimization": zo,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_force_ds_cpu_optimizer": False,  # allow torch's AdamW with offload
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _stage3_knobs(z: Zero) -> dict:
    """Stage 3's cost lives in these knobs (docs/zero.md, "Stage 3 step time"). `paper`: every parameter sharded
    (persistence threshold 0) and released right after its module runs (reuse distance 0, at most one bucket of
    gathered parameters live), so per-rank bytes match the paper's Psi*(2+2+12)/N and backward re-gathers every
    parameter: one fetch/release hook pair per submodule per pass, even at N=1. `deepspeed`: DeepSpeed 0.19's
    defaults (parameters under 1e5 elements stay whole on every rank, gathered ones are kept for reuse, 5e7-element
    prefetch), fewer gathers and hooks for more resident bytes."""
    if z.stage3_knobs == "deepspeed":
        return {
            "stage3_prefetch_bucket_size": 50_000_000,
            "stage3_param_persistence_threshold": 100_000,
            "stage3_max_reuse_distance": 1_000_000_000,
            "stage3_max_live_parameters": 1_000_000_000,
        }
    return {
        "stage3_prefetch_bucket_size": z.allgather_bucket_size,
        "stage3_param_persistence_threshold": 0,
        "stage3_max_reuse_distance": 0,
        "stage3_max_live_parameters": z.allgather_bucket_size,
    }


def _ds_state(engine, stage: int) -> dict[str, list[torch.Tensor]]:
    """The rank's own DeepSpeed shards, as named categories: its fp32 master partition is kept even in fp32
    training (a copy the paper's fp32 formula does not have); stage 3 params live in ds_tensor partitions."""
    opt = engine.optimizer
    if stage == 0:
        return {}
    if stage == 3:
        return {
            "params": [p.ds_tensor for p in engine.module.parameters()],
            "fp32_master": list(opt.fp32_partitioned_groups_flat),
            "grads": [opt.grad_partitions_flat_buffer] if hasattr(opt, "grad_partitions_flat_buffer") else [],
        }
    grads = [g for gs in opt.averaged_gradients.values() if gs for g in gs if g is not None]
    return {"fp32_master": list(opt.single_partition_of_fp32_groups), "grads": grads}


def _apply_deepspeed(z: Zero, facts: dict, model: torch.nn.Module, ctx: Context) -> Patch:
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    dtype = facts["dtype"]
    cls, kw = _optimizer_spec(ctx, list(model.parameters()))
    config = _ds_config(z, ctx, cls, kw, dtype)
    _forget_destroyed_groups()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    info = {"deepspeed_config": config, **_ds_estimate(z, facts)}

    def tracker(model, optimizer):  # MemTracker takes torch optimizers only: track DeepSpeed's inner one
        mt = MemTracker()
        mt.track_external(engine.module, getattr(engine.optimizer, "optimizer", engine.optimizer))
        return mt

    return Patch(
        model=engine,
        measure_memory=measure.with_tracker(tracker, MT_CATEGORIES),
        optimizer_factory=lambda m: engine.optimizer,
        backward=engine.backward,
        optimizer_step=engine.step,
        extra_state=lambda: _ds_state(engine, z.stage),
        info=info,
    )


def _forget_destroyed_groups() -> None:
    """DeepSpeed caches a clone of the world group (deepspeed.utils.groups._WORLD_GROUP) on its first engine and
    drops it only through deepspeed.comm.destroy_process_group. When the harness tears torch's group down with
    torch.distributed.destroy_process_group and starts a new one in the same process (two runs in one pytest
    process), the cached clone belongs to the destroyed group and the next engine fails in _broadcast_model with
    "Group ... is not registered". Release DeepSpeed's references when its cached group is no longer registered."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    cached = groups._WORLD_GROUP
    if cached is None:
        return
    try:
        dist.get_global_rank(cached, 0)
    except ValueError:  # "Group ... is not registered": its process group was destroyed
        groups._release_process_group_references(group=None)


def _ds_estimate(z: Zero, facts: dict) -> dict:
    """DeepSpeed's own estimator (per rank, 'gpu' = device bytes); it assumes 16-bit params and grads
    (2 + 2 + 12 + 2 bytes/param at stage 2), so it differs from the paper's formula and from fp32 runs."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    off = z.offload_optimizer == "cpu"
    if z.stage == 2:
        cpu, dev = estimate_zero2_model_states_mem_needs(
            facts["psi"], facts["n"], 1, cpu_offload=off, additional_buffer_factor=1
        )
    elif z.stage == 3:
        cpu, dev, _ = estimate_zero3_model_states_mem_needs(
            facts["psi"],
            facts["largest"],
            facts["n"],
            1,
            off,
            z.offload_params == "cpu",
            zero_init=False,
            additional_buffer_factor=1,
        )
    else:
        return {"deepspeed_estimator": None}
    return {"deepspeed_estimator": {"device_bytes": dev, "cpu_bytes": cpu, "assumes": "16-bit params and grads"}}
