"""The docs' commands run as written: every fenced command block in README.md and docs/ that follows a
`<!-- runnable -->` line runs in bash (`set -e`: each command must exit 0) from a scratch copy of the checkout.

Marker: `<!-- runnable -->` on the line before a ```bash block. Only blocks that run in seconds are marked. A block of
real runs may be marked `<!-- runnable: OVERRIDES -->`: each `membench run` of it gets OVERRIDES appended (e.g.
fewer steps), and the doc must say so in its visible text, which this test checks. `membench` and
`.venv/bin/membench` are this interpreter's `python -m membench`; results/ is a copy, so commands that write there
leave the checkout alone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARK = re.compile(
    r"^<!--\s*runnable(?::\s*(?P<extra>[^>]*?))?\s*-->\s*\n```(?:bash|sh)?\n(?P<body>.*?)^```", re.M | re.S
)
SHIM = """#!/bin/sh
if [ "$1" = run ] && [ -n "$MEMBENCH_DOC_EXTRA" ]; then exec "{python}" -m membench "$@" $MEMBENCH_DOC_EXTRA; fi
exec "{python}" -m membench "$@"
"""


def runnable_blocks() -> list[tuple[str, str, str]]:
    """(id, extra overrides, body) of every marked block."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in MARK.finditer(text):
            line = text[: m.start()].count("\n") + 1
            out.append((f"{doc.relative_to(ROOT)}:{line}", (m.group("extra") or "").strip(), m.group("body")))
    return out


BLOCKS = runnable_blocks()


def test_the_marker_finds_the_blocks_and_a_shortened_block_says_so_in_its_doc():
    ids = [b[0] for b in BLOCKS]
    assert any(i.startswith("README.md:") for i in ids) and any(i.startswith("docs/workloads.md:") for i in ids)
    for ident, extra, body in BLOCKS:
        assert "membench" in body, ident
        if extra:
            doc = (ROOT / ident.split(":")[0]).read_text()
            visible = re.sub(r"<!--.*?-->", "", doc, flags=re.S)
            assert extra in visible, f"{ident}: the doc must state the overrides its test adds: {extra}"


def _scratch(tmp: Path) -> dict[str, str]:
    """A scratch checkout: results/ copied, everything else linked; shims for membench, .venv/bin/*."""
    for p in ROOT.iterdir():
        if p.name in (".git", ".venv", "results") or p.name.startswith("."):
            continue
        (tmp / p.name).symlink_to(p)
    shutil.copytree(ROOT / "results", tmp / "results")
    bin_dir = tmp / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("membench",):
        (bin_dir / name).write_text(SHIM.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return env


@pytest.mark.slow
@pytest.mark.parametrize("ident,extra,body", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_a_runnable_block_runs_as_written(ident, extra, body, tmp_path):
    env = _scratch(tmp_path)
    env["MEMBENCH_DOC_EXTRA"] = extra
    p = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, f"{ident} exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
