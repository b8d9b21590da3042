"""Ranking: every valid candidate predicted, `fits` and `max_batch` decided by the best predictor, the best-ranked
simulated; `plan` is the whole search."""

from __future__ import annotations

import dataclasses
import math
import time

from membench import simulate as sim
from membench import technique
from membench.calibrate import Calibration, key, label
from membench.calibrate import load as load_records
from membench.config import build, build_run
from membench.errors import ConfigError
from membench.plan.config import PlanConfig
from membench.plan.enumeration import candidates, compose_cells, shared_cells, validated, without_list
from membench.plan.predictors import (
    analytic,
    device_type_of,
    fake_workload,
    max_batch,
    quality,
    sim_device,
    sim_key,
    simulated,
    time_ratio,
)


def _rows(cands, cells, wl, dev, run, cal, family) -> tuple[list[dict], list[dict]]:
    """Validate each composed candidate; give the valid ones their analytic and calibrated predictions. What
    depends on one technique node or config alone (its build, its check_model on this model, its part of the key
    and label) is worked out once: a llama_8b plan has 230,400 candidates over a few dozen of them."""
    rows, rejected, cache, memo = [], [], {}, {}
    names: dict[tuple, tuple] = {}  # (kind, id(node)) -> (node, its key part, its label part)
    refused: dict[int, tuple] = {}  # id(technique) -> (technique, why its check_model refuses this model)

    def named(techniques: dict | None) -> tuple[str, str]:  # calibrate's key and label, one kind at a time
        parts = []
        for k, n in sorted((techniques or {}).items()):
            got = names.get((k, id(n)))
            if got is None or got[0] is not n:
                names[k, id(n)] = got = (n, key({k: n}), label({k: n}))
            parts.append(got[1:])
        return "+".join(p[0] for p in parts) or "baseline", "+".join(p[1] for p in parts) or "baseline"

    def why_not(t) -> str | None:
        got = refused.get(id(t))
        if got is None or got[0] is not t:
            refused[id(t)] = got = (t, t.check_model(wl.model, wl.blocks()))
        return got[1]

    for ov, cell in zip(cands, cells, strict=True):
        if isinstance(cell, ConfigError):
            rejected.append({"reason": str(cell)})
            continue
        try:
            _, _, techs = validated(cell, dev, cache)
        except ConfigError as e:
            rejected.append({"techniques": named(cell.get("technique"))[0], "reason": str(e)})
            continue
        kk, lab = named(cell.get("technique"))
        why = next((w for t in techs if (w := why_not(t))), None)
        if why:  # the same refusal the technique's apply() gives at run time, found here before any run
            rejected.append({"techniques": kk, "reason": why})
            continue
        a = analytic(wl, techs, run.micro_batch_size, run.world_size, dev, memo)  # activations: per micro-batch
        preds = {"analytic": a}
        pf = cal.peak_factor(kk, family)
        if pf and a["peak_bytes"] is not None:
            preds["calibrated"] = {"peak_bytes": a["peak_bytes"] * pf[0], "records": pf[1], "factor": pf[0]}
        tr, tsrc = time_ratio(kk, techs, dev, cal, family)
        rows.append({
            "label": lab,
            "techniques": kk,
            "kinds": [t.kind for t in techs],
            "overrides": ov,
            "predictions": preds,
            "time_ratio": tr,
            "time_source": tsrc,
            "quality": quality(kk, techs, cal, family),
            "_techs": techs,
        })  # fmt: skip
    return rows, rejected


PREDICTORS = ("simulation", "hybrid", "calibrated", "analytic")  # best first


def finish(r: dict, budget: float, gap: float, batch_size: int, later: dict | None = None) -> None:
    """Decide `fits` and `max_batch` from the best predictor that has a peak; `later`: the same row's best
    prediction at a second batch size (two simulated points make the batch line), else the analytic slope."""
    p = r["predictions"]
    best = next((n for n in PREDICTORS if p.get(n, {}).get("peak_bytes") is not None), None)
    margin = max([t.hybrid_margin for t in r["_techs"]] + [0.0]) if best == "hybrid" else 0.0
    allowed = budget / gap / (1 + margin)  # what the best predictor's own peak may reach
    r.update(best_predictor=best, allocator_gap=gap if gap != 1.0 else None, fit_margin=margin,
             host_bytes=p["analytic"]["host_bytes"])  # fmt: skip
    if best is None:
        r.update(peak_bytes=None, fits=None, max_batch=None, max_batch_source="no prediction (not simulated)")
        return
    r["peak_bytes"] = p[best]["peak_bytes"] * gap
    r["fits"] = p[best]["peak_bytes"] <= allowed
    if later is not None:
        r["max_batch"] = max_batch(p[best], batch_size, later["pred"], later["batch"], allowed)
        r["max_batch_source"] = f"{best} at batch {batch_size} and {later['batch']}, each phase affine in batch"
    elif p["analytic"]["act_per_sample"]:
        r["max_batch"] = max(
            0, batch_size + math.floor((allowed - p[best]["peak_bytes"]) / p["analytic"]["act_per_sample"])
        )
        r["max_batch_source"] = f"analytic activation slope, anchored at {best} (not simulated)"
    else:
        r["max_batch"], r["max_batch_source"] = None, "no batch slope (not simulated)"


