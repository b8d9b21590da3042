"""Tables: a plan's ranked rows, a verification's predicted vs measured, the verified-plans study; the JSON file."""

from __future__ import annotations

import json
from pathlib import Path


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


def _reached(r: dict) -> int | None:
    """The measured peak: an ok run's, or the figure an oom run reached (on CPU the tracker peak of its measured
    step, checked against the budget after the step: `memory.peak_source`)."""
    m = r["plan_check"]["measured"]
    if m["peak_bytes"] is not None:
        return m["peak_bytes"]
    return (r.get("memory") or {}).get("peak_bytes") if m["status"] == "oom" else None


def verified_table(records: list[dict]) -> str:
    """The verified study (scripts/verify_study.py): each cell's prediction by every predictor against the measured
    peak (an oom run's reached peak included), the status and the planner's `fits` against the run's."""
    mib = 2**20
    lines = [
        "| workload | batch | ranks | techniques | budget MiB | predicted MiB (by) | measured MiB | simulation error "
        "| hybrid error | analytic error | status | fits (pred/meas) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted((r for r in records if "plan_check" in r), key=lambda r: r["run_id"]):
        c, m, run = r["plan_check"], r["plan_check"]["measured"], r["config"]["run"]
        got = _reached(r)
        by = c.get("predicted_by") or {}

        def err(name: str, by=by, got=got) -> str:
            p = by.get(name)
            return "-" if p is None else "n/a" if not got else f"{(p - got) / got:+.1%}"

        meas = "n/a" if got is None else f"{got / mib:.2f}" + (" (at oom)" if m["status"] == "oom" else "")
        wl = r["config"]["workload"]
        preset = wl["preset"] + (f" ({wl['model_type']})" if wl["preset"] == "hf" else "")
        preset += f" (vocab {wl['vocab_size']})" if wl.get("vocab_size", 0) > 4096 else ""
        batch = f"{run['batch_size']}" + (f" ({run['grad_accum_steps']} x {run['batch_size'] // run['grad_accum_steps']})"
                                         if run.get("grad_accum_steps", 1) > 1 else "")  # fmt: skip
        tech = c.get("label", c["techniques"])
        for node in (r["config"].get("technique") or {}).values():
            # the label names no backend: a technique's backend (and DeepSpeed's bucket size where it is not
            # DeepSpeed's default) tell its cells apart
            if "backend" in node:
                small = node["backend"] == "deepspeed" and node.get("reduce_bucket_size", 500_000_000) != 500_000_000
                tech += f" ({node['backend']}" + (f", buckets {node['reduce_bucket_size']:.0e}" if small else "") + ")"
        lines.append(
            f"| {preset} | {batch} | {run.get('world_size', 1)} | {tech} | "
            f"{c['budget_mib']:g} | {c['predicted_peak_bytes'] / mib:.2f} ({c['predictor']}) | {meas} | "
            f"{err('simulation')} | {err('hybrid')} | {err('analytic')} | {m['status']} | "
            f"{'yes' if c['predicted_fits'] else 'no'}/{_fits_measured(m['status'])} |"
        )
    return "\n".join(lines)
