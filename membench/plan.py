"""`membench plan` and `membench fit`: which technique combination makes a workload fit a memory budget.

Enumerates checkpointing x precision x ZeRO stage/offload x 8-bit optimizer x quantized base, rejects invalid
combinations with the same validate()/check() rules as `run`, and predicts each one three ways, labelled:
`analytic` (model states by bytes-per-parameter rules + the workload's activation model), `simulation` /
`hybrid` (a fake-tensor step under MemTracker, per phase, membench/simulate.py; hybrid puts the model states of
techniques that cannot be simulated in place of the simulated ones, phase by phase) and `calibrated` (analytic
scaled by records of the same hardware, membench/calibrate.py). The best available one decides `fits`; a workload
without an analytic activation model (hf, custom) has no analytic peak and the simulation decides. `plan` takes
what `run` takes: `technique=[...]` (with its `technique.X.Y=` knobs) is in every candidate, `plan.techniques`
names the families searched on top of it. No library ranks the whole space (accelerate and DeepSpeed's
estimators cover model states of one configuration), so the search is ours.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from hydra import initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch._subclasses.fake_tensor import FakeTensorMode

from membench import simulate as sim
from membench import technique
from membench.calibrate import Calibration, key, label
from membench.calibrate import load as load_records
from membench.cells import CONF_DIR
from membench.cells import compose as _compose
from membench.config import build, build_run, register_schema
from membench.errors import ConfigError
from membench.predict import model_states
from membench.records import cpu_flags, write_record
from membench.sweep import run_cell
from membench.technique import Prediction

# Each technique declares its planner family, knob values, time prior and hybrid margin (membench/technique.py).
HALF_SPEED = {"cuda": 0.6, "cpu_native": 0.8, "cpu_emulated": 20.0}  # 16-bit step vs fp32


@dataclass
class PlanConfig:
    allow_approximate: bool = True  # false keeps exact techniques only (checkpointing, ZeRO)
    techniques: list[str] = field(default_factory=lambda: list(technique.families()))  # families to combine
    simulate: int = 8  # distinct fake-tensor simulations, spent on the best-ranked candidates
    max_layers: int = 4  # above this many blocks, simulate 2 layer counts and extrapolate per layer
    top: int = 20  # rows printed
    verify: int = 0  # run the top K fitting plans for real and compare
    out: str = ""  # JSON path; default RESULTS_DIR/plan-PRESET.json
    records: list[str] = field(default_factory=lambda: ["results"])  # roots searched for calibration records
    fit_max_runs: int = 8  # membench fit: real runs in the batch search

    def __post_init__(self) -> None:
        fams = technique.families()
        bad = sorted(set(self.techniques) - set(fams))
        if bad:
            raise ConfigError(f"plan.techniques={bad[0]}: unknown family; allowed: {', '.join(fams)}")
        for k in ("simulate", "top", "verify", "fit_max_runs", "max_layers"):
            if getattr(self, k) < 0:
                raise ConfigError(f"plan.{k}={getattr(self, k)}: must be >= 0")


def split_overrides(overrides: list[str]) -> tuple[PlanConfig, list[str]]:
    """`plan.*` overrides -> PlanConfig (typed); the rest go to Hydra."""
    mine = [o for o in overrides if o.startswith("plan.")]
    rest = [o for o in overrides if not o.startswith("plan.")]
    try:
        node = OmegaConf.merge(OmegaConf.structured(PlanConfig), OmegaConf.from_dotlist(mine).get("plan", {}))
    except OmegaConfBaseException as e:
        raise ConfigError(f"plan.{e.full_key}: {str(e).strip().splitlines()[0]}; allowed: "
                          f"{', '.join(f.name for f in dataclasses.fields(PlanConfig))}") from None  # fmt: skip
    return PlanConfig(**OmegaConf.to_container(node)), rest


# ---- enumeration ----------------------------------------------------------------------------------------------
def candidates(world_size: int, device_type: str, pc: PlanConfig, fixed: tuple[str, ...] = ()) -> list[list[str]]:
    """Override lists, one per combination (before validation). `fixed`: kinds every candidate contains (the
    user's technique=[...]); their families are not searched."""
    choices = []  # per family: None (left out) and (kind, knobs) per value its members declare
    for fam, members in technique.families().items():
        if fam not in pc.techniques or any(m.kind in fixed for m in members):
            choices.append([None])  # left out (at N > 1 without a distributed technique, validation says why)
            continue
        values = [(m.kind, v) for m in members if m.exact or pc.allow_approximate
                  for v in m.plan_values(world_size, device_type)]  # fmt: skip
        required = world_size > 1 and any(m.distributed for m in members)
        choices.append(([] if required else [None]) + values)
    out = []
    for combo in itertools.product(*choices):
        picked = [c for c in combo if c is not None]
        ov = [f"technique=[{','.join([*fixed, *(k for k, _ in picked)])}]"]
        ov += [f"technique.{k}.{f}={v}" for k, knobs in picked for f, v in knobs.items()]
        out.append(ov)
    return out


def validated(cfg: dict, device_type: str, cache: dict | None = None):
    """The same rules as `run` (membench.execute.build_all), for a device that need not be present here. `cache`:
    built configs by node (the planner's candidates share their run, workload and most technique nodes; building
    each through OmegaConf was a fifth of a llama_8b plan)."""

    def once(key: str, node: dict, make):
        if cache is None:
            return make(node)
        ck = (key, json.dumps(node, sort_keys=True, default=str))
        if ck not in cache:
            cache[ck] = make(node)
        return cache[ck]

    run = once("run", cfg["run"], build_run)
    wcfg = once("workload", cfg["workload"], lambda n: build(n, "workload"))
    techs = [
        once(k, n, functools.partial(build, key=f"technique.{k}")) for k, n in (cfg.get("technique") or {}).items()
    ]
    technique.validate(techs, device_type)
    if run.world_size > 1 and not any(t.distributed for t in techs):  # execute.build_all's rule
        need = " or ".join(technique.distributed_kinds())
        raise ConfigError(f"run.world_size={run.world_size}: needs technique {need} (stage 0 is plain DDP)")
    return run, wcfg, techs


def compose_cells(user: list[str], extra: list[list[str]]) -> list[dict | ConfigError]:
    """Compose user overrides + each candidate's; a ConfigError in place of a cell that fails composition."""

    register_schema()
    out: list = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for ov in extra:
            try:
                out.append(OmegaConf.to_container(_compose([*user, *ov]), resolve=True))
            except ConfigError as e:
                out.append(e)
    return out


def fast_cells(user: list[str], base: dict, extra: list[list[str]]) -> list[dict]:
    """The same dicts compose_cells would give, from one Hydra composition: technique nodes are independent
    group members, so each candidate copies the ones it names and sets its `technique.K.F=V` overrides.
    (Composing hundreds of candidates through Hydra took minutes on this machine.)"""

    kinds = sorted({k for ov in extra for k in ov[0].split("=", 1)[1].strip("[]").split(",") if k})
    nodes = compose_cells(user, [[f"technique=[{','.join(kinds)}]"]])[0]["technique"] if kinds else {}
    out = []
    for ov in extra:
        cell = copy.deepcopy(base)
        cell["technique"] = {k: copy.deepcopy(nodes[k]) for k in ov[0].split("=", 1)[1].strip("[]").split(",") if k}
        for o in ov[1:]:
            path, value = o.split("=", 1)
            _, kind, fld = path.split(".")
            cell["technique"][kind][fld] = yaml.safe_load(value)
        out.append(cell)
    return out


# ---- prediction ----------------------------------------------------------------------------------------------
def device_type_of(run) -> str:
    if run.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return run.device


def fake_workload(wcfg, seed: int):

    with FakeTensorMode(allow_non_fake_inputs=True):
        return wcfg.build(seed)


def analytic(wl, techs, batch_size: int, world_size: int) -> dict:
    """Model states by each technique's pure `states` step plus the workload's activation model. A workload
    without an activation model (hf, custom) gives activations None and no peak: the simulation decides."""

    pred = Prediction(param_bytes=4, grad_bytes=4, optimizer_bytes=8)
    for t in techs:
        t.activation_terms(pred)
    states = model_states(wl.model, wl.blocks(), techs, world_size)

    # a loss that never holds the full logits (fused cross-entropy) is passed only where a technique set it: the
    # activation models without an LM head (digits, custom) take no such argument
    chunk = {} if pred.loss_chunk_tokens is None else {"loss_chunk_tokens": pred.loss_chunk_tokens}

    def act(b: int) -> float | None:
        autocast = pred.autocast_dtype is not None
        return wl.activation_model(b, pred.act_elem_bytes, pred.checkpoint, autocast=autocast, **chunk)["total"]

    acts = act(batch_size)
    by_cat = {**states["device"], "activations": acts, **states["other"]}  # other: named buffers (DeepSpeed's bucket)
    return {
        "peak_bytes": None if acts is None else sum(by_cat.values()),
        "by_category": by_cat,
        "host_bytes": sum(states["host"].values()),
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


def sim_key(techs) -> tuple:
    """Candidates whose simulated techniques are equal configs (frozen dataclasses: every knob) share a simulation."""
    s, _ = sim.split(techs)
    return tuple(sorted((t.kind, repr(t)) for t in s))


def simulated(s: dict, techs, states: dict) -> tuple[str, dict]:
    """("simulation", s) when every technique ran on fake tensors; else ("hybrid", s with the full model states
    of all techniques put in place of the simulated ones at every phase: simulate.replace_states)."""
    _, left = sim.split(techs)
    keep = {k: s[k] for k in ("method", "seconds", "device") if k in s}
    if not left:
        return "simulation", {**s, **keep}
    h = sim.replace_states(s, states["device"], states["other"])
    return "hybrid", {**h, **keep, "simulated_peak_bytes": s["peak_bytes"], "left_out": [t.kind for t in left]}


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


def _is_list(o: str) -> bool:
    """The `technique=[...]` override itself (not a `technique.X.Y=` knob)."""
    return o.lstrip("+~").split("=", 1)[0] == "technique"


def without_list(user: list[str]) -> list[str]:
    """User overrides less `technique=[...]`: each candidate names the full list (the user's kinds first)."""
    return [o for o in user if not _is_list(o)]


def _rows(cands, cells, wl, dev, run, cal, family) -> tuple[list[dict], list[dict]]:
    """Validate each composed candidate; give the valid ones their analytic and calibrated predictions."""
    rows, rejected, cache = [], [], {}
    for ov, cell in zip(cands, cells, strict=True):
        if isinstance(cell, ConfigError):
            rejected.append({"reason": str(cell)})
            continue
        try:
            _, _, techs = validated(cell, dev, cache)
        except ConfigError as e:
            rejected.append({"techniques": key(cell.get("technique")), "reason": str(e)})
            continue
        kk = key(cell.get("technique"))
        why = next((w for t in techs if (w := t.check_model(wl.model, wl.blocks()))), None)
        if why:  # the same refusal the technique's apply() gives at run time, found here before any run
            rejected.append({"techniques": kk, "reason": why})
            continue
        a = analytic(wl, techs, run.batch_size, run.world_size)
        preds = {"analytic": a}
        pf = cal.peak_factor(kk, family)
        if pf and a["peak_bytes"] is not None:
            preds["calibrated"] = {"peak_bytes": a["peak_bytes"] * pf[0], "records": pf[1], "factor": pf[0]}
        tr, tsrc = time_ratio(kk, techs, dev, cal, family)
        rows.append({
            "label": label(cell.get("technique")),
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
    cells = fast_cells(without_list(user), base, cands)
    cal = Calibration(load_records(pc.records, dev))
    wl = fake_workload(wcfg, run.seed)
    family = base["workload"]["_target_"]
    gap = (cal.allocator_gap() or (1.0,))[0] if dev == "cuda" else 1.0
    rows, rejected = _rows(cands, cells, wl, dev, run, cal, family)
    b1 = run.batch_size
    b2 = 2 * b1
    for r in rows:
        finish(r, budget, gap, b1)
    rows.sort(key=rank_key)
    sims: dict[tuple, dict] = {}  # (sim_key, batch) -> simulation
    keys: set[tuple] = set()

    def simulate(k: tuple, techs, b: int) -> dict:
        if (k, b) not in sims:
            sims[k, b] = sim.simulate(wcfg, techs, b, run.seed, pc.max_layers or None, sim_device(dev))
        return sims[k, b]

    for r in rows:
        k = sim_key(r["_techs"])
        if k not in keys:
            # the budget of distinct simulations goes to the best-ranked; rows nothing else predicts are all simulated
            if len(keys) >= pc.simulate and r["peak_bytes"] is not None:
                continue
            keys.add(k)
            progress(f"membench: simulating {r['label']} ...")
        states = r["predictions"]["analytic"]["states"]
        name, pred = simulated(simulate(k, r["_techs"], b1), r["_techs"], states)
        _, pred2 = simulated(simulate(k, r["_techs"], b2), r["_techs"], states)
        r["predictions"][name] = pred
        finish(r, budget, gap, b1, later={"pred": pred2, "batch": b2})
    rows.sort(key=rank_key)
    for r in rows:
        r.pop("_techs")
        r["predictions"]["analytic"].pop("states")
    return {
        "workload": base["workload"]["preset"],
        "device": dev,
        "world_size": run.world_size,
        "batch_size": run.batch_size,
        "budget_mib": run.memory_budget_mib,
        "results_dir": run.results_dir,
        "overrides": user,
        "fixed_techniques": list(fixed),
        "plan": dataclasses.asdict(pc),
        "candidates": len(cells),
        "rejected": rejected,
        "calibration_records": len(cal.records),
        "simulations": len(sims),
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }


def sim_device(device_type: str) -> str:
    """Fake tensors on the planned device where it exists here; CPU kernels otherwise (labelled in the JSON)."""
    return "cuda" if device_type == "cuda" and torch.cuda.is_available() else "cpu"


def device_type_of_cfg(cfg: dict) -> str:
    d = cfg["run"]["device"]
    return ("cuda" if torch.cuda.is_available() else "cpu") if d == "auto" else d


def table(result: dict, top: int) -> str:
    mib = 2**20
    lines = [
        f"plan: {result['workload']} on {result['device']} x{result['world_size']}, batch {result['batch_size']}, "
        f"budget {result['budget_mib']:g} MiB; {len(result['rows'])} valid of {result['candidates']} "
        f"({len(result['rejected'])} rejected), {result['simulations']} simulation(s), {result['seconds']:.0f} s",
        "| # | techniques | fits | peak MiB | by | analytic MiB | host MiB | max batch | step x | quality |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda v: "n/a" if v is None else f"{v / mib:.1f}"  # noqa: E731
    for i, r in enumerate(result["rows"][:top], 1):
        q = r["quality"]
        qt = q["risk"] + (f" ({q['metric']} {q['delta']:+.3f})" if "delta" in q else "")
        fits = {True: "yes", False: "no", None: "?"}[r["fits"]]
        lines.append(
            f"| {i} | {r['label']} | {fits} | {f(r['peak_bytes'])} | {r['best_predictor'] or 'none'} | "
            f"{f(r['predictions']['analytic']['peak_bytes'])} | {r['host_bytes'] / mib:.1f} | "
            f"{'n/a' if r['max_batch'] is None else r['max_batch']} | "
            f"{r['time_ratio']:.2f} ({r['time_source'].split(' ')[0]}) | {qt} |"
        )
    return "\n".join(lines)


def write_json(result: dict, path: str) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=1, default=str))
    return p


# ---- verification and fit: real runs, one child process each (membench.runner.run_cell) ------------------------
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


def verify(result: dict, user: list[str], k: int, progress=print) -> list[dict]:
    """Run the top `k` plans predicted to fit; compare predicted and measured peak (and step time)."""

    cal = Calibration(load_records(result["plan"]["records"], result["device"]))
    base_step = cal.baseline_step_s(result["workload"], result["batch_size"])
    out = []
    for r in [r for r in result["rows"] if r["fits"]][:k]:
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


def verify_table(checks: list[dict]) -> str:
    mib = 2**20
    lines = [
        "| techniques | status | predicted MiB (by) | measured MiB | error | step vs #1 pred | step vs #1 meas |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        m = c["measured"]
        f = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
        lines.append(
            f"| {c['label']} | {m['status']} | {c['predicted_peak_bytes'] / mib:.1f} ({c['predictor']}) | "
            f"{f(m['peak_bytes'] and m['peak_bytes'] / mib, '.1f')} | {f(c['peak_error'], '+.1%')} | "
            f"{f(c.get('step_vs_first', {}).get('predicted'), '.2f')} | {f(c.get('step_vs_first', {}).get('measured'), '.2f')} |"
        )
    return "\n".join(lines)


def predict_one(cfg: dict, pc: PlanConfig, batch_size: int | None = None) -> dict:
    """Best prediction (simulation, else hybrid: never analytic, which some workloads lack) of one composed config."""
    run, wcfg, techs = validated(cfg, device_type_of_cfg(cfg))
    b = batch_size or run.batch_size
    wl = fake_workload(wcfg, run.seed)
    a = analytic(wl, techs, b, run.world_size)
    s = sim.simulate(wcfg, techs, b, run.seed, pc.max_layers or None, sim_device(device_type_of_cfg(cfg)))
    name, pred = simulated(s, techs, a["states"])
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


def _fits_measured(status: str) -> str:
    """What a run says about fitting: yes (ok), no (oom), else its status (an error or timeout proves nothing)."""
    return {"ok": "yes", "oom": "no"}.get(status, status)


def study_table(records: list[dict]) -> str:
    """Predicted vs measured peak of every verified plan (records carrying `plan_check`), for docs/plan.md."""
    mib = 2**20
    lines = [
        "| workload | batch | budget MiB | techniques | status | predictor | predicted MiB | measured MiB | error "
        "| analytic error | fits (pred/meas) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted((r for r in records if "plan_check" in r), key=lambda r: r["run_id"]):
        c, m = r["plan_check"], r["plan_check"]["measured"]
        ae = c["peak_error_by"].get("analytic")
        meas = "n/a" if m["peak_bytes"] is None else f"{m['peak_bytes'] / mib:.2f}"
        err = "n/a" if c["peak_error"] is None else f"{c['peak_error']:+.1%}"
        lines.append(
            f"| {r['config']['workload']['preset']} | {r['config']['run']['batch_size']} | {c['budget_mib']:g} | "
            f"{c.get('label', c['techniques'])} | {m['status']} | {c['predictor']} | "
            f"{c['predicted_peak_bytes'] / mib:.2f} | {meas} | {err} | {'n/a' if ae is None else f'{ae:+.1%}'} | "
            f"{'yes' if c['predicted_fits'] else 'no'}/{_fits_measured(m['status'])} |"
        )
    return "\n".join(lines)
