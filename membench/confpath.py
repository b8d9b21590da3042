"""Where configs come from: the main root (MEMBENCH_CONF, else the package's conf/) and extra roots named in
MEMBENCH_CONF_PATH (os.pathsep-separated, like PYTHONPATH). Each extra root may hold technique/, workload/ and
experiment/ folders; a Hydra SearchPathPlugin appends them to every composition (run, plan, fit), so a technique
or workload defined outside the repository is one Python module (importable from PYTHONPATH) plus one YAML.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import os
import shutil
import tempfile
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

import membench

GROUPS = ("technique", "workload", "experiment")


def main_root() -> Path:
    return Path(os.environ.get("MEMBENCH_CONF", membench.CONF_DIR))


def extra_roots() -> list[Path]:
    return [Path(p).expanduser().resolve() for p in os.environ.get("MEMBENCH_CONF_PATH", "").split(os.pathsep) if p]


def roots() -> list[Path]:
    return [main_root(), *extra_roots()]


class ExtraConfPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for root in extra_roots():
            search_path.append(provider="membench-conf-path", path=f"file://{root}")


@functools.cache
def install() -> None:
    """Register the search-path plugin (once per process; it reads MEMBENCH_CONF_PATH at each composition)."""
    from hydra.core.plugins import Plugins

    Plugins.instance().register(ExtraConfPath)


def options(group: str) -> list[str]:
    return sorted({p.stem for root in roots() for p in (root / group).glob("*.yaml")})


def merged_view() -> Path:
    """One folder whose technique/, workload/ and experiment/ link every root's YAMLs, for readers of a single conf
    folder (`membench list`). The main root wins a name clash, as it comes first in Hydra's search path too.
    Removed when the process exits."""
    extra = extra_roots()
    if not extra:
        return main_root()
    view = Path(tempfile.mkdtemp(prefix="membench-conf-"))
    atexit.register(shutil.rmtree, view, True)
    for group in GROUPS:
        (view / group).mkdir()
        for root in [main_root(), *extra]:
            for p in sorted((root / group).glob("*.yaml")):
                link = view / group / p.name
                if not link.exists():
                    link.symlink_to(p)
    return view


# Optional dependencies a module may need, with the pip extra that installs each (pyproject.toml).
EXTRAS = {"bitsandbytes": "quant", "torchao": "quant", "torch_pruning": "prune", "deepspeed": "zero",
          "transformers": "hf", "peft": "lora"}  # fmt: skip


class MissingDependency(ImportError):
    """A `_target_`'s module needs a package that is not installed (a plain install has no optional extras)."""


def locate(target: str) -> type:
    """The class a `_target_` names; records made before the package move say `techniques.X` for
    `membench.techniques.X` (same for workloads). A missing optional package raises MissingDependency with a
    one-line message naming the package and the extra that installs it."""
    if target.startswith(("techniques.", "workloads.")):
        target = f"membench.{target}"
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if not top or module == e.name or module.startswith(f"{e.name}."):
            raise
        hint = f"pip install 'membench[{EXTRAS[top]}]'" if top in EXTRAS else f"pip install {top}"
        raise MissingDependency(f"{target} needs the package {top}, which is not installed ({hint})") from None
