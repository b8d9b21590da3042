"""8-bit (or torchao 4-bit) AdamW states: exp_avg and exp_avg_sq stored as block-quantized codes plus one fp32
scale per block, trading update precision for ~1/4 (1/8) of the 8 bytes per parameter of fp32 AdamW.

Backends: bitsandbytes AdamW8bit (PagedAdamW8bit on CUDA; on CPU bitsandbytes has no paged memory, so
paged=auto picks the unpaged one) and torchao AdamW8bit/AdamW4bit. Limits: tensors under 4096 elements keep
fp32 states (both libraries), and so do torchao tensors whose size is not a multiple of its block.
Paged states (bitsandbytes on CUDA): the codes of tensors of >= 1e5 elements live in CUDA unified (managed) memory,
which torch sees as CPU tensors (bitsandbytes wraps the managed pointer with torch.frombuffer); the driver moves
their pages to the GPU when the step touches them and back under memory pressure, outside torch's allocator. They
are counted where torch and MemTracker see them, in the host column (the prediction puts them there too); their
GPU residency shows only in NVML's device-wide figure. Block scales, code tables and smaller tensors stay on device.
torchao compiles its step (tens of seconds on the first one, reported as first_compiled_step_s); torch.compile
cannot run under a dispatch mode, so the memory and FLOP steps run torchao's step eagerly (peak: upper bound).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from membench.errors import ConfigError
from membench.techniques.base import Context, Patch, States, Technique

BACKENDS = ("bitsandbytes", "torchao")
PAGED = ("auto", "on", "off")
TORCHAO_BLOCK = {8: 256, 4: 128}
TORCHAO_QMAP = {8: 256, 4: 16}
BNB_BLOCK, BNB_QMAP = 256, 256
BNB_PAGED_MIN = 100_000  # bitsandbytes pages a state buffer only for tensors of at least 1e5 elements


@dataclass(frozen=True)
class Optimizer8bit(Technique):
    kind: ClassVar[str] = "optimizer_8bit"
    # Optimizer replacements are built over the final parameter set: after pruning, casts, quantized bases and
    # wrappers of blocks; before ZeRO, which wraps the finished model and optimizer.
    order: ClassVar[float] = 9
    loss_rtol: ClassVar[float] = 0.05
    family: ClassVar[str] = "optimizer_8bit"
    not_simulated: ClassVar[str] = "bitsandbytes/torchao kernels have no fake-tensor implementation"
    backend: str = "bitsandbytes"
    bits: int = 8
    paged: str = "auto"
    min_8bit_size: int = 4096

    def __post_init__(self) -> None:
        key = "technique.optimizer_8bit"
        if self.backend not in BACKENDS:
            raise ConfigError(f"{key}.backend={self.backend!r}: allowed {', '.join(BACKENDS)}")
        if self.bits not in (8, 4) or (self.bits == 4 and self.backend != "torchao"):
            raise ConfigError(f"{key}.bits={self.bits}: allowed 8 (both backends) or 4 (backend=torchao)")
        if self.paged not in PAGED:
            raise ConfigError(f"{key}.paged={self.paged!r}: allowed {', '.join(PAGED)}")
        if self.paged == "on" and self.backend != "bitsandbytes":
            raise ConfigError(f"{key}.paged=on: paged optimizers exist in bitsandbytes only")
        if self.backend == "torchao" and self.min_8bit_size != 4096:
            raise ConfigError(f"{key}.min_8bit_size={self.min_8bit_size}: torchao fixes it at 4096")

    def check(self, kinds: set[str], device_type: str) -> None:
        if self.paged == "on" and device_type != "cuda":
            raise ConfigError(f"technique.optimizer_8bit.paged=on: needs cuda (run.device is {device_type})")

    def apply(self, model, ctx: Context) -> Patch:
        c = ctx.workload.c
        facts: dict = {}
        paged = self.is_paged(ctx.device.type)

        def factory(m: torch.nn.Module) -> torch.optim.Optimizer:
            params = [p for p in m.parameters() if p.requires_grad]
            if self.backend == "bitsandbytes":
                import bitsandbytes as bnb

                cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
                return cls(params, lr=c.lr, weight_decay=c.weight_decay, min_8bit_size=self.min_8bit_size)
            import torchao.optim

            cls = torchao.optim.AdamW8bit if self.bits == 8 else torchao.optim.AdamW4bit
            opt = cls(params, lr=c.lr, weight_decay=c.weight_decay)
            opt.step = functools.partial(_step, opt.step, facts)
            return opt

        info = {"optimizer": f"{self.backend} AdamW{self.bits}bit", "paged": paged}
        return Patch(optimizer_factory=factory, info=info, before_eval=[lambda m: facts])

    def is_paged(self, device_type: str) -> bool:
        return self.paged == "on" or (self.paged == "auto" and device_type == "cuda" and self.backend != "torchao")

    def time_prior(self) -> float:
        return 1.05

    def state_bytes(self, n: int, elem_bytes: float = 4) -> int:
        """Predicted optimizer-state bytes of one parameter of `n` elements (layout of the chosen library)."""
        if self.backend == "bitsandbytes":
            return 2 * (n + 4 * math.ceil(n / BNB_BLOCK)) if n >= self.min_8bit_size else 8 * n
        block = TORCHAO_BLOCK[self.bits]
        step = 4  # torchao keeps the step count as an fp32 scalar tensor per parameter
        if n >= 4096 and n % block == 0:
            codes = n if self.bits == 8 else n // 2
            return step + 2 * (codes + 4 * (n // block) + 4 * TORCHAO_QMAP[self.bits])
        return step + 2 * n * elem_bytes

    def total_bytes(self, numels: list[int], elem_bytes: float = 4) -> int:
        """Optimizer-state bytes over the trainable tensors of `numels` elements (only those carry state)."""
        total = sum(self.state_bytes(n, elem_bytes) for n in numels)
        if self.backend == "bitsandbytes" and any(n >= self.min_8bit_size for n in numels):
            total += 2 * BNB_QMAP * 4  # one signed and one unsigned code table, shared by all parameters
        return total

    def paged_bytes(self, numels: list[int], elem_bytes: float = 4) -> int:
        """State bytes bitsandbytes puts in managed memory: the buffers of tensors of >= 1e5 elements (two uint8
        code tensors each, or two fp32 moments for a tensor under min_8bit_size)."""
        return sum(2 * n * (1 if n >= self.min_8bit_size else 4) for n in numels if n >= BNB_PAGED_MIN)

    def states(self, s: States) -> None:
        s.optimizer = self.total_bytes(s.trainable, s.param_rate)  # after a quantized base: its adapters only
        s.rule.append(f"{self.bits}-bit {self.backend} states")
        if self.is_paged(s.device_type):

            def paged(device: dict, host: dict) -> None:  # managed memory: torch sees CPU tensors (module docstring)
                moved = self.paged_bytes(s.trainable)
                device["optimizer"] -= moved
                host["optimizer"] += moved

            s.post.append(paged)
            s.rule.append("paged codes in unified memory, counted on the host")


def _step(step, facts: dict, *args, **kwargs):
    """torchao's step under MemTracker/FlopCounterMode runs eagerly (torch.compile refuses dispatch modes);
    the first compiled step's time, compilation included, goes to the record."""
    if is_in_torch_dispatch_mode():
        facts["eager_steps_under_instrumentation"] = facts.get("eager_steps_under_instrumentation", 0) + 1
        with torch.compiler.set_stance("force_eager"):
            return step(*args, **kwargs)
    if "first_compiled_step_s" in facts:
        return step(*args, **kwargs)
    t0 = time.perf_counter()
    out = step(*args, **kwargs)
    facts["first_compiled_step_s"] = time.perf_counter() - t0
    return out