def rank_key(r: dict):
    peak = math.inf if r["peak_bytes"] is None else r["peak_bytes"]
    return (r["fits"] is not True, r["time_ratio"], not r["quality"]["exact"], peak)


def plan(user: list[str], pc: PlanConfig, progress=print) -> dict:
    """Enumerate, validate, predict, rank. Returns the JSON-able plan."""
    t0 = time.perf_counter()
    base = compose_cells(user, [[]])[0]
    if isinstance(base, ConfigError):
        raise base
    run, wcfg = build_run(base["run"]), build(base["workload"], "workload")
    dev = device_type_of(run)
    if not run.memory_budget_mib:
        raise ConfigError("run.memory_budget_mib=null: plan needs a budget; e.g. run.memory_budget_mib=81920")
    budget = run.memory_budget_mib * 2**20
    fixed = tuple(base.get("technique") or {})
    # what every candidate contains must be valid on its own: refuse it once rather than reject every candidate
    technique.validate([build(n, f"technique.{k}") for k, n in (base.get("technique") or {}).items()], dev)
    cands = candidates(run.world_size, dev, pc, fixed)
    cells = shared_cells(without_list(user), base, cands)  # read-only, made one at a time
    cal = Calibration(load_records(pc.records, dev))
    wl = fake_workload(wcfg, run.seed)
    family = base["workload"]["_target_"]
    gap = (cal.allocator_gap() or (1.0,))[0] if dev == "cuda" else 1.0
    rows, rejected = _rows(cands, cells, wl, dev, run, cal, family)
    b1 = run.micro_batch_size  # run.grad_accum_steps > 1: one forward/backward holds a micro-batch's activations
    b2 = 2 * b1
    for r in rows:
        finish(r, budget, gap, b1)
    rows.sort(key=rank_key)
    sims: dict[tuple, dict] = {}  # (sim_key, batch) -> simulation
    keys: set[tuple] = set()

    def simulate(k: tuple, techs, b: int) -> dict:
        if (k, b) not in sims:
            try:
                sims[k, b] = sim.simulate(
                    wcfg, techs, b, run.seed, pc.max_layers or None, sim_device(dev), run.grad_accum_steps,
                    run.world_size,
                )  # fmt: skip
            except Exception as e:  # a library that cannot run on fake tensors here: that row keeps its analytic
                sims[k, b] = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}
        return sims[k, b]

    for r in rows:
        k = sim_key(r["_techs"], run.world_size)
        if k not in keys:
            # the budget of distinct simulations goes to the best-ranked; rows nothing else predicts are all simulated
            if len(keys) >= pc.simulate and r["peak_bytes"] is not None:
                continue
            keys.add(k)
            progress(f"membench: simulating {r['label']} ...")
        states = r["predictions"]["analytic"]["states"]
        s1 = simulate(k, r["_techs"], b1)
        if "failed" in s1:  # said in the row, never a crash of the whole plan
            r["simulation_failed"] = s1["failed"]
            progress(f"membench: simulation of {r['label']} failed ({s1['failed']}); its row keeps the analytic")
            continue
        name, pred = simulated(s1, r["_techs"], states, run.world_size)
        _, pred2 = simulated(simulate(k, r["_techs"], b2), r["_techs"], states, run.world_size)
        r["predictions"][name] = pred
        finish(r, budget, gap, b1, later={"pred": pred2, "batch": b2})
        if dev == "cuda" and "allocator" in pred:  # what torch.cuda would report: a prior until a GPU confirms it
            r["allocator"] = {**pred["allocator"], "source": "the simulated step replayed through the CUDA caching "
                              "allocator's rules (membench.simulate.replay_allocator): a prior, not confirmed on a GPU; "
                              "`fits` stays on the tracker's peak"}  # fmt: skip
    rows.sort(key=rank_key)
    for r in rows:
        r.pop("_techs")
        r["predictions"]["analytic"].pop("states")
    return {
        "workload": base["workload"]["preset"],
        "device": dev,
        "world_size": run.world_size,
        "batch_size": run.batch_size,
        "micro_batch_size": run.micro_batch_size,  # predictions and max_batch are per micro-batch
        "budget_mib": run.memory_budget_mib,
        "results_dir": run.results_dir,
        "overrides": user,
        "fixed_techniques": list(fixed),
        "plan": dataclasses.asdict(pc),
        "candidates": len(cands),
        "rejected": rejected,
        "calibration_records": len(cal.records),
        "simulations": len(sims),
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }
