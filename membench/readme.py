"""Regenerate the result tables in README.md, docs/*.md and docs/studies/*.md from records: `python -m membench.readme [--check]`.

A table sits between `<!-- table:EXPERIMENT -->` (or `<!-- table:EXPERIMENT:KIND -->`) and `<!-- /table -->`
and is rendered from results/EXPERIMENT (latest record per cell of that experiment) by the KIND's table
function: `main` (membench.report.table, the default), `zero`, `quantization`, `pruning`, `techniques` (with results/NAME/predicted.json), `device` (tracker vs
device), `plan` (verified plans' predicted vs measured), `planverified` (the verified study: error per predictor);
`planjson` renders results/plan/NAME.json's top rows; `gate` (any NAME) one row per committed study:
its timed steps and what compare says of a copy with step times raised 10%. `--check` exits 1 if
a file differs from what the records give (a test runs it, so tables cannot drift from the records).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from pathlib import Path

from membench.plots import write_plots
from membench.records import latest_by_cell, load_records

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+)(?::(?P<kind>\w+))? -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)
RENDERERS = {
    "main": "membench.report:table",
    "zero": "membench.studies:zero_table",
    "quantization": "membench.studies:quantization_table",
    "pruning": "membench.studies:pruning_table",
    "device": "membench.device_table:table",
    "plan": "membench.plan.tables:study_table",
    "planverified": "membench.plan.tables:verified_table",  # scripts/verify_study.py's cells
    "techniques": "membench.studies:techniques_table",  # takes results/NAME/predicted.json too
}


def _renderer(kind: str):
    module, _, fn = RENDERERS[kind].partition(":")
    return getattr(importlib.import_module(module), fn)


def render(text: str, results: Path = ROOT / "results") -> str:
    def sub(m: re.Match) -> str:
        name, kind = m.group("name"), m.group("kind") or "main"
        if kind == "gate":  # every committed study: what compare can judge of it (docs/tracking.md)
            from membench.compare import gate_table

            return f"{m.group(1)}{gate_table(results)}\n{m.group(5)}"
        if kind == "planjson":  # a saved `membench plan` result: results/plan/NAME.json, its top rows
            from membench.plan.tables import table  # the package imports torch

            body = table(json.loads((results / "plan" / f"{name}.json").read_text()), top=8)
            return f"{m.group(1)}{body}\n{m.group(5)}"
        records = [
            r
            for r in latest_by_cell(load_records(results / name)).values()
            # verified plans are ordinary runs (no experiment); a study's records carry its name
            if r.get("experiment") == name or (kind in ("plan", "planverified") and "plan_check" in r)
        ]
        if not records:
            body = f"(no records in results/{name} yet)"
        else:  # a renderer taking `predicted` also gets the planner's predictions saved beside the records
            fn, predicted = _renderer(kind), results / name / "predicted.json"
            takes = "predicted" in inspect.signature(fn).parameters
            body = (
                fn(records, predicted=json.loads(predicted.read_text()))
                if takes and predicted.exists()
                else fn(records)
            )
        return f"{m.group(1)}{body}\n{m.group(5)}"

    return BLOCK.sub(sub, text)


def files() -> list[Path]:
    """README.md, docs/*.md and the study pages docs/studies/*.md (where the study tables live)."""
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "docs" / "studies").glob("*.md")),
    ]


def plots() -> list[Path]:
    """The Pareto charts the docs show (results/NAME/pareto-NAME-PRESET.png), redrawn from the same records."""
    shown = {m.group(1) for path in files() for m in re.finditer(r"results/([\w-]+)/pareto-", path.read_text())}
    return [p for name in sorted(shown) for p in write_plots(ROOT / "results" / name, name)]


def main(argv: list[str]) -> int:
    if "--check" not in argv:
        plots()
    stale = []
    for path in files():
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(str(path.relative_to(ROOT)))
            if "--check" not in argv:
                path.write_text(new)
    if "--check" in argv and stale:
        print(f"tables differ from results/ in {', '.join(stale)}: run `python -m membench.readme`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
