"""Low-memory optimizers: smaller optimizer states than AdamW's 8 bytes per parameter, at the price of a different
update rule (approximate: the loss curve is not AdamW's).

  adafactor  torch.optim.Adafactor: no first moment; a row and a column factor of the second moment for >= 2-D
             tensors, a full one for 1-D; one fp32 step tensor each.
  adam_mini  adam-mini's Adam_mini: m full, one v per attention head (query/key), per output row (embedding,
             value, output projection, MLP) or per tensor (the rest); biases keep full Adam. It picks the partition
             by parameter name: the membench workloads' layer names are added to its name sets.
  galore     galore-torch's GaLoreAdamW on the 2-D tensors of the workload's blocks: m and v of the gradient
             projected to `rank`, plus the projection (a view of the SVD factor: its storage is the whole U or Vh,
             min(rows, cols)^2 elements, as galore-torch keeps it).
  apollo     apollo-torch's APOLLOAdamW on the same tensors: m, v of a random projection to `rank`, the (rank x n or
             m x rank) Gaussian projection, and a scalar norm for its limiter.
States the libraries keep outside optimizer.state tensors (the projections inside projector objects) are handed to
the harness as optimizer extra state. Fake tensors (the planner's simulation builds Patch.optimizer_factory's
optimizer): adam_mini and galore (its SVD too) step on them in full. torch's Adafactor reads parameter and update
norms on the host (`.item()`) and apollo its norm-growth limiter from the second step on; both allocate their whole
state before the first such read (Adafactor's _init_group; apollo's first step, once its projection seed, drawn
with a host generator, is computed outside fake mode), so on fake tensors their step stops at that read
(`SimOptimizerLowmem`): the state is the library's own, to the byte; the update's temporaries are not simulated.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from membench.errors import ConfigError
from membench.techniques.base import Context, Patch, States, Technique

ALGOS = ("adafactor", "adam_mini", "galore", "apollo")
SCALE_TYPES = ("channel", "tensor")
# Adam-mini reads roles from parameter names; these are the membench workloads' (gpt, llama) layer names.
ADAM_MINI_NAMES = {
    "wqk_names": {".q.", ".k."},
    "wv_names": {".v."},
    "attn_proj_names": {".o.", ".proj."},
    "mlp_names": {".fc.", ".fc_out.", ".gate.", ".up.", ".down."},
    "embd_names": {"tok.", "pos."},
    "output_names": {"head."},
}


@dataclass(frozen=True)
class OptimizerLowmem(Technique):
    kind: ClassVar[str] = "optimizer_lowmem"
    order: ClassVar[float] = 9.2  # an optimizer replacement, built over the final parameter set (as optimizer_8bit)
    loss_rtol: ClassVar[float] = 0.1
    family: ClassVar[str] = "optimizer_lowmem"
    label_opts: ClassVar[tuple[str, ...]] = ("algo",)
    incompatible: ClassVar[dict[str, str]] = {
        "optimizer_8bit": "both replace the optimizer",
        "optimizer_in_backward": "both replace the optimizer (per-parameter low-memory optimizers are not built)",
        "zero": "zero builds its own (sharded) optimizer",
    }
    algo: str = "adafactor"
    rank: int = 16  # galore/apollo: projected rank (smaller: smaller m, v)
    update_proj_gap: int = 200  # galore/apollo: steps between new projections
    scale: float = 0.25  # galore/apollo: scale of the projected-back update
    scale_type: str = "channel"  # apollo: channel | tensor (with rank=1: APOLLO-Mini)

    def __post_init__(self) -> None:
        key = "technique.optimizer_lowmem"
        if self.algo not in ALGOS:
            raise ConfigError(f"{key}.algo={self.algo!r}: allowed {', '.join(ALGOS)}")
        if self.rank < 1 or self.update_proj_gap < 1:
            raise ConfigError(f"{key}.rank={self.rank}, update_proj_gap={self.update_proj_gap}: must be >= 1")
        if self.scale_type not in SCALE_TYPES:
            raise ConfigError(f"{key}.scale_type={self.scale_type!r}: allowed {', '.join(SCALE_TYPES)}")

    # ---- the optimizer ---------------------------------------------------------------------------------------
    def build(self, model: torch.nn.Module, blocks, c) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        if self.algo == "adafactor":
            return torch.optim.Adafactor(params, lr=c.lr, weight_decay=c.weight_decay)
        if self.algo == "adam_mini":
            from adam_mini import Adam_mini

            d, heads = getattr(c, "d_model", 2048), getattr(c, "n_head", 32)
            opt = Adam_mini(model.named_parameters(), lr=c.lr, weight_decay=c.weight_decay, dim=d, n_heads=heads,
                            n_kv_heads=getattr(c, "n_kv_head", None), verbose=False)  # fmt: skip
            for attr, names in ADAM_MINI_NAMES.items():
                getattr(opt, attr).update(names)
            return opt
        low = projected(params, blocks)
        rest = [p for p in params if not any(p is q for q in low)]
        group = {"params": low, "rank": self.rank, "update_proj_gap": self.update_proj_gap, "scale": self.scale,
                 "proj_type": "std"}  # fmt: skip
        if self.algo == "galore":
            from galore_torch import GaLoreAdamW

            return GaLoreAdamW([{"params": rest}, group], lr=c.lr, weight_decay=c.weight_decay,
                               no_deprecation_warning=True)  # fmt: skip
        from apollo_torch import APOLLOAdamW

        group.update(proj="random", scale_type=self.scale_type)
        return APOLLOAdamW([{"params": rest}, group], lr=c.lr, weight_decay=c.weight_decay)

    def apply(self, model, ctx: Context) -> Patch:
        built: list[torch.optim.Optimizer] = []

        def factory(m: torch.nn.Module) -> torch.optim.Optimizer:
            built.append(self.build(m, ctx.workload.blocks(), ctx.workload.c))
            return built[0]

        def extra_state() -> dict[str, list[torch.Tensor]]:  # the projections live in projector objects
            projs = [s["projector"].ortho_matrix for o in built for s in o.state.values() if "projector" in s]
            return {"optimizer": [t for t in projs if t is not None]}

        return Patch(optimizer_factory=factory, extra_state=extra_state, info={"optimizer": self.algo})

    def simulated(self) -> Technique | None:
        return SimOptimizerLowmem(algo=self.algo, rank=self.rank, update_proj_gap=self.update_proj_gap,
                                  scale=self.scale, scale_type=self.scale_type)  # fmt: skip

    # ---- the prediction ----------------------------------------------------------------------------------------
    def state_bytes(self, name: str, shape: tuple[int, ...], e: int, low: bool, c) -> int:
        """Optimizer-state bytes of one trainable tensor (elements of `e` bytes) under this algorithm."""
        n = int(torch.Size(shape).numel())
        if self.algo == "adafactor":
            factors = n // shape[-1] + n // shape[-2] if len(shape) >= 2 else n
            return 4 + factors * e  # fp32 step + row/col factors (or the full variance)
        if self.algo == "adam_mini":
            return n * e + _adam_mini_v(name.lower(), shape, n, c) * e
        if not low:
            return 2 * n * e  # plain Adam m, v; the step is a Python int
        m, k = shape
        if self.algo == "galore":
            r = min(self.rank, m, k)
            proj = min(m, k) ** 2 * e if e == 4 else r * (k if m >= k else m) * e  # fp32: the SVD factor's storage
            return 2 * r * (m if m >= k else k) * e + proj
        return 2 * self.rank * (m if m >= k else k) * e + self.rank * (k if m >= k else m) * e + e  # + norm scalar

    def total_bytes(self, model: torch.nn.Module, blocks, c, e: int) -> int:
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        low = {id(q) for q in projected([p for _, p in params], blocks)} if self.algo in ("galore", "apollo") else set()
        return sum(self.state_bytes(n, tuple(p.shape), e, id(p) in low, c) for n, p in params)

    def states(self, s: States) -> None:
        s.optimizer = self.total_bytes(s.model, s.blocks, _Dims.of(s.model), int(s.param_rate))
        s.rule.append(f"{self.algo} states")

    @classmethod
    def plan_values(cls, world_size: int, device_type: str) -> list[dict]:
        return [{"algo": a} for a in ALGOS]

    def time_prior(self) -> float:
        return {"adafactor": 1.05, "adam_mini": 1.02, "galore": 1.15, "apollo": 1.05}[self.algo]


def projected(params: list[torch.Tensor], blocks) -> list[torch.Tensor]:
    """The tensors GaLore/APOLLO project: the 2-D ones of the workload's blocks (attention and MLP matrices)."""
    inside = {id(p) for b in blocks for p in b.parameters()}
    return [p for p in params if p.dim() == 2 and id(p) in inside]


