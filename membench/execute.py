"""The child side of one run: build workload and techniques, train, measure, evaluate, return a record.

Step schedule (indices into the training run, all real optimizer steps, so quality is comparable):
warm-up steps -> 1 memory step (MemTracker) -> 1 FLOP step (FlopCounterMode) -> timed steps -> the rest.
"""

from __future__ import annotations

import contextlib
import functools
import resource
import time

import torch

from membench import distributed, measure
from membench.config import build, build_run
from membench.errors import ConfigError, MemoryBudgetExceeded
from membench.predict import predict, relative_error
from techniques import compose
from techniques.base import Context


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda: no CUDA device is visible; allowed here: auto, cpu")
    return torch.device(name)


def build_all(config: dict):
    """Config dict -> (run, workload config, techniques), validating everything. No model is built."""
    run = build_run(config["run"])
    wcfg = build(config["workload"], "workload")
    techs = [build(node, f"technique.{name}") for name, node in (config.get("technique") or {}).items()]
    device = resolve_device(run.device)
    compose.validate(techs, device.type)
    if run.world_size > 1 and not any(t.kind == "zero" for t in techs):
        raise ConfigError(f"run.world_size={run.world_size}: needs technique zero (stage 0 is plain DDP)")
    return run, wcfg, techs, device


def _precision_note(device: torch.device, techs) -> str | None:
    """16-bit speed on a CPU depends on its bf16 instructions; say which case this run measured."""
    if device.type != "cpu" or not any(t.kind in ("bf16", "fp16", "bf16_pure") for t in techs):
        return None
    from membench.records import cpu_flags

    if "avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags():
        return "CPU has bf16 instructions (avx512_bf16/amx): 16-bit step times are native, not emulated"
    return "CPU lacks bf16 instructions: 16-bit autocast is emulated (20-40x slower); memory figures hold, times do not"


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


def _state_bytes(model, optimizer, extra: dict[str, list[torch.Tensor]]) -> dict[str, int]:
    """Exact bytes of model states from the tensors themselves (unique storages), plus technique extras."""
    seen: set[int] = set()

    def nbytes(ts) -> int:
        total = 0
        for t in _leaves(ts):
            key = t.untyped_storage().data_ptr()
            if key in seen and key != 0:
                continue
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return total

    return {
        "params": nbytes(list(model.parameters()) + list(model.buffers()) + extra.get("params", [])),
        "grads": nbytes([p.grad for p in model.parameters() if p.grad is not None] + extra.get("grads", [])),
        "optimizer": nbytes([v for s in optimizer.state.values() for v in s.values()] + extra.get("optimizer", [])),
        # named extra copies a technique holds (DeepSpeed's fp32 master partition)
        **{k: nbytes(ts) for k, ts in extra.items() if k not in ("params", "grads", "optimizer")},
    }


def execute(config: dict) -> dict:
    run, wcfg, techs, device = build_all(config)
    needed = any(t.kind == "zero" for t in techs)
    with distributed.process_group(device, run.timeout_s, needed):
        out = _execute(run, wcfg, techs, distributed.rank_device(device))
        return distributed.merge_ranks(out) if "distributed" in out else out


