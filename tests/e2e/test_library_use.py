"""membench from Python (membench.api) works from a script and from a notebook without an `if __name__ ==
"__main__"` guard; a folder named `membench` that hides the package is named in one line by the `membench` command
(membench_entry.py), instead of an ImportError traceback (issue 20)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from membench import api

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(
    0, str(ROOT)
)  # membench_entry.py sits at the checkout's top level (an install puts it in site-packages)
import membench_entry  # noqa: E402

TINY = ["workload=gpt_tiny", "run.train_steps=4", "run.warmup_steps=1", "run.measure_steps=1"]
SCRIPT = """from membench import api

rec = api.run_cell({overrides!r})
print("RECORD", rec["status"], rec["launch"]["start"])
"""


def _python(code: str, cwd: Path, pythonpath: str | None = str(ROOT), env_extra: dict | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("MEMBENCH_START_METHOD", "PYTHONPATH")}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_hiding_names_a_namespace_folder_and_a_foreign_package_and_not_this_package(tmp_path):
    ns = types.ModuleType("membench")
    ns.__path__ = [str(tmp_path / "membench")]  # what Python makes of a folder without __init__.py
    assert membench_entry.hiding(ns) == f"the folder {tmp_path / 'membench'} (no __init__.py)"
    (tmp_path / "membench").mkdir()
    (tmp_path / "membench" / "__init__.py").write_text("")
    foreign = types.ModuleType("membench")
    foreign.__file__ = str(tmp_path / "membench" / "__init__.py")
    assert membench_entry.hiding(foreign) == foreign.__file__
    import membench

    assert membench_entry.hiding(membench) is None


def _one_line(p, folder: Path) -> None:
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(err) == 1, p.stdout + p.stderr
    assert str(folder) in err[0] and "hides the membench package" in err[0]


def test_a_foreign_membench_package_in_the_current_folder_is_named_even_for_version(tmp_path):
    (tmp_path / "membench").mkdir()
    (tmp_path / "membench" / "__init__.py").write_text("")
    p = _python(["-c", "import sys, membench_entry; sys.exit(membench_entry.main(['--version']))"], tmp_path)
    _one_line(p, tmp_path / "membench")


def test_a_namespace_folder_that_beats_an_editable_install_is_named(tmp_path):
    """An editable install finds the package through a meta-path finder, after sys.path: a folder `membench`
    without __init__.py on sys.path wins there as a namespace package (setuptools' finder, imitated here)."""
    (tmp_path / "membench").mkdir()
    (tmp_path / "membench" / "results.json").write_text("{}")
    code = f"""
import importlib.machinery, importlib.util, sys
class Editable:  # maps `membench` to the checkout, as setuptools' __editable__ finder does
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "membench":
            return importlib.util.spec_from_file_location(name, {str(ROOT / "membench" / "__init__.py")!r},
                                                          submodule_search_locations=[{str(ROOT / "membench")!r}])
        return None
sys.meta_path.append(Editable)
spec = importlib.util.spec_from_file_location("membench_entry", {str(ROOT / "membench_entry.py")!r})
entry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(entry)
sys.exit(entry.main(["--version"]))
"""
    _one_line(_python(["-c", code], tmp_path, pythonpath=None), tmp_path / "membench")
    (tmp_path / "membench").rename(tmp_path / "other")  # without the folder the same command works
    p = _python(["-c", code], tmp_path, pythonpath=None)
    assert p.returncode == 0 and p.stdout.startswith("membench "), p.stdout + p.stderr


def test_the_start_method_follows_whether_the_main_module_is_reimported(monkeypatch):
    main = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.delenv("MEMBENCH_START_METHOD", raising=False)
    assert not api.main_is_reimported()  # a notebook, the prompt: no file, no spec
    with api.start_method() as m:
        assert m == "auto" and "MEMBENCH_START_METHOD" not in os.environ
    main.__file__ = "/somewhere/script.py"
    assert api.main_is_reimported()
    with api.start_method() as m:
        assert m == "exec" and os.environ["MEMBENCH_START_METHOD"] == "exec"
    assert "MEMBENCH_START_METHOD" not in os.environ  # restored
    monkeypatch.setenv("MEMBENCH_START_METHOD", "auto")  # the user's own choice wins
    with api.start_method() as m:
        assert m == "auto"


def test_configs_and_load_from_python(tmp_path):
    (cfg,) = api.configs([*TINY, "technique=[activation_checkpointing]", f"run.results_dir={tmp_path}"])
    assert cfg["workload"]["preset"] == "gpt_tiny" and "activation_checkpointing" in cfg["technique"]
    assert len(api.configs(["run.seed=0,1", f"run.results_dir={tmp_path}"], multirun=True)) == 2
    recs = api.load(str(ROOT / "results" / "checkpointing"), experiment="checkpointing")
    assert len(recs) == 80 and all(r["status"] == "ok" for r in recs)  # 8 cells x seeds 0-9, the latest of each


@pytest.mark.slow
def test_a_script_without_a_main_guard_runs_a_cell(tmp_path):
    overrides = [*TINY, f"run.results_dir={tmp_path / 'res'}"]
    (tmp_path / "bench.py").write_text(SCRIPT.format(overrides=overrides))
    p = _python(["bench.py"], tmp_path)
    assert p.returncode == 0 and "RECORD ok exec" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    (rec,) = (tmp_path / "res" / "runs").glob("*.json")
    assert json.loads(rec.read_text())["status"] == "ok"


@pytest.mark.slow
def test_a_notebook_like_main_forks_its_cells_from_the_forkserver(tmp_path):
    """A notebook's __main__ has no file: multiprocessing re-imports nothing, so cells fork as on the CLI."""
    overrides = [*TINY, f"run.results_dir={tmp_path / 'res'}"]
    p = _python(["-c", SCRIPT.format(overrides=overrides)], tmp_path)
    assert p.returncode == 0 and "RECORD ok fork" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]


_EDITABLE = """
import importlib.machinery, importlib.util, sys
class Editable:  # setuptools' __editable__ finder, imitated for this checkout: the package's children (the
    # package itself is the folder found first on sys.path), and the entry module
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.startswith("membench.") and name.count(".") == 1:
            return importlib.machinery.PathFinder.find_spec(name, [{pkg!r}])
        if name == "membench_entry":
            return importlib.util.spec_from_file_location(name, {entry!r})
        return None
sys.meta_path.insert(0, Editable)  # before an editable install of another checkout
"""


def _editable(code: str) -> str:
    return _EDITABLE.format(pkg=str(ROOT / "membench"), entry=str(ROOT / "membench_entry.py")) + code


def test_a_hiding_folder_is_named_for_python_m_membench_and_for_a_script_importing_the_api(tmp_path):
    """With an editable install a `membench` folder next to a script still lets `membench.api` and
    `membench.__main__` load from the checkout; both name the folder instead of failing on a missing name."""
    (tmp_path / "membench").mkdir()
    main = _editable(
        "import runpy; sys.argv = ['membench', '--version']; runpy.run_module('membench', run_name='__main__')"
    )
    _one_line(_python(["-c", main], tmp_path, pythonpath=None), tmp_path / "membench")
    p = _python(["-c", _editable("from membench import api")], tmp_path, pythonpath=None)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith("ImportError: membench: the folder ")
    assert f"{tmp_path / 'membench'} (no __init__.py) is imported as `membench`" in p.stderr, p.stderr
    (tmp_path / "membench" / "__init__.py").write_text("")  # a package of that name: its file is named
    p = _python(["-c", _editable("from membench import api")], tmp_path, pythonpath=None)
    assert f"ImportError: membench: {tmp_path / 'membench' / '__init__.py'} is imported" in p.stderr, p.stderr
    assert api.hidden_by(sys.modules["membench"]) is None
