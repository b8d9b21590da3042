"""Analytic memory prediction by category, next to the measured one.

Model states: `model_states` (membench/technique.py), each technique's pure `states` step over the model as built,
in apply order (fp32 AdamW: 4 + 4 + 8 bytes per parameter plus torch's fp32 `step` per tensor; Rajbhandari et al.
2020, "ZeRO", sec. 3.1), buffers at their exact size. The planner calls the same function on a fake or meta model;
a run's record on its real model right before the techniques are applied (membench/execute.py: Trainer).
Activations from the workload's analytic model, with the techniques' activation terms (and what a technique's
`predict` adds that only the run knows). `other` (temporaries, autocast weight copies, allocator slack) is not
predicted as a category; named buffers outside the states are listed in `other_terms`.
"""

from __future__ import annotations

from membench.technique import Context, Prediction, model_states


def place_activations(act: dict, n_blocks: int, offload: bool, device_type: str) -> tuple[float | None, float]:
    """(device, host) bytes of the activation model's saved activations. All on the device, unless activation
    offloading is on and the device is CUDA (on CPU the host is the device): then every saved tensor is on the host
    at the end of forward (host = total), and the device holds, at the step's peak, the part outside the blocks (the
    head's tensors, the first fetched back in backward) and one block's share of the blocks' (layers / blocks: the
    block whose tensors are in flight). Tensors it keeps (parameters, those under min_bytes) are not priced."""
    total = act["total"]
    if total is None or not offload or device_type != "cuda":
        return total, 0.0
    layers = act.get("layers", 0.0)
    return total - layers + layers / max(n_blocks, 1), float(total)


def predict(workload, techniques, states: dict, ctx: Context, batch_size: int, n_blocks: int | None = None) -> dict:
    """The record's prediction. `states`: model_states(...) of the model as built (per rank: device and host).
    `n_blocks`: the workload's block count, taken before the techniques wrapped the model (DDP/FSDP hide it)."""
    pred = Prediction()
    for t in techniques:
        t.predict(pred, ctx)
    act = workload.activation_model(
        batch_size, pred.act_elem_bytes, pred.checkpoint, autocast=pred.autocast_dtype is not None
    )
    if pred.act_extra_bytes and act["total"] is not None:  # workloads without an activation model predict none
        act = {**act, "technique_extra": pred.act_extra_bytes, "total": act["total"] + pred.act_extra_bytes}
    device, host = states["device"], states["host"]
    n_blocks = len(workload.blocks()) if n_blocks is None else n_blocks
    act_device, act_host = place_activations(act, n_blocks, pred.act_offload, ctx.device.type)
    return {
        # device + host: the measured model states they are compared with are summed over every device
        "by_category": {
            **{k: device[k] + host.get(k, 0.0) for k in device},
            "activations": act_device,
            "other": None,
        },
        "activation_terms": act,
        "model_states": {"device": device, "host": host, "psi": states["psi"]},
        "activations_host": act_host,  # saved activations on the host (activation offloading), not in by_category
        "rules": {
            "model_states": states["rule"],
            "act_elem_bytes": pred.act_elem_bytes,
            "checkpoint": pred.checkpoint,
        },
        # named device bytes outside the states: the states' own (DeepSpeed's reduce bucket), then the run's
        "other_terms": {**states["other"], **pred.other},
        "notes": pred.notes,
    }


def relative_error(measured: dict, predicted: dict) -> dict:
    out = {}
    for k, p in predicted.items():
        m = measured.get(k)
        out[k] = None if (p is None or m is None or m == 0) else (p - m) / m
    return out


__all__ = ["model_states", "place_activations", "predict", "relative_error"]
