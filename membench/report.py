"""Derived summaries of records: a markdown table (never hand-written) and one-line run summaries.

Ratios compare each run with the baseline (no techniques) of the same workload preset and batch size in
the same record set: peak and activation bytes, median step time, counted FLOPs.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from membench.config import locate
from membench.records import config_hash, latest_by_cell, load_records
from membench.sections import CATEGORIES, PREDICTED_CATEGORIES, UNTRACKED

MiB = 2**20


def _defaults(target: str) -> dict:
    try:
        cls = locate(target)
    except (ImportError, AttributeError):
        return {}
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def label(r: dict) -> str:
    """Technique names with the knobs that differ from their dataclass defaults, e.g. `zero(stage=3)`."""
    parts = []
    for t in r.get("techniques") or []:
        node = r["config"]["technique"][t]
        defaults = _defaults(node.get("_target_", ""))
        knobs = ",".join(f"{k}={v}" for k, v in node.items() if k != "_target_" and defaults.get(k, object()) != v)
        parts.append(f"{t}({knobs})" if knobs else t)
    return " + ".join(parts) or "baseline"


def summary_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {r.get('error')}"
    m, t, q = r["memory"], r["timing"], r["quality"]
    return (
        f"ok  peak {m['peak_bytes'] / MiB:.1f} MiB (act held {m['held_after_forward']['activations'] / MiB:.1f})"
        f"  step {t['median_step_s'] * 1e3:.1f} ms  {t['samples_per_s']:.1f} samples/s"
        f"  {q['metric']} {q['value']:.4f}"
    )


def cell_key(r: dict) -> tuple:
    return (r["config"]["workload"].get("preset"), r["config"]["run"]["batch_size"], r["config"]["run"]["seed"])


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def seed_group(r: dict) -> str:
    """The cell without its seed: records of one group differ only by run.seed."""
    cfg = json.loads(json.dumps(r["config"]))
    cfg.get("run", {}).pop("seed", None)
    return config_hash(cfg)


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% Student-t interval (None for a single value)."""
    if len(values) < 2:
        return values[0], None
    from scipy.stats import t

    return statistics.mean(values), t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5


def _num(values: list[float], fmt: str, scale: float = 1.0) -> str:
    m, half = mean_ci([v / scale for v in values])
    return format(m, fmt) + (f" ± {format(half, fmt)}" if half is not None else "")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _step(rs: list[dict], b) -> str:
    """Median step time; with one seed, its spread over the timed steps (IQR) beside it."""
    if len(rs) == 1:
        t = rs[0]["timing"]
        return f"{t['median_step_s'] * 1e3:.1f} ({t['iqr_step_s'] * 1e3:.1f})"
    return _num([r["timing"]["median_step_s"] for r in rs], ".1f", 1e-3)


# CPU instructions that run bf16 dot products natively (AVX512-BF16, AMX tiles); without them autocast emulates
# 16-bit arithmetic in fp32 and its step times say nothing about the technique (records carry env.cpu_flags).
BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16"}


def half_emulated(r: dict) -> bool:
    """From the record's fields: timed on a CPU, with a 16-bit compute technique, and the CPU's recorded flags
    lack bf16 instructions. A record without env.cpu_flags (older schema) is not labelled: unknown is not emulated."""
    env = r.get("env") or {}
    flags = env.get("cpu_flags")
    if (r["timing"].get("device") or env.get("device")) != "cpu" or flags is None or BF16_CPU_FLAGS & set(flags):
        return False
    for node in ((r.get("config") or {}).get("technique") or {}).values():
        try:
            if getattr(locate(node["_target_"]), "half_precision", False):
                return True
        except (ImportError, AttributeError, KeyError, TypeError):
            continue
    return False


def time_caveat(rs: list[dict], b=None) -> str:
    """Why a time in this row may not mean what it seems: a loaded machine, emulated 16-bit arithmetic."""
    out = []
    loads = [(r["timing"].get("load") or {}) for r in rs]
    if any(ld.get("loaded") for ld in loads):
        worst = max(ld["start"]["load_avg_1m"] for ld in loads if ld.get("loaded"))
        out.append(f"loaded machine (load {worst:.1f} on {loads[0]['cpu_count']} cores)")
    if any(half_emulated(r) for r in rs):
        out.append("bf16 emulated on this CPU")
    return "; ".join(out) or "-"


# One column per entry: header and a function of (ok records of one seed group, their baseline group or []).
# Numbers over several seeds print as "mean ± 95% half-width"; ratios divide the means.
def _cat(*keys: str):
    """The tracker's split at the peak, summed over `keys` (a category a record lacks counts 0)."""
    return lambda rs, b: _num([sum(r["memory"]["by_category"].get(k, 0) for k in keys) for r in rs], ".1f", MiB)


