"""The measured sections of an ok record, assembled from what membench/execute.py's phases measured.

Memory, by source (membench/measure.py):
- `peak_bytes`: the run device's peak over plain training steps. On CUDA the caching allocator's
  max_memory_allocated over the timed and remaining steps (no instrumentation active); on a CPU, which has no
  allocator counter, the tracker's peak of the device in the memory step (`peak_source` says which).
- `by_device[dev].by_category`: the tracker's split of that device at its own peak moment; on CUDA with
  `untracked` = the allocator's peak of the same instrumented step minus the tracker's total, so it adds up to a
  device figure. Host bytes (offloaded optimizer state, CPU batches) are in by_device["cpu"] only.
- `phases`: per-phase device counters (allocator, NVML, RSS high-water, wall seconds, energy).
"""

from __future__ import annotations

import os
import resource

import torch

from membench import distributed, measure
from membench.predict import relative_error
from membench.records import cpu_flags
from membench.sections import (
    CATEGORIES,
    PLAIN_PHASES,
    UNTRACKED,
    Distributed,
    Flops,
    Memory,
    Quality,
    Timing,
    Workload,
)


def device_name(device: torch.device) -> str:
    """The name the tracker uses for this device's tensors ("cuda:0", "cpu")."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _categorised(refs_by_device: dict, states: dict, category_map: dict) -> dict[str, dict[str, int]]:
    """The tracker's references of each device by category (optimizer temporaries split off the exact state)."""
    return {
        d: measure.categorise(refs, states.get(d, {}).get("optimizer", 0), category_map)
        for d, refs in refs_by_device.items()
    }


def _by_device(split: measure.TrackerSplit, states: dict, dev: str) -> dict[str, dict]:
    cats = _categorised(split.peak, states, split.category_map)
    by_device = {d: {"tracker_peak_bytes": sum(c.values()), "by_category": c} for d, c in cats.items()}
    by_device.setdefault(dev, {"tracker_peak_bytes": 0, "by_category": dict.fromkeys(CATEGORIES, 0)})
    return by_device


def _headline_peak(device, dev: str, mine: dict, phases: dict) -> tuple[int, str]:
    """(peak, where it comes from). CUDA: the allocator's peak over the plain steps, and the instrumented step's
    allocator peak completes the run device's split (`untracked`); a CPU has no allocator counter: the tracker's."""
    if device.type != "cuda":
        return mine["tracker_peak_bytes"], f"MemTracker peak of {dev} in the memory step (no allocator counter)"
    step_peak = phases["memory_step"]["cuda_max_allocated_bytes"]
    mine["allocator_peak_bytes"] = step_peak
    mine["by_category"][UNTRACKED] = step_peak - mine["tracker_peak_bytes"]
    peak = max(phases[p]["cuda_max_allocated_bytes"] for p in PLAIN_PHASES)
    return peak, "cuda allocator max_memory_allocated over the plain (timed + remaining) steps"


def _summed(states: dict[str, dict[str, int]]) -> dict[str, int]:
    """Model-state bytes of every device added up, by category."""
    totals: dict[str, int] = {}
    for cats in states.values():
        for k, n in cats.items():
            totals[k] = totals.get(k, 0) + n
    return totals


