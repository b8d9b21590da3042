"""Analytic memory prediction by category, next to the measured one.

Model states from bytes-per-parameter rules of the techniques in force (fp32 AdamW: 4 + 4 + 8 bytes per
parameter; Rajbhandari et al. 2020, "ZeRO", sec. 3.1), buffers at their exact size, activations from the
workload's analytic model. `other` (temporaries, autocast weight copies, allocator slack) is not predicted.
"""

from __future__ import annotations

from membench.techniques.base import Context, Prediction


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
        "notes": pred.notes,
    }


def relative_error(measured: dict, predicted: dict) -> dict:
    out = {}
    for k, p in predicted.items():
        m = measured.get(k)
        out[k] = None if (p is None or m is None or m == 0) else (p - m) / m
    return out


# ---- the planner's model-state predictor ----------------------------------------------------------------------
# Unlike predict() above, this needs no applied techniques (nothing is wrapped or sharded), so the planner can
# call it for every candidate on one model built on fake or meta tensors, for any world size.


def model_states(model, blocks, techniques, world_size: int) -> dict:
    """Per-rank model-state bytes {device: {params, grads, optimizer}, host: {...}, rule: str} for `techniques`
    (config objects, not applied) over `world_size` ranks. Rules: fp32 AdamW 4 + 4 + 8 bytes/param plus torch's
    4-byte step scalar per tensor; bf16_pure 2 + 2 + 4; DeepSpeed mixed precision 2 + 2 + K=12 (ZeRO paper
    sec. 3.1); 8-bit states at the library's layout; quantized bases at bitsandbytes' layout plus LoRA adapters;
    ZeRO stage s divides optimizer (s >= 1), grads (s >= 2), params (s = 3) by N; offload moves them to the host."""
    from membench.techniques import quantization as q

    kinds = {t.kind: t for t in techniques}
    params = list(model.parameters())
    psi = sum(p.numel() for p in params)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    pb, gb, ob = 4, 4, 8
    rule = "fp32 AdamW 4+4+8"
    if "bf16_pure" in kinds:
        pb, gb, ob, rule = 2, 2, 4, "bf16_pure 2+2+4"
    zero = kinds.get("zero")
    if zero is not None and zero.backend == "deepspeed" and kinds.keys() & {"bf16", "fp16"}:
        pb, gb, ob, rule = 2, 2, 12, "DeepSpeed mixed precision 2+2+12"
    trainable, n_tensors, param_bytes = psi, len(params), psi * pb + buffers
    qb = kinds.get("quantized_base")
    if qb is not None:
        targets = [getattr(p, n) for p, n in q.linear_targets(model, blocks, qb.quantize_outside_blocks)]
        dense = sum(lin.weight.numel() for lin in targets)
        lora = sum(qb.rank * (lin.in_features + lin.out_features) for lin in targets)
        layout = sum(q.layout_bytes(lin.out_features, lin.in_features, qb.quant_type, qb.blocksize, qb.double_quant)
                     for lin in targets)  # fmt: skip
        rest = psi - dense + lora
        param_bytes = layout + rest * pb + buffers
        trainable = lora if qb.freeze_rest else rest
        n_tensors = 2 * len(targets) + (0 if qb.freeze_rest else len(params) - len(targets))
        rule += f"; {len(targets)} {qb.quant_type} bases + rank-{qb.rank} LoRA"
    grads = trainable * gb
    optimizer = trainable * ob + (4 * n_tensors if zero is None else 0)
    o8 = kinds.get("optimizer_8bit")
    if o8 is not None:
        from membench.techniques.optim8bit import BNB_QMAP

        trainable_params = [p for p in params if p.requires_grad]
        optimizer = sum(o8.state_bytes(p) for p in trainable_params)
        if o8.backend == "bitsandbytes" and any(p.numel() >= o8.min_8bit_size for p in trainable_params):
            optimizer += 2 * BNB_QMAP * 4
        rule += f"; {o8.bits}-bit {o8.backend} states"
    device = {"params": float(param_bytes), "grads": float(grads), "optimizer": float(optimizer)}
    host = dict.fromkeys(device, 0.0)
    if zero is not None:
        n = world_size
        if zero.stage >= 1:
            device["optimizer"] /= n
        if zero.stage >= 2:
            device["grads"] /= n
        if zero.stage >= 3:
            device["params"] = (device["params"] - buffers) / n + buffers
        if zero.offload_optimizer == "cpu":
            host["optimizer"], device["optimizer"] = device["optimizer"], 0.0
        if zero.offload_params == "cpu":
            host["params"], device["params"] = device["params"] - buffers, float(buffers)
        rule += f"; ZeRO stage {zero.stage} over N={n}"
    return {"device": device, "host": host, "rule": rule, "psi": psi}
