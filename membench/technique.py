"""The technique contract, the registry every technique joins by being defined, and the generic composition.

A technique is a frozen config dataclass subclassing `Technique` with a non-empty `kind`; defining the class
registers it (torchao's `register_quantize_module_handler`, torchtitan's `register_model_converter`). Its class
says everything the harness needs: where it sits in the apply order, what it cannot combine with, how it runs on
fake tensors, its planner family and knob values, its time prior and quality class, the knobs that label it, and a
pure `states` step of the model-state prediction. The harness names no technique: it reads this registry, which
`discover()` fills from the `_target_` of every conf/technique/*.yaml on the config path.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml

from membench import confpath
from membench.errors import ConfigError

REGISTRY: dict[str, type[Technique]] = {}
UNAVAILABLE: dict[str, str] = {}  # technique YAML name -> why its module cannot load here (a missing optional package)


@dataclass
class Context:
    """What a technique may look at: the workload (blocks, head, presets), device, and the run knobs; a technique may
    replace the workload's `loss_fn` (workloads/base.py: the LM loss from hidden states and head). `applied` holds,
    per kind, what each technique's apply learned (its Patch.applied), for its record prediction."""

    workload: Any
    device: torch.device
    run: Any
    applied: dict[str, dict] = field(default_factory=dict)


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
    # What apply learned (sizes before wrapping, world size, layers it replaced): configs stay frozen, so this is
    # where it goes; apply_all files it under ctx.applied[kind] for the technique's record prediction.
    applied: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prediction:
    """Activation-model inputs the techniques adjust (see membench/predict.py). Model states are not priced here:
    they come from each technique's pure `states` step (States, model_states), for the record and the planner."""

    param_bytes: float = 4  # kept for callers that still pass the fp32 AdamW rates; no prediction reads them
    grad_bytes: float = 4
    optimizer_bytes: float = 8
    act_elem_bytes: int = 4  # bytes per activation element saved for backward
    checkpoint: tuple[str, int] | None = None  # (mode, every_k) when activation checkpointing is on
    autocast_dtype: torch.dtype | None = None
    act_extra_bytes: float = 0.0  # bytes a technique adds to what forward holds (e.g. pruning's masked weights)
    other: dict[str, float] = field(default_factory=dict)  # named device bytes outside the states (run-dependent)
    notes: list[str] = field(default_factory=list)
    # Fused linear-cross-entropy in force: tokens per chunk of logits (0: automatic); the workload's activation
    # model (its `loss_chunk_tokens` argument) then saves an fp32 logsumexp per token instead of the logits.
    loss_chunk_tokens: int | None = None
    # Activation offloading in force: on CUDA the saved activations live on the host (membench.predict.
    # place_activations splits the activation model's total between device and host).
    act_offload: bool = False


# The phases of a simulated step (membench.simulate): "backward_start" runs from the loss to the first parameter
# gradient, "backward" from there to the end of backward. States.live names them.
STEP_PHASES = ("forward", "backward_start", "backward", "optimizer")