def _execute(run, wcfg, techs, device: torch.device) -> dict:
    torch.manual_seed(run.seed)
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    if device.type == "cuda" and run.memory_budget_mib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, run.memory_budget_mib * 2**20 / total), device)

    wl = wcfg.build(run.seed)
    model = wl.model.to(device)
    ctx = Context(workload=wl, device=device, run=run)
    techs = compose.ordered(techs)
    model, patch = compose.apply_all(techs, model, ctx)
    wl.model = model
    optimizer = (
        patch.optimizer_factory or (lambda m: wl.make_optimizer([p for p in m.parameters() if p.requires_grad]))
    )(model)
    predicted = predict(wl, techs, model, ctx, run.batch_size)
    model.train()
    scaler = patch.grad_scaler
    losses: list[float] = []
    states: dict[str, int] = {}
    grads_after_backward: dict[str, int] = {}
    multi = torch.distributed.is_initialized()
    # data parallelism: each rank reads its own shard of the batch stream (run.batch_size is per rank)
    world, rank = distributed.world_size(), distributed.rank()

    def step(i: int, after_forward=None, before_zero=None, after_backward=None) -> float:
        """One real training step; the hooks let instrumented steps look between its phases."""
        batch = wl.batch(i * world + rank, run.batch_size, device)
        for g in optimizer.param_groups:  # the workload's LR warm-up, as a factor on each group's own LR
            g["lr"] = g.setdefault("membench_base_lr", g["lr"]) * wl.lr_scale(i)
        with patch.step_context():
            loss = wl.loss(model, batch)
        if after_forward:
            after_forward()
        if patch.backward is not None:  # an engine that owns backward and step (DeepSpeed)
            patch.backward(loss)
        elif scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if after_backward:
            after_backward()
        if patch.optimizer_step is not None:
            patch.optimizer_step()
        elif scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if before_zero:
            before_zero()
        optimizer.zero_grad(set_to_none=True)
        for hook in patch.after_step:
            hook()
        return loss.item()

    mem_i, flop_i = run.warmup_steps, run.warmup_steps + 1
    timed = range(flop_i + 1, flop_i + 1 + run.measure_steps)
    step_times: list[float] = []
    mem = None
    flops_counted, flops_by_op = 0, {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(run.train_steps):
        if i == mem_i:

            def snapshot_grads():  # right after backward: engines (DeepSpeed) free their grads in step()
                grads_after_backward["grads"] = _state_bytes(model, optimizer, patch.extra_state())["grads"]

            def snapshot_states():
                states.update(_state_bytes(model, optimizer, patch.extra_state()), **grads_after_backward)

            mem, loss = (patch.measure_memory or measure.measure_memory)(
                functools.partial(step, i, before_zero=snapshot_states, after_backward=snapshot_grads), model, optimizer
            )
            losses.append(loss)
            for cat, ts in patch.extra_state().items():  # state MemTracker was not told about
                added = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}.values())
                mem.by_category[cat] = mem.by_category.get(cat, 0) + added
                mem.after_forward[cat] = mem.after_forward.get(cat, 0) + added
                mem.peak_bytes += added
            if run.memory_budget_mib and mem.peak_bytes > run.memory_budget_mib * 2**20:
                raise MemoryBudgetExceeded(
                    f"peak {mem.peak_bytes / 2**20:.1f} MiB > run.memory_budget_mib={run.memory_budget_mib}"
                )
        elif i == flop_i:
            with distributed.CommCounter() if multi else contextlib.nullcontext() as comm:
                flops_counted, flops_by_op, loss = measure.count_flops(functools.partial(step, i))
            losses.append(loss)
        elif i in timed:
            _sync(device)
            t0 = time.perf_counter()
            losses.append(step(i))
            _sync(device)
            step_times.append(time.perf_counter() - t0)
        else:
            losses.append(step(i))

    for hook in patch.before_eval:  # e.g. post-training quantization; its facts join technique_info
        patch.info.update(hook(model))
    quality = wl.evaluate(model, device)
    device_stats = {"process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        device_stats["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        device_stats["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    measured_for_pred = dict(states, activations=mem.after_forward.get("activations", 0))
    model_flops = wl.model_flops(run.batch_size)
    return {
        "workload": {
            "name": wl.name,
            "preset": wl.preset,
            "num_params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
            "num_trainable_params": sum(
                getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad
            ),
            "tokens_per_sample": wl.tokens_per_sample,
            **wl.info(),
        },
        "techniques_applied": [t.kind for t in techs],
        "technique_info": patch.info,
        "exactness": {t.kind: {"exact": t.exact, "loss_rtol": t.loss_rtol} for t in techs},
        "memory": {
            "peak_bytes": mem.peak_bytes,
            "by_category": mem.by_category,
            "held_after_forward": mem.after_forward,
            "model_states": states,
            "predicted_by_category": predicted["by_category"],
            "predicted_detail": {k: v for k, v in predicted.items() if k != "by_category"},
            "relative_error": relative_error(measured_for_pred, predicted["by_category"]),
            "relative_error_basis": "params/grads/optimizer: exact tensor bytes before zero_grad; "
            "activations: MemTracker ACT bytes held right after forward",
            "device": device_stats,
            "budget_mib": run.memory_budget_mib,
        },
        "timing": {
            **measure.timing_stats(step_times, run.batch_size, wl.tokens_per_sample),
            "warmup_steps": run.warmup_steps,
            "device": str(device),
            "note": _precision_note(device, techs),
        },
        "flops": {
            "counted_per_step": flops_counted,
            "counted_by_op": flops_by_op,
            "model_per_step": model_flops,
            "cpu_attention_formula_added": measure.CPU_ATTENTION_FORMULA_ADDED,
            "achieved_flops_per_s": flops_counted / (sum(step_times) / len(step_times)),
        },
        "quality": {
            "metric": quality.metric,
            "value": quality.value,
            "higher_is_better": quality.higher_is_better,
            "extra": quality.extra,
            "loss_curve": losses,
            "train_steps": run.train_steps,
        },
        **(_distributed_section(comm, techs, run) if multi else {}),
    }


def _distributed_section(comm, techs, run) -> dict:
    """This rank's communication in the FLOP step, next to the ZeRO paper's volume for the technique."""
    expected = next((t.expected_comm() for t in techs if hasattr(t, "expected_comm")), None)
    return {
        "distributed": {
            "world_size": distributed.world_size(),
            "rank": distributed.rank(),
            "backend": torch.distributed.get_backend(),
            "communication": dict(comm.summary(), expected=expected),
            "batch_note": f"run.batch_size={run.batch_size} is per rank; each rank reads its own data shard",
        }
    }
