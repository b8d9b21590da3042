"""Regenerate the README's result tables from records: `python -m membench.readme [--check]`.

Each table sits between `<!-- table:EXPERIMENT -->` and `<!-- /table -->` and is the output of
membench.report.table over results/EXPERIMENT (latest record per cell). `--check` exits 1 if the README
differs from what the records give (tests run it, so README tables cannot drift from the records).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from membench.records import latest_by_cell, load_records
from membench.report import table

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def render(text: str, results: Path = ROOT / "results") -> str:
    def sub(m: re.Match) -> str:
        name = m.group("name")
        records = [r for r in latest_by_cell(load_records(results / name)).values() if r.get("experiment") == name]
        body = table(records) if records else f"(no records in results/{name} yet)"
        return f"{m.group(1)}{body}\n{m.group(4)}"

    return BLOCK.sub(sub, text)


def main(argv: list[str]) -> int:
    path = ROOT / "README.md"
    text = path.read_text()
    new = render(text)
    if "--check" in argv:
        if new != text:
            print("README tables differ from results/: run `python -m membench.readme`", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