def _act_held(r: dict) -> float:
    return r["memory"]["held_after_forward"]["activations"]


def _pred(rs: list[dict], b: list[dict]) -> str:
    m = rs[0]["memory"]
    err = (
        _mean([r["memory"]["relative_error"]["activations"] for r in rs])
        if m["relative_error"]["activations"] is not None
        else None
    )
    return f"{m['predicted_by_category']['activations'] / MiB:.1f} ({err:+.0%})" if err is not None else "-"


def _ratio_of(get):
    return lambda rs, b: _ratio(_mean([get(r) for r in rs]), b and _mean([get(r) for r in b]))


def _quality(rs: list[dict], b: list[dict]) -> str:
    return f"{rs[0]['quality']['metric']}={_num([r['quality']['value'] for r in rs], '.4f')}"


def _host_bytes(r: dict) -> int | None:
    """A device run's host bytes at the host's own peak (offloaded states, pinned buffers); None on a CPU run."""
    m = r["memory"]
    host = (m.get("by_device") or {}).get("cpu")
    return host["tracker_peak_bytes"] if host and m.get("device_name") != "cpu" else None


HOST_COLUMN = "host MiB"
COLUMNS = [
    ("peak MiB", lambda rs, b: _num([r["memory"]["peak_bytes"] for r in rs], ".1f", MiB)),
    # shown only when a row ran on an accelerator and held host bytes: they are never added to the device's peak
    (
        HOST_COLUMN,
        lambda rs, b: "-" if _host_bytes(rs[0]) is None else _num([_host_bytes(r) or 0 for r in rs], ".1f", MiB),
    ),
    ("params", _cat("params")),
    ("grads", _cat("grads")),
    ("optim", _cat("optimizer")),
    ("act@peak", _cat("activations")),
    # temporaries of backward and of the optimizer step, anything else the tracker saw, and on CUDA `untracked`
    ("temp+other", _cat(*(c for c in (*CATEGORIES, UNTRACKED) if c not in PREDICTED_CATEGORIES))),
    ("act held MiB", lambda rs, b: _num([_act_held(r) for r in rs], ".1f", MiB)),
    ("act pred MiB (err)", _pred),
    ("act ratio", _ratio_of(_act_held)),
    ("peak ratio", _ratio_of(lambda r: r["memory"]["peak_bytes"])),
    ("median step ms (IQR)", _step),
    ("step ratio", _ratio_of(lambda r: r["timing"]["median_step_s"])),
    ("FLOPs/step G", lambda rs, b: _num([r["flops"]["counted_per_step"] for r in rs], ".2f", 1e9)),
    ("FLOPs ratio", _ratio_of(lambda r: r["flops"]["counted_per_step"])),
    ("quality", _quality),
    ("time caveat", time_caveat),
]


def table(records: list[dict]) -> str:
    """One row per cell; cells that differ only by run.seed share a row (mean ± 95% interval, n seeds)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        if r["status"] == "ok":
            groups.setdefault(seed_group(r), []).append(r)
    base = {cell_key(rs[0])[:2]: rs for rs in groups.values() if not rs[0].get("techniques")}
    host = any(_host_bytes(r) for rs in groups.values() for r in rs)
    columns = [c for c in COLUMNS if host or c[0] != HOST_COLUMN]
    head = "| workload | techniques | status | " + " | ".join(h for h, _ in columns) + " |"
    rows = [head, "|" + "---|" * (3 + len(columns))]
    entries = [[r] for r in records if r["status"] != "ok"] + list(groups.values())
    for rs in sorted(entries, key=lambda rs: (cell_key(rs[0]), len(rs[0].get("techniques") or []), label(rs[0]))):
        r = rs[0]
        wl = f"{r['config']['workload'].get('preset')} b={r['config']['run']['batch_size']}"
        if len(rs) > 1:
            wl += f" ({len(rs)} seeds)"
        if r["status"] != "ok":
            filler = "- | " * (len(columns) - 1)
            rows.append(f"| {wl} | {label(r)} | {r['status']} | {filler}{(r.get('error') or '')[:60]} |")
            continue
        b = base.get(cell_key(r)[:2]) or []
        rows.append("| " + " | ".join([wl, label(r), "ok", *(fn(rs, b) for _, fn in columns)]) + " |")
    return "\n".join(rows)


def write_report(results_dir: str, out: str | None = None, experiment: str | None = None) -> str:
    records = list(latest_by_cell(load_records(results_dir)).values())
    if experiment:
        records = [r for r in records if r.get("experiment") == experiment]
    title = f"# membench report: {experiment or 'all records'} ({len(records)} runs, latest per cell)\n\n"
    text = title + (table(records) if records else "no records") + "\n"
    path = Path(out) if out else Path(results_dir) / (f"REPORT-{experiment}.md" if experiment else "REPORT.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text
