"""The harness's import layers, read from the source with ast (every import, function-local ones included).

- No import cycle among the project's modules (membench, membench.techniques, membench.workloads).
- No module imports another's private name (a leading underscore).
- A function-local import of a project module only where that module pulls in a heavy dependency at import time
  (torch and the optional libraries below), so `membench list/report/status` start without them.
- workloads/ at the bottom: it imports nothing from techniques/.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (("membench", "membench"), ("techniques", "membench.techniques"), ("workloads", "membench.workloads"))
# imported inside functions so that a command that does not need them does not pay for them
HEAVY = {
    "torch",
    "deepspeed",
    "bitsandbytes",
    "torchao",
    "torch_pruning",
    "transformers",
    "pandas",
    "mlflow",
    "matplotlib",
    "submitit",
    "scipy",
    "pynvml",
}


def modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in PACKAGES:
        for p in sorted((ROOT / folder).rglob("*.py")):
            parts = [x for x in p.relative_to(ROOT / folder).with_suffix("").parts if x != "__init__"]
            out[".".join([pkg, *parts])] = p
    return out


MODULES = modules()


def _canon(name: str) -> str:
    for folder, pkg in PACKAGES[1:]:
        if name == folder or name.startswith(folder + "."):
            return pkg + name[len(folder) :]
    return name


def imports(path: Path):
    """(imported module, names taken from it, function-local?) for every import statement in the file."""
    tree = ast.parse(path.read_text())
    local = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield _canon(node.module), [a.name for a in node.names], id(node) in local
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield _canon(a.name), [], id(node) in local


def project_targets(module: str, names: list[str]) -> list[str]:
    """The project modules an import statement names: `from membench import plan` names membench.plan, `from
    membench.plan import table` names membench.plan too (a name its __init__ re-exports, not a module)."""
    submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return submodules or ([module] if module in MODULES else [])


def packages_above(module: str) -> list[str]:
    """The project packages a module sits in, innermost first: importing it runs their __init__ first (membench.plan
    for membench.plan.tables; membench.techniques for membench.techniques.zero)."""
    root = max((pkg for _, pkg in PACKAGES if module == pkg or module.startswith(pkg + ".")), key=len, default="")
    parts = module.split(".")
    return [q for i in range(len(parts) - 1, 0, -1) if len(q := ".".join(parts[:i])) >= len(root) and q in MODULES]


def loaded(importer: str, module: str, names: list[str]) -> list[str]:
    """What an import statement in `importer` runs: the modules it names and the packages above them, less the
    packages above the importer that it does not name (already imported before it). A package's modules import
    each other, not the package: naming it (`from membench import plan` in membench.plan.tables) is an edge."""
    done = {importer, *packages_above(importer)}
    out = []
    for t in project_targets(module, names):
        out += [x for x in (t, *(q for q in packages_above(t) if q not in done)) if x != importer and x not in out]
    return out


def edges(top_level_only: bool = False) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, p in MODULES.items():
        for module, names, local in imports(p):
            if top_level_only and local:
                continue
            graph[m] |= set(loaded(m, module, names))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def heavy_modules() -> set[str]:
    """Project modules that import a heavy library at import time, directly or through another project module."""
    graph = edges(top_level_only=True)  # a package is heavy when its __init__ imports a heavy module
    heavy = {
        m
        for m, p in MODULES.items()
        if any(module.split(".")[0] in HEAVY for module, _, local in imports(p) if not local)
    }
    while True:
        more = {m for m, deps in graph.items() if m not in heavy and deps & heavy}
        if not more:
            return heavy
        heavy |= more


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_an_import_of_a_package_module_runs_the_package():
    """membench/plan/ re-exports its modules' names: a module outside it that imports membench.plan.tables also runs
    membench/plan/__init__.py (which imports torch); membench.plan.rank importing membench.plan.config does not."""
    assert loaded("membench.readme", "membench.plan.tables", ["table"]) == ["membench.plan.tables", "membench.plan"]
    assert loaded("membench.cli", "membench", ["plan"]) == ["membench.plan"]
    assert loaded("membench.plan.rank", "membench.plan.config", ["PlanConfig"]) == ["membench.plan.config"]
    assert loaded("membench.plan", "membench.plan.rank", ["plan"]) == ["membench.plan.rank"]
    assert loaded("membench.plan.tables", "membench", ["plan"]) == ["membench.plan"]  # a cycle with its __init__
    assert packages_above("membench.techniques.zero") == ["membench.techniques"]
    assert "membench.plan" in heavy_modules() and "membench.plan.tables" not in heavy_modules()


def test_no_import_cycle_counting_function_local_imports():
    assert cycles(edges()) == []


def test_no_private_name_is_imported_across_modules():
    bad = [
        f"{m}: from {module} import {n}"
        for m, p in MODULES.items()
        for module, names, _ in imports(p)
        if module.split(".")[0] == "membench" and module != m
        for n in names
        if n.startswith("_") and n != "__version__"
    ]
    assert bad == []


def test_a_function_local_project_import_defers_a_heavy_dependency():
    heavy = heavy_modules()
    bad = [
        f"{m} imports {t} inside a function"
        for m, p in MODULES.items()
        for module, names, local in imports(p)
        if local
        for t in project_targets(module, names)
        if not ({t, *packages_above(t)} - {m, *packages_above(m)}) & heavy
    ]
    assert bad == []


def test_workloads_import_nothing_from_techniques():
    bad = [
        f"{m} imports {module}"
        for m, p in MODULES.items()
        if m.startswith("membench.workloads")
        for module, _, _ in imports(p)
        if module.startswith("membench.techniques")
    ]
    assert bad == []


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_the_runner_and_launchers_get_the_worker_passed_in():
    """What a cell runs is the worker the sweep passes (membench/sweep.py); the runner and the launchers reach the
    step loop through no import, function-local ones included."""
    graph = edges()
    for m in ("membench.runner", "membench.child", "membench.launch.local", "membench.launch.slurm"):
        assert "membench.execute" not in _reach(graph, m), m
