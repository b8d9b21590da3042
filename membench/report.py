"""Derived summaries of records: a markdown table (never hand-written) and one-line run summaries.

Ratios compare each run with the baseline (no techniques) of the same workload preset and batch size in
the same record set: peak and activation bytes, median step time, counted FLOPs.
"""

from __future__ import annotations

from pathlib import Path

from membench.records import latest_by_cell, load_records

MiB = 2**20


def _defaults(target: str) -> dict:
    import dataclasses

    from membench.config import _locate

    try:
        cls = _locate(target)
    except (ImportError, AttributeError):
        return {}
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _label(r: dict) -> str:
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


def _key(r: dict) -> tuple:
    return (r["config"]["workload"].get("preset"), r["config"]["run"]["batch_size"], r["config"]["run"]["seed"])


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def table(records: list[dict]) -> str:
    base = {_key(r): r for r in records if r["status"] == "ok" and not r.get("techniques")}
    head = (
        "| workload | techniques | status | peak MiB | params | grads | optim | act@peak | other | act held MiB "
        "| act pred MiB (err) | act ratio | peak ratio | median step ms | step ratio | FLOPs/step G | FLOPs ratio "
        "| quality |\n|" + "---|" * 18
    )
    rows = [head]
    for r in sorted(records, key=lambda r: (_key(r), len(r.get("techniques") or []), _label(r))):
        wl = f"{r['config']['workload'].get('preset')} b={r['config']['run']['batch_size']}"
        if r["status"] != "ok":
            rows.append(f"| {wl} | {_label(r)} | {r['status']} | " + "- | " * 14 + f"{(r.get('error') or '')[:60]} |")
            continue
        m, t, f, q = r["memory"], r["timing"], r["flops"], r["quality"]
        b = base.get(_key(r))
        cat = m["by_category"]
        held = m["held_after_forward"]["activations"]
        pred = m["predicted_by_category"]["activations"]
        err = m["relative_error"]["activations"]
        bm = b and b["memory"]
        rows.append(
            "| "
            + " | ".join(
                [
                    wl,
                    _label(r),
                    "ok",
                    f"{m['peak_bytes'] / MiB:.1f}",
                    *(f"{cat[k] / MiB:.1f}" for k in ("params", "grads", "optimizer", "activations", "other")),
                    f"{held / MiB:.1f}",
                    f"{pred / MiB:.1f} ({err:+.0%})" if err is not None else "-",
                    _ratio(held, bm and bm["held_after_forward"]["activations"]),
                    _ratio(m["peak_bytes"], bm and bm["peak_bytes"]),
                    f"{t['median_step_s'] * 1e3:.1f}",
                    _ratio(t["median_step_s"], b and b["timing"]["median_step_s"]),
                    f"{f['counted_per_step'] / 1e9:.2f}",
                    _ratio(f["counted_per_step"], b and b["flops"]["counted_per_step"]),
                    f"{q['metric']}={q['value']:.4f}",
                ]
            )
            + " |"
        )
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
