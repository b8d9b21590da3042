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


def predict(workload, techniques, states: dict, ctx: Context, batch_size: int) -> dict:
    """The record's prediction. `states`: model_states(...) of the model as built (per rank: device and host)."""
    pred = Prediction()
    for t in techniques:
        t.predict(pred, ctx)
    act = workload.activation_model(
        batch_size, pred.act_elem_bytes, pred.checkpoint, autocast=pred.autocast_dtype is not None
    )
    if pred.act_extra_bytes and act["total"] is not None:  # workloads without an activation model predict none
        act = {**act, "technique_extra": pred.act_extra_bytes, "total": act["total"] + pred.act_extra_bytes}
    device, host = states["device"], states["host"]
    return {
        # device + host: the measured model states they are compared with are summed over every device
        "by_category": {
            **{k: device[k] + host.get(k, 0.0) for k in device},
            "activations": act["total"],
            "other": None,
        },
        "activation_terms": act,
        "model_states": {"device": device, "host": host, "psi": states["psi"]},
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


__all__ = ["model_states", "predict", "relative_error"]