def _process_high_water(device, phases: dict) -> dict:
    """Whole-process high-water marks, for reference only (they span every phase)."""
    whole = {"process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        whole["cuda_max_allocated_bytes"] = max(p["cuda_max_allocated_bytes"] for p in phases.values())
        whole["cuda_max_reserved_bytes"] = max(p["cuda_max_reserved_bytes"] for p in phases.values())
    return whole


def memory_section(tr, device, split: measure.TrackerSplit, states: dict, phases: dict) -> Memory:
    dev = device_name(device)
    by_device = _by_device(split, states, dev)
    held = _categorised(split.after_forward, states, split.category_map)
    peak, source = _headline_peak(device, dev, by_device[dev], phases)
    totals = _summed(states)
    act_held = held.get(dev, {}).get("activations", 0)
    pred = tr.predicted
    return Memory(
        peak_bytes=peak,
        peak_source=source,
        device_name=dev,
        by_category=by_device[dev]["by_category"],
        by_device=by_device,
        held_after_forward=held.get(dev, dict.fromkeys(CATEGORIES, 0)),
        held_after_forward_by_device=held,
        model_states=totals,
        model_states_by_device=states,
        extra_state_reattributed=split.extra,
        predicted_by_category=pred["by_category"],
        predicted_detail={k: v for k, v in pred.items() if k != "by_category"},
        relative_error=relative_error(dict(totals, activations=act_held), pred["by_category"]),
        relative_error_basis="params/grads/optimizer: exact tensor bytes (all devices) before zero_grad; "
        "activations: MemTracker ACT bytes on the run device held right after forward",
        phases=phases,
        device=_process_high_water(device, phases),
        budget_mib=tr.run.memory_budget_mib,
    )


def _precision_note(device: torch.device, techs) -> str | None:
    """16-bit speed on a CPU depends on its bf16 instructions; say which case this run measured."""
    if device.type != "cpu" or not any(t.half_precision for t in techs):
        return None
    if "avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags():
        return "CPU has bf16 instructions (avx512_bf16/amx): 16-bit step times are native, not emulated"
    return "CPU lacks bf16 instructions: 16-bit autocast is emulated (20-40x slower); memory figures hold, times do not"


def load_during(phase: dict) -> dict:
    """The machine's load around the timed steps, and whether it was loaded: a 1-minute load average above the
    core count when they started, i.e. more runnable work than cores before this run's own steps (its warm-up
    adds at most its own threads), so its times share the cores."""
    cores = os.cpu_count() or 1
    start, end = phase["load_start"], phase["load_end"]
    return {"start": start, "end": end, "cpu_count": cores, "loaded": start["load_avg_1m"] > cores}


def timing_section(tr, device, phases: dict, step_times: list[float]) -> Timing:
    run, wl = tr.run, tr.wl
    energy = phases["timed"].get("energy_j")
    per_step = {}
    if energy is not None:
        per_step = {
            "energy_j_per_step": energy / len(step_times),
            "energy_j_per_sample": energy / (len(step_times) * run.batch_size),
        }
    return Timing(
        **measure.timing_stats(step_times, run.batch_size, wl.tokens_per_sample),
        warmup_steps=run.warmup_steps,
        device=str(device),
        note=_precision_note(device, tr.techs),
        wall_by_phase_s={name: p["wall_s"] for name, p in phases.items()},
        load=load_during(phases["timed"]),
        **per_step,
    )


def ok_sections(tr, device, split, states, phases, flops, step_times, quality) -> dict:
    wl, model = tr.wl, tr.model
    comm = flops.pop("comm")
    sections = {
        "workload": Workload(
            name=wl.name,
            preset=wl.preset,
            num_params=sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
            num_trainable_params=sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad),
            tokens_per_sample=wl.tokens_per_sample,
            more=wl.info(),
        ).to_dict(),
        "techniques_applied": [t.kind for t in tr.techs],
        "technique_info": tr.patch.info,
        "exactness": {t.kind: {"exact": t.exact, "loss_rtol": t.loss_rtol} for t in tr.techs},
        "memory": memory_section(tr, device, split, states, phases).to_dict(),
        "timing": timing_section(tr, device, phases, step_times).to_dict(),
        "flops": Flops(
            counted_per_step=flops["counted_per_step"],
            counted_by_op=flops["counted_by_op"],
            model_per_step=wl.model_flops(tr.run.batch_size),
            cpu_attention_formula_added=measure.CPU_ATTENTION_FORMULA_ADDED,
            grouped_attention_formula_added=bool(measure.GROUPED_ATTENTION_FORMULAS),
            achieved_flops_per_s=flops["counted_per_step"] / (sum(step_times) / len(step_times)),
        ).to_dict(),
        "quality": Quality(
            metric=quality.metric,
            value=quality.value,
            higher_is_better=quality.higher_is_better,
            extra=quality.extra,
            loss_curve=tr.losses,
            train_steps=tr.run.train_steps,
        ).to_dict(),
    }
    if comm is not None:
        sections["distributed"] = distributed_section(comm, tr.techs, tr.run, tr.patch.applied).to_dict()
    return sections


def distributed_section(comm, techs, run, applied: dict) -> Distributed:
    """This rank's communication in the FLOP step, next to the ZeRO paper's volume for the technique."""
    expected = next((t.expected_comm(applied.get(t.kind, {})) for t in techs if hasattr(t, "expected_comm")), None)
    return Distributed(
        world_size=distributed.world_size(),
        rank=distributed.rank(),
        backend=torch.distributed.get_backend(),
        communication=dict(comm.summary(), expected=expected),
        batch_note=f"run.batch_size={run.batch_size} is per rank; each rank reads its own data shard",
    )
