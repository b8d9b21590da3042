"""ZeRO sharding: trades extra communication (1x-1.5x plain data parallelism) for holding only 1/N of the
optimizer state (stage 1), also of the gradients (2), also of the parameters (3) on each of N ranks.

Backends: `deepspeed` (deepspeed.initialize with a generated config, DeepSpeed's own defaults unless a knob says
otherwise; torch's AdamW via `torch_adam`, since DeepSpeed's CPU Adam is a minutes-long C++ build) and `torch`
(0: DDP, 1: DDP + ZeroRedundancyOptimizer, 2: FSDP2 fully_shard(reshard_after_forward=False), what PyTorch calls
SHARD_GRAD_OP, 3: FSDP2 fully_shard, FULL_SHARD). With bf16/fp16 in the run, FSDP2 runs as its users run it: a
MixedPrecisionPolicy (16-bit all-gathers and compute, fp32 gradient reduction), and the precision technique's
autocast steps aside (`REPLACES_AUTOCAST` in Patch.applied, read by techniques/precision.py); DDP and
ZeroRedundancyOptimizer keep autocast. Exact: fp32 losses match stage 0 up to float reassociation. Limits: torch
stage 2 is not ZeRO-2 (FSDP2 also shards parameters at rest and all-gathers them once per step);
ZeroRedundancyOptimizer shards whole parameters; offload needs a CUDA device.
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
from membench.simulate import AS_SIMULATED
from membench.techniques.base import STEP_PHASES, Context, Patch, Prediction, States, Technique
from membench.techniques.precision import REPLACES_AUTOCAST  # FSDP2's policy: autocast steps aside

BACKENDS = ("deepspeed", "torch")
OFFLOAD = ("none", "cpu")
STAGE3_KNOBS = ("deepspeed", "paper")
FSDP_PARAM_DTYPES = ("auto", "float32")
# DeepSpeedZeroConfig's default stage3_param_persistence_threshold (elements), for the pure prediction (importing
# DeepSpeed there would cost seconds per plan); tests/runs/test_states.py holds it to the installed package's default
DS_PERSISTENCE_THRESHOLD = 100_000
# DeepSpeedZeroConfig's default stage3_max_live_parameters (elements), the bound on stage 3's gathered parameters
# (`Zero.gathered_elements`); tests/unit/test_zero_deepspeed.py holds it to the installed package's default
DS_MAX_LIVE_PARAMETERS = 1_000_000_000
FSDP_REDUCE_DTYPES = ("float32", "bfloat16", "float16")
# Each stage as its library names it (docs/zero.md, `membench list`, the study's table).
LIBRARY_NAMES = {
    "torch": {
        0: "DDP",
        1: "DDP + ZeroRedundancyOptimizer",
        2: "FSDP2 fully_shard(reshard_after_forward=False) (SHARD_GRAD_OP)",
        3: "FSDP2 fully_shard(reshard_after_forward=True) (FULL_SHARD)",
    },
    # deepspeed.runtime.zero.config.ZeroStageEnum
    "deepspeed": {
        0: "DeepSpeed ZeRO stage 0 (disabled)",
        1: "DeepSpeed ZeRO-1 (optimizer_states)",
        2: "DeepSpeed ZeRO-2 (gradients)",
        3: "DeepSpeed ZeRO-3 (weights)",
    },
}
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
    family: ClassVar[str] = "zero"
    label_opts: ClassVar[tuple[str, ...]] = ("stage", "offload_optimizer", "offload_params")
    distributed: ClassVar[bool] = True
    stage: int = 2
    backend: str = "deepspeed"
    offload_optimizer: str = "none"
    offload_params: str = "none"
    reduce_bucket_size: int = 500_000_000  # DeepSpeed's default (DeepSpeedZeroConfig.reduce_bucket_size)
    allgather_bucket_size: int = 500_000_000  # DeepSpeed's default (DeepSpeedZeroConfig.allgather_bucket_size)
    torch_adam: bool = True  # deepspeed: torch's AdamW instead of DeepSpeed's compiled Fused/CPU Adam
    # deepspeed stage 3: deepspeed (its own defaults) | paper (shard and release every parameter)
    stage3_knobs: str = "deepspeed"
    # torch stages 2-3 with bf16/fp16: FSDP2 MixedPrecisionPolicy param_dtype (auto: the run's 16-bit dtype;
    # float32: no policy, autocast over fp32 all-gathers) and reduce_dtype (gradient reduce-scatter dtype)
    fsdp_param_dtype: str = "auto"
    fsdp_reduce_dtype: str = "float32"

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
        for key, allowed in (("fsdp_param_dtype", FSDP_PARAM_DTYPES), ("fsdp_reduce_dtype", FSDP_REDUCE_DTYPES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"technique.zero.{key}={getattr(self, key)!r}: allowed {', '.join(allowed)}")
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"technique.zero.{key}={getattr(self, key)}: must be > 0")

    @property
    def not_simulated(self) -> str:  # type: ignore[override]  (per instance: it depends on the backend and stage)
        """Why fake tensors cannot run this config ("": they can). FSDP2 (torch stages 2-3) runs on fake tensors over
        torch's fake process group (membench.simulate.fake_process_group), as torchtitan estimates its memory."""
        if self.backend == "deepspeed":
            return "DeepSpeed engines do not run on fake tensors or a fake process group"
        if self.stage < 2:
            return "DDP's reducer and ZeroRedundancyOptimizer do not run on fake tensors here"
        if self.offload_params != "none":
            return "FSDP2's CPUOffloadPolicy needs a CUDA device"
        return ""

    def hybrid_stand_in(self) -> Technique | None:
        """What runs in its place when the simulation leaves it out (its model states then come from `states`):
        FSDP2's MixedPrecisionPolicy acting on the step, so the activations are those of the policy (16-bit
        parameters in compute, no autocast: 16-bit residual stream and norms), not autocast's; DeepSpeed's bf16/fp16
        mode, which casts the parameters (not the buffers) to 16 bits at engine init (engine.py
        `_configure_distributed_model`), the run's autocast kept. None where nothing applies (DDP,
        ZeroRedundancyOptimizer keep the precision technique's own handling)."""
        if self.backend == "deepspeed":  # one stand-in for every DeepSpeed config: their candidates share a simulation
            return _DeepSpeedCastStandIn()
        if self.backend == "torch" and self.stage >= 2 and self.fsdp_param_dtype == "auto":
            return _PolicyStandIn(self)
        return None

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

    def fsdp_param_dtype_for(self, autocast: torch.dtype | None) -> torch.dtype | None:
        """The MixedPrecisionPolicy param_dtype this run uses (torch stages 2-3 with a 16-bit precision technique in
        force, as torchtitan and torchtune run FSDP2), or None: no policy (DDP, ZeroRedundancyOptimizer and DeepSpeed
        keep their own precision handling; fsdp_param_dtype=float32 keeps autocast over fp32 all-gathers)."""
        half = autocast in (torch.bfloat16, torch.float16)
        if self.backend == "torch" and self.stage >= 2 and self.fsdp_param_dtype == "auto" and half:
            return autocast
        return None

    def library_name(self) -> str:
        return LIBRARY_NAMES[self.backend][self.stage]

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
            "param_dtype": next(model.parameters()).dtype,  # as stored (bf16_pure casts the model before this)
        }
        patch = (_apply_deepspeed(self, facts, model, ctx) if self.backend == "deepspeed"
                 else _apply_torch(self, facts, model, ctx))  # fmt: skip
        patch.info.update(psi=facts["psi"], world_size=facts["n"], stage=self.stage, backend=self.backend,
                          library_name=self.library_name())  # fmt: skip
        patch.applied = {**facts, REPLACES_AUTOCAST: self.fsdp_param_dtype_for(dtype) is not None}
        return patch

    # ---- predict (per rank) ------------------------------------------------------------------------------
    def bucket_bytes(self, psi: int, elem_bytes: float) -> float:
        """DeepSpeed stages 1-3 reduce gradients through a contiguous bucket (contiguous_gradients, its default) of
        reduce_bucket_size elements in the gradient dtype, allocated whole however small the model: stages 1-2 in
        each step (deepspeed/runtime/zero/stage_1_and_2.py `setup_buckets`, one buffer, two with overlap_comm),
        stage 3 at engine init (stage3.py, one per communication dtype). Measured: 1907.3 MiB = 5e8 x 4 bytes on
        gpt_small (docs/zero.md)."""
        if self.backend != "deepspeed" or self.stage == 0:
            return 0.0
        return float(self.reduce_bucket_size * elem_bytes)

    def _deepspeed_lifetimes(self, s: States) -> None:
        """When DeepSpeed holds what it allocates (deepspeed 0.19.8), for the hybrid prediction's phases
        (States.live; the simulated step splits backward at the first parameter gradient):
        - stages 1-2: the reduce bucket is allocated in the first gradient hook of each backward
          (stage_1_and_2.py: `process_gradients` -> `setup_buckets`, `torch.empty(reduce_bucket_size)`) and dropped
          by the backward epilogue (`independent_gradient_partition_epilogue` -> `_release_ipg_buffers`): it is
          live in "backward" only, not while the loss and the head's backward still hold the logits;
        - stage 2: the gradients sit in the bucket (`reduce_independent_p_g_buckets_and_remove_grads` copies each
          one in and points the parameter's grad at it) until a bucket is reduced; the first reduction allocates
          this rank's gradient partition whole (`copy_grads_in_partition`, `torch.empty(total_size)`), held
          through the optimizer step (`averaged_gradients`). With every gradient in one bucket the first reduction
          is the epilogue's, after backward: "optimizer" only; with more, it comes mid-backward: "backward" too;
        - stage 1: the hook only sets the bucket up (`process_gradients`: no reduction before the epilogue without
          overlap_comm), so the gradients build up as the simulated ones do;
        - stages 1-2, the optimizer step (stage_1_and_2.py `step`), priced at its inner optimizer's step: the rank's
          gradients flattened and converted to fp32 (`single_grad_partition`, 4 Psi/N, also in fp32 training, where
          `flatten` copies them), the 16-bit/fp32 gradients freed before the inner step (`free_grad_in_param_list`,
          `averaged_gradients[i] = None`): no "grads" in "optimizer"; the inner optimizer's temporaries over that one
          flat partition (`optimizer_temps`) instead of the simulated optimizer's, which stepped every tensor;
        - stage 3: the bucket (stage3.py `_setup_for_real_optimizer`, `bucket.buffer = torch.empty(...)`) and the
          flat gradient partition (`grad_partitions_flat_buffer = torch.zeros(sum(partition_numel))`) are
          allocated at init and held through every phase; the gathered parameters (`gathered_elements`) from the
          first fetch of forward into backward: "forward", "backward_start" and, whole (an upper bound: each
          module's are released after its own backward), "backward"; none in the optimizer step."""
        if self.stage in (1, 2) and "deepspeed_reduce_bucket" in s.other:
            s.live["deepspeed_reduce_bucket"] = ("backward",)
        if self.stage == 1:  # built up as simulated; the step frees them before the inner optimizer runs
            s.live["grads"] = (AS_SIMULATED, "forward", "backward_start", "backward")
        if self.stage == 2:  # the partition is freed before the inner optimizer runs too (below)
            one_bucket = self.reduce_bucket_size >= sum(s.trainable)
            s.live["grads"] = () if one_bucket else ("backward",)
        for name in ("deepspeed_fp32_grad_partition", "deepspeed_optimizer_temps"):
            if name in s.other:
                s.live[name] = ("optimizer",)
        if "deepspeed_optimizer_temps" in s.other:  # the simulated AdamW's, per tensor of the whole model: not these
            s.live["optimizer_temp"] = ()
        if self.stage == 3:
            s.live["grads"] = STEP_PHASES
        if "deepspeed_gathered_params" in s.other:
            s.live["deepspeed_gathered_params"] = ("forward", "backward_start", "backward")

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
        gathered = self.gathered_elements(s)
        if gathered:  # in the parameters' dtype (16-bit in DeepSpeed's bf16/fp16 modes)
            s.other["deepspeed_gathered_params"] = float(gathered * s.param_rate)
        if self.backend == "deepspeed" and self.stage >= 1:
            if s.autocast is None:  # fp32 training: DeepSpeed still clones an fp32 master partition of the
                # parameters for its optimizer (stage_1_and_2.py `single_partition_of_fp32_groups`, stage3.py
                # `fp32_partitioned_groups_flat`), a copy the 4+4+8 rule does not have (in 16-bit modes it is in K=12)
                s.other["fp32_master"] = 4.0 * sum(s.trainable) / n
            if self.stage in (1, 2) and self.offload_optimizer == "none":
                s.other["deepspeed_fp32_grad_partition"] = 4.0 * sum(s.trainable) / n
                temps = self.optimizer_temps(s)
                if temps:
                    s.other["deepspeed_optimizer_temps"] = temps
            self._deepspeed_lifetimes(s)
        persistent = self.persistent_elements(s) * s.param_rate

        def shard(device: dict, host: dict) -> None:
            if self.stage >= 1:
                device["optimizer"] /= n
            if self.stage >= 2:
                device["grads"] /= n
            if self.stage >= 3:
                device["params"] = (device["params"] - buffers) / n + buffers + persistent
            if self.offload_optimizer == "cpu":
                host["optimizer"], device["optimizer"] = device["optimizer"], 0.0
            if self.offload_params == "cpu":
                host["params"], device["params"] = device["params"] - buffers, float(buffers)

        s.post.append(shard)
        gathered = self.fsdp_unsharded_elements(s)
        if gathered:  # FSDP2's all-gathered parameters, in the policy's param_dtype (else as stored)
            policy = self.fsdp_param_dtype_for(s.autocast)
            rate = torch.empty((), dtype=policy).element_size() if policy is not None else s.param_rate
            s.other["fsdp_unsharded_params"] = float(gathered * rate)
            if policy is not None:
                s.rule.append(f"FSDP2 MixedPrecisionPolicy(param_dtype={_name(policy)}, "
                              f"reduce_dtype={self.fsdp_reduce_dtype})")  # fmt: skip
        s.rule.append(f"ZeRO stage {self.stage} over N={n}"
                      + ("; DeepSpeed's fp32 master partition is recorded as fp32_master" if self.backend == "deepspeed"
                         else ""))  # fmt: skip

    def optimizer_temps(self, s: States) -> float:
        """The temporaries of DeepSpeed's inner optimizer (torch's AdamW, `torch_adam`) stepping the rank's one flat
        fp32 partition (Psi/N elements) at stages 1-2: torch's single-tensor AdamW (the CPU default) holds
        `exp_avg_sq.sqrt()` and its quotient by the bias correction at once (torch/optim/adam.py
        `_single_tensor_adam`: two fp32 partitions); the foreach one (CUDA's default) one, `_foreach_sqrt`'s, divided
        in place (not measured here). 0 where DeepSpeed's own Adam steps (its temporaries are not priced)."""
        if not self.torch_adam:
            return 0.0
        return (1 if s.device_type == "cuda" else 2) * 4.0 * sum(s.trainable) / s.world_size

    def persistent_elements(self, s: States) -> int:
        """DeepSpeed stage 3 with its default knobs keeps every parameter of at most
        stage3_param_persistence_threshold elements whole on every rank, next to its partition (measured: the
        rank holds both), so these add their full size to the Psi/N share."""
        if self.backend != "deepspeed" or self.stage != 3 or self.stage3_knobs != "deepspeed":
            return 0
        return sum(p.numel() for p in s.model.parameters() if p.numel() <= DS_PERSISTENCE_THRESHOLD)

    def gathered_elements(self, s: States) -> int:
        """DeepSpeed stage 3's all-gathered parameters held from forward into backward (0.19.8,
        partitioned_param_coordinator.py). The first step records the trace of fetched modules, forward and backward
        (`record_module`); from the second, each fetch also prefetches the trace's next parameters, up to
        min(stage3_max_live_parameters - those available, stage3_prefetch_bucket_size) elements, and marks each popped
        parameter with its latest use among the popped entries (`__most_recent_step_id_param_fetched_for`), which
        for a parameter whose backward use was popped too lies in backward; `__params_to_release` keeps such a
        parameter gathered after its module's forward (and any reused within stage3_max_reuse_distance), so it
        stays until its module's backward. Bound: the partitioned elements (those over the persistence threshold:
        the others are whole on every rank already, `persistent_elements`), at most stage3_max_live_parameters
        (`paper`: the all-gather bucket; `deepspeed`: its default 1e9). Where the partitioned elements fit the
        prefetch bucket, the first prefetch takes the whole trace and every partitioned parameter is held (measured,
        docs/plan.md)."""
        if self.backend != "deepspeed" or self.stage != 3:  # offloaded or not, they are gathered on the device
            return 0
        paper = self.stage3_knobs == "paper"
        threshold, live = (
            (0, self.allgather_bucket_size) if paper else (DS_PERSISTENCE_THRESHOLD, DS_MAX_LIVE_PARAMETERS)
        )
        partitioned = sum(p.numel() for p in s.model.parameters() if p.numel() > threshold)
        return min(partitioned, live)

    def fsdp_unsharded_elements(self, s: States) -> int:
        """Parameters FSDP2 holds all-gathered at the peak (torch backend): every one at stage 2 (gathered before
        forward, kept through backward); at stage 3 the root's own (FSDP2 keeps the root unsharded between forward
        and backward) plus the largest block (one block gathered at a time; prefetching may add a second)."""
        if self.backend != "torch" or self.stage < 2 or self.offload_params != "none":
            return 0
        if self.stage == 2:
            return s.psi
        sizes = [sum(p.numel() for p in b.parameters()) for b in s.blocks]
        return s.psi - sum(sizes) + max(sizes, default=0)

    def activation_terms(self, pred: Prediction) -> None:
        """Under FSDP2's MixedPrecisionPolicy the blocks run with 16-bit parameters and no autocast: every saved
        activation is 16-bit (residual stream and norms included) and there are no autocast weight copies."""
        if self.fsdp_param_dtype_for(pred.autocast_dtype) is not None:
            pred.autocast_dtype = None

    def expected_comm(self, facts: dict) -> dict:
        """ZeRO paper sec. 7: 2 Psi elements per rank per step for DP and stages 1-2, 3 Psi for stage 3.
        `facts`: what apply learned (Patch.applied)."""
        factor = 3 if self.stage == 3 else 2
        return {"paper_elements": factor * facts["psi"], "factor_of_psi": factor, "psi": facts["psi"]}


@dataclass(frozen=True)
class _PolicyStandIn(Technique):
    """Zero on fake tensors where the simulation leaves it out (hybrid): the parameters cast to the policy's
    param_dtype, as FSDP2's MixedPrecisionPolicy casts them for compute (buffers stay as stored, as FSDP2 leaves
    them), and autocast stepping aside (REPLACES_AUTOCAST); no sharding (the states are replaced by Zero.states)."""

    zero: Zero
    order: ClassVar[float] = 10

    def apply(self, model: torch.nn.Module, ctx: Context) -> Patch:
        dtype = next((a["autocast_dtype"] for a in ctx.applied.values() if "autocast_dtype" in a), torch.float32)
        policy = self.zero.fsdp_param_dtype_for(dtype)
        if policy is None:
            return Patch()
        _cast_params(model, policy)
        return Patch(applied={REPLACES_AUTOCAST: True})


@dataclass(frozen=True)
class _DeepSpeedCastStandIn(Technique):
    """DeepSpeed on fake tensors where the simulation leaves it out (hybrid): in its bf16/fp16 mode the engine casts
    the parameters, not the buffers, to 16 bits (engine.py `_configure_distributed_model`) and the run keeps its
    autocast; fp32: nothing. No sharding, no buffers (the states and named buffers come from Zero.states)."""

    order: ClassVar[float] = 10

    def apply(self, model: torch.nn.Module, ctx: Context) -> Patch:
        dtype = next((a["autocast_dtype"] for a in ctx.applied.values() if "autocast_dtype" in a), torch.float32)
        if dtype in (torch.bfloat16, torch.float16):
            _cast_params(model, dtype)
        return Patch()


def _cast_params(model: torch.nn.Module, dtype: torch.dtype) -> None:
    with torch.no_grad():
        for p in model.parameters():  # `.data`, not Module.to(): fake parameters cannot be swapped
            if p.is_floating_point():
                p.data = p.data.to(dtype)


# ---- torch backend -----------------------------------------------------------------------------------------
def _optimizer_spec(ctx: Context, params) -> tuple[type, dict]:
    """The workload's optimizer class and its hyper-parameters, read off a throwaway instance."""
    probe = ctx.workload.make_optimizer(params)
    cls = type(probe)
    names = inspect.signature(cls).parameters
    return cls, {k: v for k, v in probe.defaults.items() if k in names}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _apply_torch(z: Zero, facts: dict, model: torch.nn.Module, ctx: Context) -> Patch:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    stored, autocast = _name(facts["param_dtype"]), facts["dtype"]
    half = autocast in (torch.bfloat16, torch.float16)
    # what ran, for the record: DDP reduces gradients in the parameters' dtype; autocast only changes compute
    info = {"mixed_precision": {"policy": "autocast" if half else "none", "param_dtype": stored,
                                "reduce_dtype": stored, "autocast_dtype": _name(autocast) if half else None}}  # fmt: skip
    if z.stage >= 2:
        offload = CPUOffloadPolicy() if z.offload_params == "cpu" else OffloadPolicy()
        param_dtype = z.fsdp_param_dtype_for(autocast)
        mp = MixedPrecisionPolicy()  # FSDP2's default: no casts
        if param_dtype is not None:
            mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=getattr(torch, z.fsdp_reduce_dtype))
            info["mixed_precision"] = {"policy": "FSDP2 MixedPrecisionPolicy", "param_dtype": _name(param_dtype),
                                       "reduce_dtype": z.fsdp_reduce_dtype, "autocast_dtype": None}  # fmt: skip
        # reshard_after_forward: False keeps the gathered parameters through backward (SHARD_GRAD_OP), True frees
        # them after each block's forward and re-gathers them in backward (FULL_SHARD, FSDP2's default)
        reshard, mesh = z.stage == 3, _default_mesh()
        for block in ctx.workload.blocks():
            fully_shard(block, reshard_after_forward=reshard, offload_policy=offload, mp_policy=mp, mesh=mesh)
        fully_shard(model, reshard_after_forward=reshard, offload_policy=offload, mp_policy=mp, mesh=mesh)
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        trackers: list = []

        def tracker(model, optimizer):
            trackers.append(FSDPMemTracker(model, optimizer))
            return trackers[-1]

        return Patch(model=model, measure_memory=measure.with_tracker(tracker, FSDP_CATEGORIES), info=info,
                     before_eval=[lambda m: _most_gathered(trackers)])  # fmt: skip
    # gradient_as_bucket_view: grads live in DDP's buckets instead of a second full-size copy
    ddp = DDP(model, gradient_as_bucket_view=True)
    holder: dict = {}

    def bucket_grads():  # grads are views into DDP's persistent buckets, which MemTracker does not see
        live = {p.grad.untyped_storage().data_ptr(): p.grad for p in ddp.parameters() if p.grad is not None}
        holder["grads"] = list(live.values()) or holder.get("grads", [])  # one view per bucket storage
        return holder["grads"]

    if z.stage == 0:
        return Patch(model=ddp, extra_state=lambda: {"grads": bucket_grads()}, info=info)
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

    return Patch(model=ddp, optimizer_factory=factory, extra_state=local_state, info=info)


