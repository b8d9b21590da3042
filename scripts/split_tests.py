"""Split tests/ into tests/unit, tests/runs and tests/e2e, one pytest marker per folder (issue 16, deliverable 6).

    unit  no training step: configs, records, reports, plots, planning on fake tensors, CLI input errors
    runs  real training steps in this process (run_inprocess, Trainer, technique + optimizer steps)
    e2e   subprocesses: the CLI in a child, sweeps, multi-rank groups

Each file goes where its dominant kind puts it (a few unit files hold one slow subprocess test: they stay whole).
The `slow` and `gpu` markers keep their meaning: a bare `pytest` deselects slow (pyproject addopts), `make test`
runs `-m 'slow or not slow'`, gpu tests are skipped without a device. Usage, from a clean checkout:

    python scripts/split_tests.py            # git mv + conftests + marker registration + path fixes
    python scripts/split_tests.py --dry-run  # print the table only

Then check: `pytest --collect-only -q -m 'slow or not slow' | tail -1` is unchanged, and -m unit / runs / e2e
partition it (a -m on the command line replaces pyproject's `-m 'not slow'`: `pytest -m unit` includes slow unit tests;
`-m 'unit and not slow'` is the quick set). A tests/test_*.py this table does not name stops the script before
anything moves.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

KINDS = {
    "unit": "no training step: configs, records, reports, planning on fake tensors, CLI input errors",
    "runs": "real training steps in this process",
    "e2e": "subprocesses: the CLI in a child process, sweeps, multi-rank process groups",
}

CLASSIFICATION = {
    # unit
    "test_calibrate.py": "unit",  # calibration from hand-written records
    "test_compare.py": "unit",  # compare on records; one slow CLI-in-a-child test rides along
    "test_configs.py": "unit",  # composition of every config; one real-CLI bad-input subprocess
    "test_export.py": "unit",
    "test_gpuinfo.py": "unit",  # NVML mocked; Popen monkeypatched
    "test_history.py": "unit",
    "test_mlflow.py": "unit",  # logs committed records to a file store
    "test_plan.py": "unit",  # planning on fake tensors; --verify's runs are stubbed except one
    "test_plots.py": "unit",
    "test_readme.py": "unit",
    "test_report.py": "unit",
    "test_docs_numbers.py": "unit",  # prose numbers against the committed records, links
    "test_layers.py": "unit",  # the import graph
    "test_sections.py": "unit",  # record sections round-trip the committed records
    "test_plan_act.py": "unit",  # planning on fake tensors; one max-batch check runs in process
    # runs
    "test_checkpointing.py": "runs",
    "test_gpu.py": "runs",  # in-process runs on CUDA (skipped without a GPU)
    "test_measurement.py": "runs",
    "test_precision.py": "runs",
    "test_pruning.py": "runs",
    "test_quantization.py": "runs",
    "test_simulate.py": "runs",  # fake-tensor steps against an exact count of real steps
    "test_workloads_custom.py": "runs",
    "test_workloads_hf.py": "runs",
    "test_workloads_llama.py": "runs",
    "test_fused_ce.py": "runs",
    "test_lora.py": "runs",
    "test_optim_lowmem.py": "runs",
    "test_optimizer_in_backward.py": "runs",
    "test_states.py": "runs",  # optimizer states after real steps against the planner's pure steps
    "test_tie_embeddings.py": "runs",
    # e2e
    "test_cli_e2e.py": "e2e",
    "test_distributed.py": "e2e",  # torchrun-style rank groups
    "test_isolation.py": "e2e",  # one child per run: oom / error / timeout records
    "test_launch.py": "e2e",  # sweeps: locks, parallel cells, progress
    "test_sweep.py": "e2e",
    "test_zero.py": "e2e",
    "test_install.py": "e2e",  # a wheel installed elsewhere runs the CLI from another folder
    "test_registry.py": "e2e",  # a toy technique through the real CLI in a child
    "test_slurm_real.py": "e2e",  # a real slurmctld/slurmd  # 2-rank gloo groups (DDP, FSDP, ZeRO, DeepSpeed) in spawned processes
}

CONFTEST = '''"""Every test under tests/{kind}/ is marked `{kind}`: {doc}."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    # conftest hooks see the whole session's items: mark only this folder's
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.{kind})
'''

# Moved one folder down: paths computed from __file__ climb one level more.
PATH_FIXES = [
    (re.compile(r"Path\(__file__\)\.resolve\(\)\.parent\.parent\b"), "Path(__file__).resolve().parents[2]"),
    (re.compile(r"Path\(__file__\)\.resolve\(\)\.parents\[1\]"), "Path(__file__).resolve().parents[2]"),
    (re.compile(r"Path\(__file__\)\.parent\.parent\b"), "Path(__file__).parents[2]"),
]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def plan() -> dict[str, str]:
    present = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    unknown = [f for f in present if f not in CLASSIFICATION]
    if unknown:
        sys.exit(f"split_tests: classify these first (CLASSIFICATION in {__file__}): {', '.join(unknown)}")
    return {f: CLASSIFICATION[f] for f in present}


def register_markers() -> None:
    path = ROOT / "pyproject.toml"
    text = path.read_text()
    if '"unit:' in text:
        return
    lines = "".join(f'    "{k}: {doc} (tests/{k}/)",\n' for k, doc in KINDS.items())
    new = text.replace("markers = [\n", "markers = [\n" + lines, 1)
    if new == text:
        sys.exit("split_tests: no `markers = [` list under [tool.pytest.ini_options] in pyproject.toml")
    path.write_text(new)


def fix_references(moves: dict[str, str]) -> list[str]:
    """Point every tracked text mention of tests/test_x.py at its new folder."""
    changed = []
    for rel in git("grep", "-l", "tests/test_").split():
        path = ROOT / rel
        text = path.read_text()
        new = text
        for name, kind in moves.items():
            new = re.sub(rf"\btests/{re.escape(name)}", f"tests/{kind}/{name}", new)
        if new != text:
            path.write_text(new)
            changed.append(rel)
    return changed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the classification and change nothing")
    args = ap.parse_args()
    moves = plan()
    for kind in KINDS:
        names = [f for f, k in moves.items() if k == kind]
        print(f"{kind:5} ({len(names):2}): {' '.join(names)}")
    if args.dry_run:
        return 0
    if git("status", "--porcelain", "--", "tests", "pyproject.toml"):
        sys.exit("split_tests: tests/ or pyproject.toml has uncommitted changes; commit them first")
    for kind, doc in KINDS.items():
        folder = ROOT / "tests" / kind
        folder.mkdir(exist_ok=True)
        (folder / "__init__.py").write_text("")
        (folder / "conftest.py").write_text(CONFTEST.format(kind=kind, doc=doc))
        git("add", str(folder / "__init__.py"), str(folder / "conftest.py"))
    for name, kind in moves.items():
        git("mv", f"tests/{name}", f"tests/{kind}/{name}")
        path = ROOT / "tests" / kind / name
        text = path.read_text()
        for pattern, repl in PATH_FIXES:
            text = pattern.sub(repl, text)
        path.write_text(text)
    register_markers()
    changed = fix_references(moves)
    print(f"moved {len(moves)} files; markers registered in pyproject.toml; references updated in {len(changed)} files")
    print("next: pytest --collect-only -q -m 'slow or not slow' | tail -1  (same count as before), then commit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