@dataclass
class States:
    """Per-rank model-state description that each technique's pure `states` step transforms, in apply order.
    Built from the model before any technique touched it (fake or meta tensors do), so the planner can price any
    combination at any world size. Defaults: fp32 AdamW, 4 + 4 + 8 bytes per parameter (ZeRO paper sec. 3.1) plus
    torch's 4-byte fp32 `step` per trainable tensor."""

    model: torch.nn.Module
    blocks: Any
    world_size: int
    psi: int  # parameters of the model as built
    buffers: float  # buffer bytes (kept whole on every rank)
    float_buffers: tuple[int, float]  # (elements, bytes) of the floating-point buffers (bf16_pure casts them)
    dense: int  # parameters stored at `param_rate` bytes each
    trainable: list[int]  # element counts of the tensors that train (carry grads and optimizer state)
    param_rate: float = 4
    grad_rate: float = 4
    opt_rate: float = 8
    step_bytes: int = 4  # optimizer bytes per trainable tensor besides the per-element ones (torch AdamW's step)
    param_extra: float = 0.0  # parameter bytes in other formats (quantized layouts)
    optimizer: float | None = None  # absolute optimizer bytes where a per-element rate does not fit
    autocast: torch.dtype | None = None  # 16-bit autocast in force (set by the precision step)
    other: dict[str, float] = field(default_factory=dict)  # named device bytes outside the states (buffers...)
    # The simulated phases (membench.simulate.PHASES) in which a named buffer, or a state category the library
    # allocates whole, is held, where its library fixes that (absent: a buffer in every phase, a state category
    # as the simulated step holds it); the hybrid prediction reads it (simulate.replace_states).
    live: dict[str, tuple[str, ...]] = field(default_factory=dict)
    post: list[Callable[[dict, dict], None]] = field(default_factory=list)  # (device, host) -> None, in order
    rule: list[str] = field(default_factory=lambda: ["fp32 AdamW 4+4+8"])
    roles: dict[str, str] | None = None  # the workload's linear_roles() where the caller has them (lora's targets)
    device_type: str = ""  # the run's or planned device ("": unknown): for layouts that depend on it (paged states)
    # The workload (its batch and loss) where the caller has it: a step whose count needs a traced forward of the
    # model as built (prune_structured: torch-pruning's dependency graph) reads it; None: that step's fallback rule.
    workload: Any = None

    @classmethod
    def of(cls, model: torch.nn.Module, blocks, world_size: int, roles: dict[str, str] | None = None,
           device_type: str = "", workload: Any = None) -> States:  # fmt: skip
        params = list(model.parameters())
        psi = sum(p.numel() for p in params)
        floats = [b for b in model.buffers() if b.is_floating_point()]
        float_bytes = float(sum(b.numel() * b.element_size() for b in floats))
        return cls(model=model, blocks=blocks, world_size=world_size, psi=psi, dense=psi,
                   buffers=float(sum(b.numel() * b.element_size() for b in model.buffers())),
                   float_buffers=(sum(b.numel() for b in floats), float_bytes),
                   trainable=[p.numel() for p in params if p.requires_grad], roles=roles,
                   device_type=device_type, workload=workload)  # fmt: skip

    def fresh(self) -> States:
        """A copy whose lists and dicts are its own, so that the steps run on it leave this one as it is: the planner
        prices thousands of candidates from one States.of of the same model (walking an 8B model's parameters and
        buffers for each was a tenth of a llama_8b plan). The model, blocks and workload are shared, not copied."""
        out = copy.copy(self)
        for k, v in vars(self).items():
            if isinstance(v, (list, dict)):
                setattr(out, k, copy.copy(v))
        return out

    def totals(self) -> tuple[dict, dict]:
        n = sum(self.trainable)
        opt = (
            self.optimizer if self.optimizer is not None else n * self.opt_rate + self.step_bytes * len(self.trainable)
        )
        device = {
            "params": float(self.dense * self.param_rate + self.param_extra + self.buffers),
            "grads": float(n * self.grad_rate),
            "optimizer": float(opt),
        }
        host = dict.fromkeys(device, 0.0)
        for fn in self.post:
            fn(device, host)
        return device, host


