"""Verification and fit: real runs, one child process each (membench.runner.run_cell), against the predictions."""

from __future__ import annotations

import json

from membench import simulate as sim
from membench.calibrate import Calibration
from membench.calibrate import load as load_records
from membench.errors import ConfigError
from membench.plan.config import PlanConfig
from membench.plan.enumeration import compose_cells, validated, without_list
from membench.plan.predictors import analytic, device_type_of_cfg, fake_workload, max_batch, sim_device, simulated
from membench.records import write_record
from membench.sweep import run_cell


def _measured(record: dict) -> dict:
    ok = record["status"] == "ok"
    return {
        "status": record["status"],
        "peak_bytes": record["memory"]["peak_bytes"] if ok else None,
        "median_step_s": record["timing"]["median_step_s"] if ok else None,
        "samples_per_s": record["timing"]["samples_per_s"] if ok else None,
        "run_id": record["run_id"],
    }


def _attach(record: dict, results_dir: str, check: dict) -> None:
    """Keep prediction and error in the run's own record (same file, rewritten atomically)."""

    record["plan_check"] = check
    write_record(results_dir, record)


def verify(result: dict, user: list[str], k: int, progress=print, unfit: bool = False) -> list[dict]:
    """Run the top `k` plans predicted to fit (`unfit`: the top `k` rows whether or not they are predicted to fit,
    to check that those predicted not to fit end oom); compare predicted and measured peak (and step time)."""

    cal = Calibration(load_records(result["plan"]["records"], result["device"]))
    base_step = cal.baseline_step_s(result["workload"], result["batch_size"])
    out = []
    for r in [r for r in result["rows"] if r["fits"] or unfit][:k]:
        cfg = compose_cells(without_list(user), [r["overrides"]])[0]
        progress(f"membench: verifying {r['label']} ...")
        record = run_cell(cfg, cfg["run"]["results_dir"], cfg["run"]["timeout_s"])
        m = _measured(record)
        pred_step = base_step * r["time_ratio"] if base_step else None
        check = {
            "techniques": r["techniques"],
            "label": r["label"],
            "predictor": r["best_predictor"],
            "predicted_peak_bytes": r["peak_bytes"],
            "predicted_by": {n: p["peak_bytes"] for n, p in r["predictions"].items() if p["peak_bytes"] is not None},
            "predicted_fits": r["fits"],
            "budget_mib": result["budget_mib"],
            "predicted_step_s": pred_step,
            "time_ratio": r["time_ratio"],
            "time_source": r["time_source"],
            "measured": m,
            "peak_error": (r["peak_bytes"] - m["peak_bytes"]) / m["peak_bytes"] if m["peak_bytes"] else None,
            "peak_error_by": {
                n: (p["peak_bytes"] - m["peak_bytes"]) / m["peak_bytes"]
                if m["peak_bytes"] and p["peak_bytes"]
                else None
                for n, p in r["predictions"].items()
            },  # fmt: skip
            "step_error": (pred_step - m["median_step_s"]) / m["median_step_s"]
            if pred_step and m["median_step_s"]
            else None,
            "over_budget": m["status"] == "oom",
        }
        out.append((record, cfg, check))
    # step time without a recorded baseline: ratios to the first verified plan, predicted vs measured
    first = out[0][2] if out else None
    for record, cfg, check in out:
        m0, m = first["measured"]["median_step_s"], check["measured"]["median_step_s"]
        if m0 and m:
            check["step_vs_first"] = {"predicted": check["time_ratio"] / first["time_ratio"], "measured": m / m0}
        _attach(record, cfg["run"]["results_dir"], check)
    return [c for _, _, c in out]


def predict_one(cfg: dict, pc: PlanConfig, batch_size: int | None = None) -> dict:
    """Best prediction (simulation, else hybrid: never analytic, which some workloads lack) of one composed config."""
    run, wcfg, techs = validated(cfg, device_type_of_cfg(cfg))
    b = batch_size or run.micro_batch_size  # with run.grad_accum_steps > 1 a step holds one micro-batch's activations
    wl = fake_workload(wcfg, run.seed)
    a = analytic(wl, techs, b, run.world_size, device_type_of_cfg(cfg))
    s = sim.simulate(wcfg, techs, b, run.seed, pc.max_layers or None, sim_device(device_type_of_cfg(cfg)),
                     run.grad_accum_steps, run.world_size)  # fmt: skip
    name, pred = simulated(s, techs, a["states"], run.world_size)
    return {**pred, "predictor": name, "analytic_bytes": a["peak_bytes"], "batch": b}


def fit(cfg: dict, pc: PlanConfig, runner=None, progress=print) -> dict:
    """Largest batch under run.memory_budget_mib: predicted from two simulated batch sizes (each phase affine in
    batch), then a short search of real runs."""

    runner = runner or (lambda c: run_cell(c, c["run"]["results_dir"], c["run"]["timeout_s"]))
    budget_mib = cfg["run"].get("memory_budget_mib")
    if not budget_mib:
        raise ConfigError("run.memory_budget_mib=null: fit needs a budget; e.g. run.memory_budget_mib=512")
    budget = budget_mib * 2**20
    b1 = cfg["run"]["batch_size"]
    p1 = predict_one(cfg, pc, b1)
    p2 = predict_one(cfg, pc, 2 * b1)
    predicted = max_batch(p1, b1, p2, 2 * b1, budget) or 0
    slope = (p2["peak_bytes"] - p1["peak_bytes"]) / b1
    tried: dict[int, dict] = {}

    def ok(b: int) -> bool:
        if b not in tried:
            c = json.loads(json.dumps(cfg))
            c["run"]["batch_size"] = b
            progress(f"membench: fit: running batch {b} ...")
            m = _measured(runner(c))
            tried[b] = m
        return tried[b]["status"] == "ok"

    lo, hi = 0, None  # largest known ok, smallest known over
    b = max(1, predicted)
    while len(tried) < pc.fit_max_runs:
        if ok(b):
            lo = b
        else:
            hi = b
        if hi is not None and hi - lo <= 1:
            break
        b = (lo + hi) // 2 if hi is not None else lo + max(1, lo // 4)
        if b < 1:
            break
    found = lo if hi is not None and hi - lo <= 1 else None
    best = tried.get(lo, {})
    return {
        "predicted_batch": predicted,
        "predicted_peak_at": {str(b1): p1["peak_bytes"], str(2 * b1): p2["peak_bytes"]},
        "predicted_bytes_per_sample": slope,
        "predictor": p1["predictor"],
        "batch": found,
        "boundary_confirmed": found is not None,
        "peak_bytes": best.get("peak_bytes"),
        "samples_per_s": best.get("samples_per_s"),
        "runs": {str(k): v for k, v in sorted(tried.items())},
        "budget_mib": budget_mib,
    }