def _adam_mini_v(name: str, shape: tuple[int, ...], n: int, c) -> int:
    """Elements of Adam-mini's second moment for one tensor, by its name partition (adam_mini 1.1.1's step)."""

    def has(attr: str, default: set[str]) -> bool:  # the library's own names, then those added in build()
        return any(k in name for k in default | ADAM_MINI_NAMES[attr])

    if "bias" in name:
        return n
    if has("wqk_names", {"k_proj", "q_proj", "wq", "wk", "query", "key"}):
        return n // (c.d_model * c.d_model // c.n_head)
    if (has("embd_names", {"embed", "embd", "wte"}) or has("output_names", {"lm_head", "output", "final_layer"})
            or has("wv_names", {"v_proj", "wv", "value"}) or has("mlp_names", {"feed_forward", "linear", "mlp"})
            or has("attn_proj_names", {"o_proj", "wo", "attn.proj"})):  # fmt: skip
        return shape[0]
    return 1


@dataclass
class _Dims:
    """Adam-mini's head size from a model without a config at hand: read from its attention modules."""

    d_model: int
    n_head: int

    @classmethod
    def of(cls, model):
        attn = next((m for m in model.modules() if hasattr(m, "n_head") and hasattr(m, "q")), None)
        if attn is None:  # not a transformer: Adam-mini's defaults
            return cls(2048, 32)
        return cls(attn.q.in_features, attn.n_head)