class Technique:
    """Base of every technique config. Subclasses are frozen dataclasses; a non-empty `kind` registers one."""

    kind: ClassVar[str] = ""
    order: ClassVar[float] = 0  # position in the apply order; each module's comment says why it sits there
    exact: ClassVar[bool] = False  # exact techniques must leave the loss bit-identical to the baseline
    loss_rtol: ClassVar[float] = 0.0  # declared tolerance on the training loss for approximate ones
    incompatible: ClassVar[dict[str, str]] = {}  # kind -> why they cannot run together (declared by one side)
    not_simulated: ClassVar[str] = ""  # why fake tensors cannot run it ("": they can; see simulated())
    fake_build_dtype: ClassVar[torch.dtype | None] = None  # on fake tensors: the built model is cast to this dtype
    family: ClassVar[str] = ""  # planner family (members are alternatives); "": the planner leaves it out
    label_opts: ClassVar[tuple[str, ...]] = ()  # knobs that name it in plan labels and calibration keys
    hybrid_margin: ClassVar[float] = 0.0  # `fits` margin when a hybrid prediction leaves it out (unseen kernels)
    half_precision: ClassVar[bool] = False  # 16-bit compute: its speed depends on the device's 16-bit support
    distributed: ClassVar[bool] = False  # owns the process group: run.world_size > 1 needs one such technique

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if not kind:
            return
        old = REGISTRY.get(kind)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ConfigError(f"technique {kind}: registered twice ({old.__module__}.{old.__qualname__}, "
                              f"{cls.__module__}.{cls.__qualname__})")  # fmt: skip
        REGISTRY[kind] = cls

    def apply(self, model: torch.nn.Module, ctx: Context) -> Patch:
        raise NotImplementedError

    def predict(self, pred: Prediction, ctx: Context) -> None:
        """The record's activation prediction, called after apply(): what only the run knows (ctx.applied, the run's
        batch) on top of the pure activation terms. Model states are never priced here (`states` is the one rule).
        Default: its pure activation terms."""
        self.activation_terms(pred)

    def activation_terms(self, pred: Prediction) -> None:
        """Pure: adjust the activation model's inputs (element bytes, checkpointing, autocast). The planner calls
        it for every candidate; default: no effect."""

    def states(self, s: States) -> None:
        """Pure step of the model-state prediction: adjust `s` (rates, counts, overrides, post transforms)."""

    def check(self, kinds: set[str], device_type: str) -> None:
        """Reject combinations/devices this technique cannot run with (raise membench.errors.ConfigError
        naming the key and why). `kinds` are all techniques of the run. Default: no constraint."""

    def check_run(self, run) -> None:
        """Reject run knobs it cannot run with (e.g. run.grad_accum_steps > 1): raise ConfigError naming the key.
        Default: no constraint."""

    def check_model(self, model: torch.nn.Module, blocks) -> str | None:
        """Why it cannot apply to this (fake or meta) model, found by the planner before any run; None: it can."""
        return None

    def simulated(self) -> Technique | None:
        """What runs in its place on fake tensors: itself (default), a stand-in, or None (no effect on a training
        step). Consulted only when `not_simulated` is empty."""
        return self

    def layer_period(self) -> int:
        """Blocks after which its effect repeats (checkpointing every k-th block: k); per-layer extrapolation of
        the fake-tensor simulation steps by it."""
        return 1

    def time_prior(self) -> float:
        """Step time x the baseline's where no record says otherwise."""
        return 1.0

    @classmethod
    def plan_values(cls, world_size: int, device_type: str) -> list[dict[str, Any]]:
        """Knob values the planner tries for this technique (each dict one candidate); [] leaves it out."""
        return [{}] if cls.family else []


# ---- registry --------------------------------------------------------------------------------------------------
def conf_roots() -> list[Path]:
    """The config roots: MEMBENCH_CONF (else the package's conf/), then each MEMBENCH_CONF_PATH folder."""
    return confpath.roots()


def discover(roots: Iterable[Path] | None = None) -> dict[str, type[Technique]]:
    """Import the `_target_` of every technique YAML on the config path (importing registers the class)."""
    _import_targets(tuple(Path(r) for r in (conf_roots() if roots is None else roots)))
    return REGISTRY


@functools.cache
def _import_targets(roots: tuple[Path, ...]) -> None:
    for root in roots:
        for path in sorted(Path(root, "technique").glob("*.yaml")):
            target = (yaml.safe_load(path.read_text()) or {}).get("_target_")
            if target:
                try:
                    confpath.locate(target)
                except confpath.MissingDependency as e:
                    UNAVAILABLE[path.stem] = str(e)


