"""Analytic memory prediction by category, next to the measured one.

Model states from bytes-per-parameter rules of the techniques in force (fp32 AdamW: 4 + 4 + 8 bytes per
parameter; Rajbhandari et al. 2020, "ZeRO", sec. 3.1), buffers at their exact size, activations from the
workload's analytic model. `other` (temporaries, autocast weight copies, allocator slack) is not predicted.
"""

from __future__ import annotations

from membench.technique import Context, Prediction, model_states


def predict(workload, techniques, model, ctx: Context, batch_size: int) -> dict:
    pred = Prediction(param_bytes=4, grad_bytes=4, optimizer_bytes=8)
    for t in techniques:
        t.predict(pred, ctx)
    n = sum(p.numel() for p in model.parameters())
    n_trainable = round(n * pred.trainable_fraction)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    act = workload.activation_model(
        batch_size, pred.act_elem_bytes, pred.checkpoint, autocast=pred.autocast_dtype is not None
    )
    if pred.act_extra_bytes and act["total"] is not None:  # workloads without an activation model predict none
        act = {**act, "technique_extra": pred.act_extra_bytes, "total": act["total"] + pred.act_extra_bytes}
    return {
        "by_category": {
            "params": pred.params_total if pred.params_total is not None else n * pred.param_bytes + buffers,
            "grads": pred.grads_total if pred.grads_total is not None else n_trainable * pred.grad_bytes,
            "optimizer": pred.optimizer_total
            if pred.optimizer_total is not None
            else n_trainable * pred.optimizer_bytes,
            "activations": act["total"],
            "other": None,
        },
        "activation_terms": act,
        "rules": {
            "param_bytes": pred.param_bytes,
            "grad_bytes": pred.grad_bytes,
            "optimizer_bytes": pred.optimizer_bytes,
            "act_elem_bytes": pred.act_elem_bytes,
            "checkpoint": pred.checkpoint,
        },
        "other_terms": pred.other,  # named device bytes outside the states (DeepSpeed's reduce bucket)
        "notes": pred.notes,
    }


def relative_error(measured: dict, predicted: dict) -> dict:
    out = {}
    for k, p in predicted.items():
        m = measured.get(k)
        out[k] = None if (p is None or m is None or m == 0) else (p - m) / m
    return out


# ---- the planner's model-state predictor ----------------------------------------------------------------------
# Needs no applied techniques: each technique's pure `states` step (membench/technique.py) transforms a description
# of the model as built, so the planner calls it for every candidate on one fake or meta model, at any world size.
__all__ = ["model_states", "predict", "relative_error"]
