"""The planner's prediction for every cell of a study, saved beside its records: results/NAME/predicted.json.

    python scripts/predict_study.py techniques            # +experiment=techniques -> results/techniques/predicted.json

Each cell is composed as `membench run +experiment=NAME` composes it and predicted by `membench.plan`'s
`predict_one` (the fake-tensor simulation, or the hybrid where a technique cannot run on fake tensors), keyed by
the cell's config hash (the key its record carries). The study page (`python -m membench.readme`) puts each
cell's predicted saving beside the measured one; nothing here runs a cell.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from membench.cells import configs
from membench.plan.config import PlanConfig
from membench.plan.verification import predict_one
from membench.records import config_hash


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/predict_study.py EXPERIMENT", file=sys.stderr)
        return 2
    name = argv[0]
    cells = configs([f"+experiment={name}"], False)
    out: dict[str, dict] = {}
    for cfg in cells:
        h = config_hash(cfg)
        if h in out:
            continue
        t0 = time.perf_counter()
        p = predict_one(cfg, PlanConfig())
        out[h] = {
            "techniques": sorted(cfg.get("technique") or {}),
            "peak_bytes": p["peak_bytes"],
            "predictor": p["predictor"],
            "left_out": p.get("left_out", []),
            "device": p.get("device"),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        print(f"{h} {out[h]['techniques']} {p['peak_bytes'] / 2**20:.1f} MiB ({p['predictor']})", flush=True)
    path = Path(cells[0]["run"]["results_dir"]) / "predicted.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"experiment": name, "cells": out}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
