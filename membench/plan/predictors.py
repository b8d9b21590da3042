"""Prediction: the analytic, simulated/hybrid and calibrated peaks, time ratio and quality of one candidate, and
the largest batch two predictions allow."""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from membench import simulate as sim
from membench.calibrate import Calibration
from membench.predict import model_states, place_activations
from membench.records import cpu_flags
from membench.technique import Prediction, States

# Each technique declares its planner family, knob values, time prior and hybrid margin (membench/technique.py).
HALF_SPEED = {"cuda": 0.6, "cpu_native": 0.8, "cpu_emulated": 20.0}  # 16-bit step vs fp32


def device_type_of(run) -> str:
    if run.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return run.device


def fake_workload(wcfg, seed: int):

    with FakeTensorMode(allow_non_fake_inputs=True):
        return wcfg.build(seed)


def analytic(wl, techs, batch_size: int, world_size: int, device_type: str = "", memo: dict | None = None) -> dict:
    """Model states by each technique's pure `states` step plus the workload's activation model. A workload
    without an activation model (hf, custom) gives activations None and no peak: the simulation decides.
    `device_type`: the planned device, for layouts that depend on it (bitsandbytes' paged states live in CUDA
    managed memory, outside the allocator: the host column). `memo`: one dict for the many candidates of one plan
    on the same (unchanged) workload: its roles, States.of and activation models by their inputs, each made once."""

    memo = {} if memo is None else memo
    pred = Prediction(param_bytes=4, grad_bytes=4, optimizer_bytes=8)
    for t in techs:
        t.activation_terms(pred)
    # the workload's linear roles: lora's targets by role (q/k/v/o, mlp, head) are priced on exactly its layers
    # (and the workload itself: prune_structured traces a forward of the fake model to count what it removes)
    if ("states_of", world_size, device_type) not in memo:  # with the States after each run of leading steps
        roles = wl.linear_roles()
        start = States.of(wl.model, wl.blocks(), world_size, roles, device_type, wl)
        memo["states_of", world_size, device_type] = (roles, start, {})
    roles, start, prefixes = memo["states_of", world_size, device_type]
    states = model_states(wl.model, wl.blocks(), techs, world_size, roles=roles, device_type=device_type,
                          workload=wl, start=start, prefixes=prefixes)  # fmt: skip

    # a loss that never holds the full logits (fused cross-entropy) is passed only where a technique set it: the
    # activation models without an LM head (digits, custom) take no such argument
    chunk = {} if pred.loss_chunk_tokens is None else {"loss_chunk_tokens": pred.loss_chunk_tokens}

    def placed(b: int) -> tuple[float | None, float]:  # (device, host): activation offloading moves them on CUDA
        autocast = pred.autocast_dtype is not None
        k = ("acts", b, pred.act_elem_bytes, pred.checkpoint, autocast, pred.loss_chunk_tokens, pred.act_offload,
             device_type)  # fmt: skip
        if k not in memo:
            terms = wl.activation_model(b, pred.act_elem_bytes, pred.checkpoint, autocast=autocast, **chunk)
            memo[k] = place_activations(terms, len(wl.blocks()), pred.act_offload, device_type)
        return memo[k]

    def act(b: int) -> float | None:
        return placed(b)[0]

    acts, acts_host = placed(batch_size)
    by_cat = {**states["device"], "activations": acts, **states["other"]}  # other: named buffers (DeepSpeed's bucket)
    return {
        "peak_bytes": None if acts is None else sum(by_cat.values()),
        "by_category": by_cat,
        "host_bytes": sum(states["host"].values()) + acts_host,
        "states": states,
        "act_per_sample": None if acts is None else act(batch_size + 1) - acts,
        "rule": states["rule"],
    }


def time_ratio(kinds_key: str, techs, device_type: str, cal: Calibration, family: str) -> tuple[float, str]:
    got = cal.time_ratio(kinds_key, family)
    if got:
        return got[0], f"calibrated ({got[1]} record(s))"
    r = 1.0
    for t in techs:
        r *= t.time_prior()
        if t.half_precision:
            if device_type == "cuda":
                r *= HALF_SPEED["cuda"]
            else:
                native = {"avx512_bf16", "amx_bf16"} & set(cpu_flags())
                r *= HALF_SPEED["cpu_native" if native else "cpu_emulated"]
    return r, "prior"


def quality(kinds_key: str, techs, cal: Calibration, family: str) -> dict:
    exact = all(t.exact for t in techs)
    out = {"exact": exact, "risk": "exact" if exact else "approximate"}
    got = cal.quality_delta(kinds_key, family)
    if got and not exact:
        out.update(delta=got[0], metric=got[1], records=got[2])
    return out


def sim_key(techs, world_size: int | None = None) -> tuple:
    """Candidates whose simulated techniques are equal configs (frozen dataclasses: every knob) share a simulation;
    `world_size` as the simulation is given it (a distributed technique runs on fake tensors only with it)."""
    s, _ = sim.split(techs, world_size)
    return tuple(sorted((t.kind, repr(t)) for t in s))


def simulated(s: dict, techs, states: dict, world_size: int | None = None) -> tuple[str, dict]:
    """("simulation", s) when every technique ran on fake tensors; else ("hybrid", s with the full model states
    of all techniques put in place of the simulated ones at every phase: simulate.replace_states). `world_size`: what
    the simulation was given (zero's FSDP2 runs on fake tensors only with it); what is left out is this candidate's
    own split under it."""
    # this candidate's own techniques left out: a simulation is shared by every candidate whose simulated techniques
    # are equal (sim_key), so what the shared run left out is not this candidate's (quantized_base shares the baseline's)
    left = [t.kind for t in sim.split(techs, world_size)[1]]
    keep = {k: s[k] for k in ("method", "seconds", "device", "world_size") if k in s}
    if not left:
        return "simulation", {**s, **keep}
    h = sim.replace_states(s, states["device"], states["other"], states.get("live"))
    return "hybrid", {**h, **keep, "simulated_peak_bytes": s["peak_bytes"], "left_out": list(left)}


def max_batch(p1: dict, b1: int, p2: dict, b2: int, budget: float) -> int | None:
    """Largest batch whose every phase stays within `budget`, each phase's total affine in batch through the two
    predictions at b1 and b2 (activations and batch tensors scale with the batch; the states do not). None: no
    phase grows with the batch."""
    bound = None
    for ph in sim.PHASES:
        t1, t2 = sum(p1["phases"][ph].values()), sum(p2["phases"][ph].values())
        slope = (t2 - t1) / (b2 - b1)
        if slope > 0:
            b = b1 + math.floor((budget - t1) / slope)
        elif t1 > budget:
            b = 0
        else:
            continue
        bound = b if bound is None else min(bound, b)
    return None if bound is None else max(0, bound)


def sim_device(device_type: str) -> str:
    """Fake tensors on the planned device where it exists here; CPU kernels otherwise (labelled in the JSON)."""
    return "cuda" if device_type == "cuda" and torch.cuda.is_available() else "cpu"


def device_type_of_cfg(cfg: dict) -> str:
    d = cfg["run"]["device"]
    return ("cuda" if torch.cuda.is_available() else "cpu") if d == "auto" else d