def families() -> dict[str, list[type[Technique]]]:
    """Planner family -> its member classes, families in the apply order of their first member."""
    out: dict[str, list[type[Technique]]] = {}
    for cls in sorted(discover().values(), key=lambda c: (c.order, c.kind)):
        if cls.family:
            out.setdefault(cls.family, []).append(cls)
    return out


def distributed_kinds() -> list[str]:
    return sorted(k for k, c in discover().items() if c.distributed)


# ---- composition -----------------------------------------------------------------------------------------------
def ordered(techniques: list[Technique]) -> list[Technique]:
    return sorted(techniques, key=lambda t: (t.order, t.kind))


def incompatible_pairs() -> dict[frozenset, str]:
    """Every declared incompatible pair with its reason (from both sides' declarations)."""
    return {frozenset({k, o}): why for k, c in discover().items() for o, why in c.incompatible.items()}


def validate(techniques: list[Technique], device_type: str) -> None:
    kinds = {t.kind for t in techniques}
    for t in ordered(techniques):
        for other, why in t.incompatible.items():
            if other in kinds:
                raise ConfigError(f"technique=[{t.kind},{other}]: incompatible: {why}")
    for t in techniques:
        t.check(set(kinds), device_type)


def validate_run(techniques: list[Technique], run) -> None:
    """Each technique's check_run against the run knobs (RunConfig)."""
    for t in ordered(techniques):
        t.check_run(run)


def apply_all(techniques: list[Technique], model, ctx: Context) -> tuple[object, Patch]:
    """Apply in order; merge patches. Returns the (possibly replaced) model and one merged patch."""
    merged = Patch()
    contexts, extras = [], []
    for t in ordered(techniques):
        p = t.apply(model, ctx)
        ctx.applied[t.kind] = p.applied
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
    merged.applied = dict(ctx.applied)  # kind -> what its apply learned
    return model, merged


def _prefixed(kind: str, hook, model) -> dict:
    return {f"{kind}.{k}": v for k, v in hook(model).items()}


def model_states(model, blocks, techniques: list[Technique], world_size: int,
                 roles: dict[str, str] | None = None, device_type: str = "", workload: Any = None,
                 start: States | None = None, prefixes: dict | None = None) -> dict:  # fmt: skip
    """Per-rank model-state bytes {device: {params, grads, optimizer}, host: {...}, other, rule, psi}: the States
    of `model` as built (before any technique touched it), transformed by each technique's pure `states` step in
    apply order. The one model-state predictor: the planner calls it on a fake or meta model, a run's record on
    its real model right before apply_all (membench/execute.py). `roles`: the workload's linear_roles();
    `device_type`: the device the states live on (where a technique's layout depends on it: paged 8-bit states);
    `workload`: the workload whose model this is (its batch and loss), for steps that trace a forward. `start`: that
    same States.of, made once by a caller that prices many combinations (a fresh copy of it is transformed).
    `prefixes`: with `start`, that caller's record of the States after each run of leading steps (in apply order)
    it has priced: the longest one already made is taken up and only the steps after it run (the planner's
    candidates share their first techniques, whose steps walk the model). Only States without `post` transforms are
    kept: a post transform may read the States it was added to when `totals` runs."""
    s = States.of(model, blocks, world_size, roles, device_type, workload) if start is None else start.fresh()
    steps = ordered(techniques)
    done = 0
    if prefixes is not None and start is not None:
        done = next((i for i in range(len(steps), 0, -1) if tuple(steps[:i]) in prefixes), 0)
        s = prefixes[tuple(steps[:done])].fresh() if done else s
    for i, t in enumerate(steps[done:], done + 1):
        t.states(s)
        if prefixes is not None and start is not None and not s.post:
            prefixes[tuple(steps[:i])] = s.fresh()
    device, host = s.totals()
    return {"device": device, "host": host, "other": dict(s.other), "live": dict(s.live), "rule": "; ".join(s.rule),
            "psi": s.psi}  # fmt: skip