# ---- fake tensors (the planner's simulation) -------------------------------------------------------------------
HOST_READS = ("adafactor", "apollo")  # their update reads tensor values on the host


@dataclass(frozen=True)
class SimOptimizerLowmem(OptimizerLowmem):
    """What `optimizer_lowmem` runs as on fake tensors (not registered: no `kind` of its own): the same library
    optimizer; for adafactor and apollo, stepped by `StopAtHostRead`."""

    def apply(self, model, ctx: Context) -> Patch:
        patch = super().apply(model, ctx)
        if self.algo in HOST_READS:
            build = patch.optimizer_factory
            patch.optimizer_factory = lambda m: StopAtHostRead(build(m), apollo_seed=self.algo == "apollo")
        return patch

    def simulated(self) -> Technique | None:
        return self


class StopAtHostRead(torch.optim.Optimizer):
    """Facade over a library optimizer on fake tensors: step() runs the library's step until it reads a tensor's
    value on the host (DataDependentOutputException), by which point it has allocated its state; `param_groups` and
    `state` are the library optimizer's (the harness counts its state bytes; MemTracker's global step hooks see the
    facade's step whole). `apollo_seed`: apollo draws each new projection's seed with torch.randint on a host
    generator and reads it back (.tolist()); that draw runs outside fake mode, as on real tensors."""

    def __init__(self, inner: torch.optim.Optimizer, apollo_seed: bool = False):
        super().__init__([p for g in inner.param_groups for p in g["params"]], {})
        self.inner, self.apollo_seed = inner, apollo_seed
        self.param_groups, self.state = inner.param_groups, inner.state

    @torch.no_grad()
    def step(self, closure=None):
        from torch._subclasses.fake_tensor import DataDependentOutputException

        with self._real_seed() if self.apollo_seed else contextlib.nullcontext():
            try:
                self.inner.step()
            except DataDependentOutputException:
                pass  # the update needs values fake tensors do not have; the state exists by now
        return None

    @staticmethod
    @contextlib.contextmanager
    def _real_seed():
        from unittest import mock

        from apollo_torch import random_projector
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        draw = random_projector.next_seed

        def next_seed(*args, **kwargs):
            with unset_fake_temporarily():
                return draw(*args, **kwargs)

        with mock.patch.object(random_projector, "next_seed", next_seed):
            yield
