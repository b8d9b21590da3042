"""The child side of one run: build workload and techniques, run the step schedule, return the measured sections.

The schedule, in phases (all real optimizer steps, so quality is comparable), each metered by the device's own
counters (membench/measure.py::PhaseMeter):
  setup -> warmup (>= 1 step: optimizer state exists before memory is measured)
        -> memory_step (MemTracker: the split by category)  -> flop_step (FlopCounterMode)
        -> timed (plain steps: step times, and on CUDA the headline peak) -> rest (plain) -> eval (no_grad).
The record is assembled in membench/assemble.py.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import time
from dataclasses import dataclass

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from membench import assemble, distributed, gpuinfo, measure
from membench import technique as compose
from membench.cell_progress import report_progress
from membench.cells import build_all
from membench.errors import ConfigError, MemoryBudgetExceeded
from membench.predict import predict
from membench.sections import MODEL_STATES, PLAIN_PHASES
from membench.technique import Context


@dataclass(frozen=True)
class Schedule:
    """Step indices of each phase; every index is one real training step."""

    warmup: range
    memory: int
    flop: int
    timed: range
    rest: range

    @classmethod
    def of(cls, run) -> Schedule:
        w, m = run.warmup_steps, run.measure_steps
        return cls(range(w), w, w + 1, range(w + 2, w + 2 + m), range(w + 2 + m, run.train_steps))


class Trainer:
    """The model with its techniques applied, its optimizer, and one training step."""

    def __init__(self, run, wcfg, techs, device: torch.device):
        compose.validate_run(techs, run)  # before anything is built: e.g. accumulation with a step in backward
        torch.manual_seed(run.seed)
        self.run, self.device = run, device
        self.wl = wcfg.build(run.seed)
        ctx = Context(workload=self.wl, device=device, run=run)
        self.techs = compose.ordered(techs)
        model = self.wl.model.to(device)
        # the record's model-state prediction: the planner's pure rule, on the model before any technique touches it
        n_blocks = len(self.wl.blocks())  # before apply_all: a DDP/FSDP wrapper hides the workload's blocks
        states = compose.model_states(model, self.wl.blocks(), self.techs, distributed.world_size(),
                                      roles=self.wl.linear_roles(), device_type=device.type, workload=self.wl)  # fmt: skip
        self.model, self.patch = compose.apply_all(self.techs, model, ctx)
        self.wl.model = self.model
        make = self.patch.optimizer_factory or (
            lambda m: self.wl.make_optimizer([p for p in m.parameters() if p.requires_grad])
        )
        self.optimizer = make(self.model)
        if run.grad_accum_steps > 1 and self.patch.backward is not None:
            raise ConfigError(f"run.grad_accum_steps={run.grad_accum_steps}: the engine that owns backward and the "
                              "step (Patch.backward, e.g. DeepSpeed's) accumulates through its own config, not this loop")  # fmt: skip
        # activations scale with the micro-batch; the gradients of all k micro-batches are one buffer (in states)
        self.predicted = predict(self.wl, self.techs, states, ctx, run.micro_batch_size, n_blocks)
        self.model.train()
        self.losses: list[float] = []
        # data parallelism: each rank reads its own shard of the batch stream (run.batch_size is per rank)
        self.world, self.rank = distributed.world_size(), distributed.rank()

    def step(self, i: int, after_forward=None, after_backward=None, before_zero=None) -> float:
        """One real training step: run.grad_accum_steps micro-batches (forward + backward each, gradients summed),
        then one optimizer step. The hooks let instrumented steps look between its phases: after the last
        micro-batch's forward (the earlier ones' gradients are alive by then), after its backward, before zero_grad."""
        p, opt, scaler, k = self.patch, self.optimizer, self.patch.grad_scaler, self.run.grad_accum_steps
        batch = self.wl.batch(i * self.world + self.rank, self.run.batch_size, self.device)
        for g in opt.param_groups:  # the workload's LR warm-up, as a factor on each group's own LR
            g["lr"] = g.setdefault("membench_base_lr", g["lr"]) * self.wl.lr_scale(i)
        losses = []
        for j, micro in enumerate(split_batch(batch, k)):
            if j:
                measure.next_micro_batch()
            with p.step_context():
                loss = self.wl.loss(self.model, micro)
            if k > 1:  # each micro-batch's mean loss weighs 1/k: the summed gradient is the whole batch's mean's
                loss = loss / k
            if after_forward and j == k - 1:
                after_forward()
            if p.backward is not None:  # an engine that owns backward and step (DeepSpeed)
                p.backward(loss)
            elif scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            losses.append(loss.detach())
        if after_backward:
            after_backward()
        if p.optimizer_step is not None:
            p.optimizer_step()
        elif scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if before_zero:
            before_zero()
        opt.zero_grad(set_to_none=True)
        for hook in p.after_step:
            hook()
        self.losses.append(sum(x.item() for x in losses))  # read after the step: no sync inside it
        report_progress(len(self.losses), self.run.train_steps)  # the sweep's progress display (a no-op outside)
        return self.losses[-1]

    def state_bytes(self) -> dict[str, dict[str, int]]:
        return state_bytes(self.model, self.optimizer, self.patch.extra_state())

    def memory_step(self, i: int) -> tuple[measure.TrackerSplit, dict[str, dict[str, int]]]:
        """One step under MemTracker; exact model-state bytes per device, grads read right after backward
        (engines such as DeepSpeed free theirs in step()), the rest right before zero_grad."""
        grads: dict[str, dict[str, int]] = {}
        states: dict[str, dict[str, int]] = {}

        def after_backward():
            for dev, cats in self.state_bytes().items():
                grads[dev] = {"grads": cats.get("grads", 0)}

        def before_zero():
            for dev, cats in self.state_bytes().items():
                states[dev] = {**cats, **grads.get(dev, {})}
            for dev in grads.keys() - states.keys():
                states[dev] = grads[dev]

        run_step = functools.partial(self.step, i, after_backward=after_backward, before_zero=before_zero)
        measure_fn = self.patch.measure_memory or measure.measure_memory
        split, _ = measure_fn(
            lambda after_forward: run_step(after_forward=after_forward),
            self.model,
            self.optimizer,
            extra=self.patch.extra_state,
        )
        return split, states

    def flop_step(self, i: int) -> dict:
        with distributed.CommCounter() if torch.distributed.is_initialized() else contextlib.nullcontext() as comm:
            counted, by_op, _ = measure.count_flops(functools.partial(self.step, i))
        return {"counted_per_step": counted, "counted_by_op": by_op, "comm": comm}

    def timed_step(self, i: int) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        self.step(i)
        _sync(self.device)
        return time.perf_counter() - t0

    def evaluate(self):
        for hook in self.patch.before_eval:  # e.g. post-training quantization; its facts join technique_info
            self.patch.info.update(hook(self.model))
        with torch.no_grad():  # evaluation holds no graph: its memory is the forward's transient, not training's
            return self.wl.evaluate(self.model, self.device)


def split_batch(batch, k: int) -> list:
    """The batch as k micro-batches: every tensor split in k equal parts along its first dimension (samples), other
    leaves repeated; k == 1 gives the batch itself. Containers: tuples, lists, dicts (the workloads' batches)."""
    if k == 1:
        return [batch]
    if torch.is_tensor(batch):
        if batch.shape[0] % k:
            raise ConfigError(
                f"run.grad_accum_steps={k}: a batch tensor of {batch.shape[0]} rows does not split in {k}"
            )
        return list(batch.tensor_split(k))
    if isinstance(batch, dict):
        parts = {key: split_batch(v, k) for key, v in batch.items()}
        return [{key: v[j] for key, v in parts.items()} for j in range(k)]
    if isinstance(batch, (tuple, list)):
        cols = [split_batch(v, k) for v in batch]
        return [type(batch)(c[j] for c in cols) for j in range(k)]
    return [batch] * k


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _leaves(ts):
    """Plain tensors behind `ts`: tensor subclasses (torchao's quantized optimizer states) flatten to their
    inner tensors, whose storages hold the bytes (the subclass's own storage cannot be read)."""
    for t in ts:
        if hasattr(t, "__tensor_flatten__"):
            yield from _leaves(getattr(t, n) for n in t.__tensor_flatten__()[0])
        elif torch.is_tensor(t):
            yield t


def state_bytes(model, optimizer, extra: dict[str, list[torch.Tensor]]) -> dict[str, dict[str, int]]:
    """Exact bytes of model states per device, from the tensors themselves: each storage counted once, in the
    first category that names it (params, grads, optimizer, then a technique's named extras)."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, dict[str, int]] = {}

    def add(cat: str, ts) -> None:
        for t in _leaves(ts):
            key = measure.storage_key(t)
            if key in seen and key[1] != 0:
                continue
            seen.add(key)
            dev = out.setdefault(key[0], {})
            dev[cat] = dev.get(cat, 0) + t.untyped_storage().nbytes()

    add("params", list(model.parameters()) + list(model.buffers()) + extra.get("params", []))
    add("grads", [p.grad for p in model.parameters() if p.grad is not None] + extra.get("grads", []))
    add("optimizer", [v for s in optimizer.state.values() for v in s.values()] + extra.get("optimizer", []))
    for cat, ts in extra.items():  # named extra copies a technique holds (DeepSpeed's fp32 master partition)
        if cat not in MODEL_STATES:
            add(cat, ts)
    return out


def _set_cuda_budget(device: torch.device, budget_mib: float | None) -> None:
    """The allocator refuses to go past the budget (an OutOfMemoryError, recorded as oom); None lifts it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = 1.0 if budget_mib is None else min(1.0, budget_mib * 2**20 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)


def _check_budget(peak_bytes: int, budget_mib: float | None, what: str) -> None:
    if budget_mib and peak_bytes > budget_mib * 2**20:
        msg = f"{what} {peak_bytes / 2**20:.1f} MiB > run.memory_budget_mib={budget_mib}"
        raise MemoryBudgetExceeded(msg, peak_bytes, budget_mib, what)


def execute(config: dict) -> dict:
    run, wcfg, techs, device = build_all(config)
    needed = any(t.distributed for t in techs)
    with distributed.process_group(device, run.timeout_s, needed):
        out = _execute(run, wcfg, techs, distributed.rank_device(device))
        return distributed.merge_ranks(out) if "distributed" in out else out


def _execute(run, wcfg, techs, device: torch.device) -> dict:
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    if device.type == "cuda" and run.memory_budget_mib:
        _set_cuda_budget(device, run.memory_budget_mib)
    linear = torch.nn.functional.linear
    try:
        return _schedule(run, wcfg, techs, device)
    finally:  # the fraction is per process: a caller running cells in-process must not inherit this one's budget
        if device.type == "cuda" and run.memory_budget_mib:
            _set_cuda_budget(device, None)
        # DeepSpeed's stage 3 replaces F.linear process-wide with its own autograd Function and says it "will
        # persist unless manually reset": the run measures it, a later in-process run must not inherit it
        torch.nn.functional.linear = linear


def _memory_step(meter: measure.PhaseMeter, tr: Trainer, i: int, history: bool):
    """The memory step as its phase. The allocator's history (run.cuda_memory_history) is a diagnostic and must not
    fail a cell, yet recording it has made backward fail (quantized_base nf4 + checkpointing + bf16, torch 2.11:
    SystemError from run_backward). A step that fails while recording is run again without it, and the phase's
    `cuda_history_at_peak` holds the error instead. The re-run is the same step only if the optimizer has not
    stepped: the failed attempt's partial grads are dropped first; a failure once the optimizer has begun its step
    is raised (running the step again would apply batch i twice)."""
    failure = None
    if history:
        stepped: list[bool] = []
        hook = register_optimizer_step_pre_hook(lambda *_: stepped.append(True))
        try:
            with meter.phase("memory_step") as ph:
                torch.cuda.memory._record_memory_history(stacks="python", max_entries=200_000)
                try:
                    split, states = tr.memory_step(i)
                    ph["cuda_history_at_peak"] = _history_at_peak(ph)
                finally:
                    torch.cuda.memory._record_memory_history(enabled=None)
            return split, states
        except Exception as e:
            if stepped:
                raise
            failure = f"{type(e).__name__}: {e}"
        finally:
            hook.remove()
        tr.optimizer.zero_grad(set_to_none=True)
        gc.collect()  # the failed attempt's graph and activations sit in traceback cycles until a collection
    with meter.phase("memory_step") as ph:
        split, states = tr.memory_step(i)
        if failure is not None:
            ph["cuda_history_at_peak"] = {"error": failure, "step_rerun_without_history": True}
    return split, states


def _history_at_peak(ph: dict) -> dict:
    try:
        return measure.cuda_history_at_peak(torch.cuda.memory._snapshot(), ph["cuda_allocated_start_bytes"])
    except Exception as e:  # the step itself succeeded: only the diagnostic is missing
        return {"error": f"{type(e).__name__}: {e}", "step_rerun_without_history": False}


def _schedule(run, wcfg, techs, device: torch.device) -> dict:
    meter = measure.PhaseMeter(device, gpuinfo.handle(device))
    sched = Schedule.of(run)
    with meter.phase("setup"):
        tr = Trainer(run, wcfg, techs, device)
        gc.collect()  # copies a technique made while applying itself (pruning's search) are garbage by now
    with meter.phase("warmup"):
        for i in sched.warmup:
            tr.step(i)
    split, states = _memory_step(meter, tr, sched.memory, run.cuda_memory_history and device.type == "cuda")
    if device.type != "cuda":  # no allocator counter here: the tracker's peak of the device is the figure
        _check_budget(split.total(str(device)), run.memory_budget_mib, f"tracker peak on {device}")
    with meter.phase("flop_step"):
        flops = tr.flop_step(sched.flop)
    with meter.phase("timed"):
        step_times = []
        for i in sched.timed:
            step_times.append(tr.timed_step(i))
            meter.sample()
    with meter.phase("rest"):
        for i in sched.rest:
            tr.step(i)
    if device.type == "cuda":
        plain = max(meter.phases[p]["cuda_max_allocated_bytes"] for p in PLAIN_PHASES)
        _check_budget(plain, run.memory_budget_mib, f"allocator peak on {device}")
    with meter.phase("eval"):
        quality = tr.evaluate()
    return assemble.ok_sections(tr, device, split, states, meter.phases, flops, step_times, quality)
