"""Tracker vs device table: for each run, the tracker's peak next to the device's own counters, per phase.

`python -m membench.device_table RESULTS_DIR` prints it (scripts/gpu_check.sh does, per cell); the README's and
results/gpu's tables come from the same function through membench/readme.py (kind `device`).
"""

from __future__ import annotations

import sys

from membench.records import latest_by_cell, load_records
from membench.report import label
from membench.sections import PHASES

MiB = 2**20
STEP_PHASES = PHASES[1:]  # the phases that run steps (setup builds the model)


def _mib(n) -> str:
    return "-" if n is None else f"{n / MiB:.0f}"


def _phase_peaks(m: dict) -> str:
    key = "cuda_max_allocated_bytes" if "cuda" in m["device_name"] else "rss_peak_bytes"
    return " / ".join(_mib(m["phases"].get(p, {}).get(key)) for p in STEP_PHASES)


def table(records: list[dict]) -> str:
    head = (
        "| workload | techniques | device | peak MiB (plain steps) | memory step: device MiB | tracker MiB "
        "| tracker / device | untracked MiB | host tracker MiB | NVML used MiB (timed) "
        "| per phase MiB: warmup / memory / flop / timed / rest / eval | largest live site at the step's peak |\n|"
        + "---|"
        * 12
    )
    rows = [head]
    for r in sorted(records, key=lambda r: (r["config"]["workload"].get("preset"), label(r))):
        wl = f"{r['config']['workload'].get('preset')} b={r['config']['run']['batch_size']}"
        if r["status"] != "ok":
            rows.append(f"| {wl} | {label(r)} | - | {r['status']} |" + " - |" * 8 + f" {(r.get('error') or '')[:60]} |")
            continue
        m = r["memory"]
        dev = m["device_name"]
        mine = m["by_device"][dev]
        step_dev = mine.get("allocator_peak_bytes")
        host = m["by_device"].get("cpu") if dev != "cpu" else None
        hist = m["phases"]["memory_step"].get("cuda_history_at_peak") or {}
        sites = hist.get("live_at_peak_by_site") or []
        rows.append(
            "| "
            + " | ".join(
                [
                    wl,
                    label(r),
                    f"{dev} ({r['env']['gpu']})" if dev.startswith("cuda") and r["env"].get("gpu") else dev,
                    _mib(m["peak_bytes"]),
                    _mib(step_dev),
                    _mib(mine["tracker_peak_bytes"]),
                    f"{mine['tracker_peak_bytes'] / step_dev:.3f}" if step_dev else "-",
                    _mib(mine["by_category"].get("untracked")),
                    _mib(host and host["tracker_peak_bytes"]),
                    _mib(m["phases"]["timed"].get("nvml_used_max_bytes")),
                    _phase_peaks(m),
                    f"{sites[0]['site']} ({_mib(sites[0]['bytes'])})" if sites else _history_error(hist),
                ]
            )
            + " |"
        )
    return "\n".join(rows)


def _history_error(hist: dict) -> str:
    """Why a cell recorded with run.cuda_memory_history has no sites (the step that failed while recording)."""
    return f"no history: {hist['error'][:60]}" if hist.get("error") else "-"


def main(argv: list[str]) -> int:
    records = [r for d in argv for r in latest_by_cell(load_records(d)).values()]
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