def _default_mesh():
    """fully_shard's default mesh (every rank, on the accelerator's device type, else CPU), built outside any
    FakeTensorMode: DeviceMesh reads its rank map with .tolist(), which a fake tensor cannot answer (the planner's
    simulation shards fake parameters over torch's fake process group)."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import init_device_mesh

    acc = torch.accelerator.current_accelerator()
    with unset_fake_temporarily():
        return init_device_mesh(acc.type if acc is not None else "cpu", (dist.get_world_size(),))


def _most_gathered(trackers: list) -> dict:
    """The most all-gathered (unsharded) parameter bytes FSDPMemTracker saw at once in the measured step, over every
    snapshot it took around each FSDP module's hooks: the split at the step's peak may fall where none are held
    (stage 3 at the end of forward), so the record keeps this too (the bytes show the gather dtype: 2 per element
    under a 16-bit MixedPrecisionPolicy, 4 without)."""
    if not trackers:
        return {}
    snaps = [s for st in trackers[-1].memory_tracking.values() for ss in st.snapshots.values() for s in ss]
    most = max((d.get("UNSHARDED_PARAM", 0) for s in snaps for d in measure.by_name(s).values()), default=0)
    return {"fsdp_unsharded_params_max_bytes": most}


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
    """Stage 3's cost lives in these knobs (docs/zero.md, "Stage 3 step time"). `deepspeed` (the default): none set,
    so DeepSpeed's own defaults apply (parameters up to 1e5 elements stay whole on every rank, gathered ones are kept
    for reuse, 5e7-element prefetch; the values in force are recorded from the engine). `paper`: every parameter
    sharded (persistence threshold 0) and released right after its module runs (reuse distance 0, at most one
    all-gather bucket of gathered parameters live), so per-rank bytes match the paper's Psi*(2+2+12)/N and backward
    re-gathers every parameter: one fetch/release hook pair per submodule per pass, even at N=1."""
    if z.stage3_knobs == "deepspeed":
        return {}
    return {
        "stage3_prefetch_bucket_size": z.allgather_bucket_size,
        "stage3_param_persistence_threshold": 0,
        "stage3_max_reuse_distance": 0,
        "stage3_max_live_parameters": z.allgather_bucket_size,
    }


# DeepSpeedZeroConfig fields recorded as the engine holds them (its defaults where the generated config is silent)
DS_RECORDED = ("reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "prefetch_bucket_size",
               "param_persistence_threshold", "max_live_parameters", "max_reuse_distance")  # fmt: skip


def _ds_state(engine, stage: int) -> dict[str, list[torch.Tensor]]:
    """The rank's own DeepSpeed shards, as named categories: its fp32 master partition is kept even in fp32
    training (a copy the paper's fp32 formula does not have); stage 3 params live in ds_tensor partitions. Stage 3's
    reduce bucket is allocated at engine init (stage3.py `_setup_for_real_optimizer`), before the tracker exists:
    named here so that the tracker counts it from the step's first op, as the device holds it, and not from the
    first gradient it sees as a view of it (stages 1-2 allocate theirs inside the step, where the tracker sees it)."""
    opt = engine.optimizer
    if stage == 0:
        return {}
    if stage == 3:
        buckets = [b.buffer for b in getattr(opt, "ipg_buckets", {}).values() if b.buffer is not None]
        return {
            "params": [p.ds_tensor for p in engine.module.parameters()],
            "fp32_master": list(opt.fp32_partitioned_groups_flat),
            "grads": [opt.grad_partitions_flat_buffer] if hasattr(opt, "grad_partitions_flat_buffer") else [],
            "deepspeed_reduce_bucket": buckets,
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
    info = {
        "deepspeed_config": config,
        "deepspeed_zero_in_force": {k: getattr(engine._config.zero_config, k) for k in DS_RECORDED},
        "mixed_precision": {
            "policy": f"DeepSpeed {_name(dtype)}" if dtype != torch.float32 else "none",
            "param_dtype": _name(dtype),  # DeepSpeed's bf16/fp16 modes hold 16-bit params (fp32 master partition)
            "reduce_dtype": _name(engine.communication_data_type),
            "autocast_dtype": None if dtype == torch.float32 else _name(dtype),
        },
        **_ds_estimate(z, facts),
    }

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
