"""Study tables: markdown rendered from records for the study pages (docs/studies/{quantization,pruning,zero_stages}.md).

They read records only (technique_info fields written by techniques/), so the harness never imports techniques.
`python -m membench.studies {quantization,pruning,zero_stages} RESULTS_DIR` prints one; membench.readme fills the pages.
"""

from __future__ import annotations

import sys

from membench.report import cell_key, label, seed_group, time_caveat
from membench.sections import MODEL_STATES


def quantization_table(records: list[dict]) -> str:
    """Markdown table of quantization records: bytes/param, model states, peak, step-time and quality deltas."""
    ok = [r for r in records if r["status"] == "ok"]
    base = {cell_key(r): r for r in ok if not r.get("techniques")}
    head = (
        "| workload | techniques | weight bits/param meas. (formula) | params MiB | optim MiB | optim B/trainable "
        "| trainable params | peak MiB | peak ratio | step ratio | quality | delta vs baseline | before PTQ |\n"
        + "|---" * 13
        + "|"
    )
    rows = [head]
    for r in sorted(ok, key=lambda r: (cell_key(r), label(r))):
        b, info, m, q = base.get(cell_key(r)), r.get("technique_info") or {}, r["memory"], r["quality"]
        bits = next((v for k, v in info.items() if k.endswith("bits_per_param_measured")), None)
        formula = next((v for k, v in info.items() if k.endswith("bits_per_param_formula")), None)
        # weight_quant freezes its int layers after training: its info keeps the count trained
        ntrain = next((v for k, v in info.items() if k.endswith("trainable_params")), None)
        ntrain = ntrain or r["workload"]["num_trainable_params"]
        st = m["model_states"]
        before = info.get("weight_quant.quality_before")
        cells = [
            f"{r['workload']['preset']} b={r['config']['run']['batch_size']}",
            label(r),
            f"{bits:.3f} ({formula:.3f})" if bits is not None else "32 (fp32)",
            f"{st['params'] / 2**20:.2f}",
            f"{st['optimizer'] / 2**20:.2f}",
            f"{st['optimizer'] / ntrain:.2f}",
            f"{ntrain:,}",
            f"{m['peak_bytes'] / 2**20:.1f}",
            f"{m['peak_bytes'] / b['memory']['peak_bytes']:.2f}" if b else "-",
            f"{r['timing']['median_step_s'] / b['timing']['median_step_s']:.2f}" if b else "-",
            f"{q['metric']}={q['value']:.4f}",
            f"{q['value'] - b['quality']['value']:+.4f}" if b else "-",
            f"{before:.4f}" if before is not None else "-",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def pruning_table(records: list[dict]) -> str:
    """Quality before/right after/after fine-tune and storage per pruned cell, from the records (derived)."""
    rs = [r for r in records if r["status"] == "ok"]
    rs = [r for r in rs if set(r["techniques"]) & {"prune_structured", "prune_unstructured"} or not r["techniques"]]
    key = lambda r: (r["config"]["workload"]["preset"], r["config"]["run"]["seed"])  # noqa: E731
    base = {key(r): r for r in rs if not r["techniques"]}
    rows = [
        "| workload | seed | cell | realised | before pruning | right after | after fine-tune | dense baseline "
        "| pruned weights dense / CSR-int64 / CSR-int32 KiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rs, key=lambda r: (*key(r), r["run_id"])):
        if r["techniques"]:
            rows.append(_pruning_row(r, base.get(key(r))))
    return "\n".join(rows)


def _pruning_row(r: dict, base: dict | None) -> str:
    kind = next(k for k in r["techniques"] if k.startswith("prune_"))
    node, info = r["config"]["technique"][kind], r["technique_info"]
    g = lambda key: info.get(f"{kind}.{key}")  # noqa: E731
    if kind == "prune_unstructured":
        cell, f = f"unstructured {node['sparsity']:.0%} {node['schedule']}", g("final")
        real = f"{f['sparsity']:.1%} zero ({f['value_dtype'].removeprefix('torch.')})"
        store = " / ".join(f"{f[x] / 1024:.0f}" for x in ("dense_bytes", "csr_int64_bytes", "csr_int32_bytes"))
    else:
        # records before amount_of existed stated ratio in channels
        cell = f"structured {node['ratio']:.0%} of {node.get('amount_of', 'channels')}"
        store, heads = "-", g("heads_per_layer")
        real = f"-{g('params_removed_fraction'):.1%} params" + (f", {heads[0]} heads/layer" if heads else "")
    cell += "".join(f" + {k}" for k in r["techniques"] if k != kind)
    after = f"{g('quality_pruned')['value']:.4f}" if g("quality_pruned") else "-"
    dense = f"{base['quality']['value']:.4f}" if base else "-"
    return (
        f"| {r['config']['workload']['preset']} | {r['config']['run']['seed']} | {cell} | {real} | {g('quality_dense')['value']:.4f} | {after} "
        f"| {r['quality']['value']:.4f} ({r['config']['run']['train_steps']} steps) | {dense} | {store} |"
    )


MiB = 2**20
_STATE_KEYS = ("params", "grads", "optimizer", "fp32_master")


def _precision(r: dict) -> str:
    """The mixed precision a zero run recorded (technique_info["zero.mixed_precision"]): fp32, autocast, or the
    wrapper's own policy with its parameter and reduction dtypes."""
    mp = (r.get("technique_info") or {}).get("zero.mixed_precision") or {}
    if mp.get("policy", "none") == "none":
        return mp.get("param_dtype", "float32")
    if mp["policy"] == "autocast":
        return f"autocast {mp['autocast_dtype']}"
    return f"{mp['policy']} (param {mp['param_dtype']}, reduce {mp['reduce_dtype']})"


def zero_table(records: list[dict]) -> str:
    """Markdown table of zero runs (latest per cell): per-rank model states measured (max over ranks) by category
    vs the ZeRO paper's per-rank formula, DeepSpeed's estimator, peak, step time and communication per step."""
    head = (
        "| backend | stage | as the library names it | precision | N | status | params MiB | grads MiB | optim MiB | fp32 master MiB | states MiB "
        "| paper pred MiB | meas/pred | DS estimator MiB | vs stage 0 | peak MiB | unsharded params MiB "
        "| step ms | comm (paper units) / Psi | paper | last train-step loss |\n|" + "---|" * 21
    )
    rows, base = [head], {}
    zs = [r for r in records if "zero" in (r.get("techniques") or [])]
    key = lambda r: (r["config"]["technique"]["zero"]["backend"], _precision(r), r["config"]["run"]["world_size"])  # noqa: E731
    for r in zs:
        if r["status"] == "ok" and r["config"]["technique"]["zero"]["stage"] == 0:
            base[key(r)] = sum(r["memory"]["model_states"].get(k, 0) for k in _STATE_KEYS)
    for r in sorted(zs, key=lambda r: (*key(r), r["config"]["technique"]["zero"]["stage"])):
        z, n = r["config"]["technique"]["zero"], r["config"]["run"]["world_size"]
        info = r.get("technique_info") or {}
        named = f"{z['backend']} | {z['stage']} | {info.get('zero.library_name', '-')} | {_precision(r)}"
        if r["status"] != "ok":
            rows.append(f"| {named} | {n} | {r['status']} |" + " - |" * 15)
            continue
        m = r["memory"]
        st = m["model_states"]
        total = sum(st.get(k, 0) for k in _STATE_KEYS)
        pred = sum(m["predicted_by_category"][k] for k in MODEL_STATES)
        est = info.get("zero.deepspeed_estimator")
        comm = (r.get("distributed") or {}).get("communication") or {}
        psi = info.get("zero.psi") or 1
        b = base.get(key(r))
        cells = [
            named,
            str(n),
            "ok",
            *(f"{st.get(k, 0) / MiB:.2f}" for k in _STATE_KEYS),
            f"{total / MiB:.2f}",
            f"{pred / MiB:.2f}",
            f"{total / pred:.2f}",
            f"{est['device_bytes'] / MiB:.2f}" if est else "-",
            f"{b / total:.2f}x" if b else "-",
            f"{m['peak_bytes'] / MiB:.1f}",
            f"{m['by_category'].get('params_unsharded', 0) / MiB:.2f}",
            f"{r['timing']['median_step_s'] * 1e3:.0f}",
            f"{comm['paper_elements'] / psi:.2f}" if comm else "-",
            f"{comm['expected']['factor_of_psi']}" if comm.get("expected") else "-",
            f"{r['quality']['loss_curve'][-1]:.4f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def techniques_table(records: list[dict], predicted: dict | None = None) -> str:
    """The techniques study: each cell's measured peak and its saving against the baseline, beside the planner's
    predicted saving (results/techniques/predicted.json, `scripts/predict_study.py`), step-time ratio and quality.

    A row is a seed group (cells differing only in run.seed). Savings are baseline minus cell, in MiB of the
    tracker's peak; "saving error" is (predicted - measured) / measured saving. Rows whose records disagree in
    peak across seeds print the mean.
    """
    pred = (predicted or {}).get("cells", {})
    ok = [r for r in records if r["status"] == "ok"]
    groups: dict[str, list[dict]] = {}
    for r in ok:
        groups.setdefault(seed_group(r), []).append(r)
    base = next((g for g in groups.values() if not g[0].get("techniques") and _accum(g[0]) == 1), None)
    head = (
        "| techniques | seeds | peak MiB | saving MiB (%) | predicted peak MiB | predicted saving MiB | saving error "
        "| step ratio | eval loss | loss vs baseline | time caveat |\n" + "|---" * 11 + "|"
    )
    rows = [head]
    if base is None:
        return head + "\n(no baseline cell)"
    b_peak = _avg([r["memory"]["peak_bytes"] for r in base])
    b_pred = _avg([pred[r["config_hash"]]["peak_bytes"] for r in base if r["config_hash"] in pred])
    b_step = _avg([r["timing"]["median_step_s"] for r in base])
    b_loss = _avg([r["quality"]["value"] for r in base])

    def order(g: list[dict]) -> tuple:
        return (g is not base, len(g[0].get("techniques") or []), label(g[0]))

    for g in sorted(groups.values(), key=order):
        peak = _avg([r["memory"]["peak_bytes"] for r in g])
        p = [pred[r["config_hash"]]["peak_bytes"] for r in g if r["config_hash"] in pred]
        saving = b_peak - peak
        p_peak = _avg(p) if p else None
        p_saving = b_pred - p_peak if p_peak is not None and b_pred is not None else None
        err = (p_saving - saving) / saving if p_saving is not None and g is not base and abs(saving) > 0 else None
        losses = [r["quality"]["value"] for r in g]
        name = label(g[0]) + (f" (grad_accum_steps={_accum(g[0])})" if _accum(g[0]) > 1 else "")
        cells = [
            name,
            str(len(g)),
            f"{peak / MiB:.1f}",
            "-" if g is base else f"{saving / MiB:.1f} ({saving / b_peak:.0%})",
            f"{p_peak / MiB:.1f}" if p_peak is not None else "-",
            "-" if g is base or p_saving is None else f"{p_saving / MiB:.1f}",
            f"{err:+.1%}" if err is not None else "-",
            f"{_avg([r['timing']['median_step_s'] for r in g]) / b_step:.2f}",
            _spread(losses),
            "-" if g is base else f"{_avg(losses) - b_loss:+.4f}",
            time_caveat(g),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _accum(r: dict) -> int:
    return int(r["config"]["run"].get("grad_accum_steps", 1) or 1)


def _avg(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _spread(values: list[float]) -> str:
    """Mean, and min-max over seeds when there are several."""
    m = _avg(values)
    return f"{m:.4f}" if len(values) == 1 else f"{m:.4f} ({min(values):.4f}-{max(values):.4f})"


if __name__ == "__main__":
    from membench.records import latest_by_cell, load_records

    study, results = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else f"results/{sys.argv[1]}"
    recs = [r for r in latest_by_cell(load_records(results)).values() if r.get("experiment") == study]
    print(
        {
            "quantization": quantization_table,
            "pruning": pruning_table,
            "zero_stages": zero_table,
            "techniques": techniques_table,
        }[study](recs)
    )
