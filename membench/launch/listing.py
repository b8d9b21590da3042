"""`membench list`: what can run, read from conf/ (the registry) and the dataclass schemas behind it.

Workload presets with the size knobs each preset sets, techniques with every knob and its default, and the run and
slurm knobs; the end-of-line comments of the YAML files and dataclasses are the descriptions.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from membench.config import RunConfig, SlurmConfig, locate, register_schema
from membench.confpath import MissingDependency

_FIELD = re.compile(r"^\s*(\w+)\s*(?::\s*[^=#]+?)?\s*[:=]\s*(.*?)\s*(?:#\s*(.*))?$")


def _comments(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        m = _FIELD.match(line)
        if m and m.group(3):
            out[m.group(1)] = m.group(3)
    return out


def _fields(cls, values: dict | None = None, comments: dict | None = None, indent: str = "    ") -> list[str]:
    values = values or {}
    comments = {**_comments(inspect.getsource(cls).splitlines()), **(comments or {})}
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_") or f.name == "preset":
            continue
        if f.name in values:
            default = values[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else "???"
        note = f"  # {comments[f.name]}" if comments.get(f.name) else ""
        rows.append(f"{indent}{f.name}={default}{note}")
    return rows


def listing(conf_dir: Path) -> str:
    register_schema()
    store = ConfigStore.instance()
    out = ["Workloads (workload=NAME; size knobs as each preset sets them, then the family's other knobs):"]
    families: dict[str, list[str]] = {}
    for path in sorted((conf_dir / "workload").glob("*.yaml")):
        raw = OmegaConf.load(path)
        family = next((d.split("/")[-1].split("@")[0] for d in raw.get("defaults", []) if "schema" in str(d)), "?")
        sized = {k: v for k, v in raw.items() if k not in ("defaults", "preset")}
        head = path.read_text().splitlines()[0].lstrip("# ")
        out.append(f"  {path.stem} ({family}): " + " ".join(f"{k}={v}" for k, v in sized.items()))
        out.append(f"      {head}")
        families.setdefault(family, []).extend(sized)
    for family, seen in families.items():
        node = store.load(f"schema/workload/{family}.yaml").node
        cls = locate(node["_target_"])
        rest = [r for r in _fields(cls, indent="      ") if r.strip().split("=")[0] not in seen]
        out.append(f"  every {family} workload also takes (workload.KEY=...):")
        out.extend(rest)
    out.append("\nTechniques (technique=[NAME,...]; knobs technique.NAME.KEY=..., defaults shown):")
    for path in sorted((conf_dir / "technique").glob("*.yaml")):
        raw = OmegaConf.load(path)
        head = [line.lstrip("# ") for line in path.read_text().splitlines()[:3] if not line.startswith("# @package")]
        out.append(f"  {path.stem}: {head[0] if head else ''}")
        try:
            cls = locate(raw["_target_"])
        except MissingDependency as e:
            out.append(f"    (not available here: {e})")
            continue
        values = {k: v for k, v in OmegaConf.to_container(raw).items() if k != "_target_"}
        out.extend(_fields(cls, values, _comments(path.read_text().splitlines())))
    experiments = sorted(p.stem for p in (conf_dir / "experiment").glob("*.yaml"))
    out.append(f"\nStudies (+experiment=NAME): {', '.join(experiments)}")
    out.append("\nRun knobs (run.KEY=...):")
    out.extend(_fields(RunConfig, indent="  "))
    out.append("\nSlurm knobs (slurm.KEY=..., with run.launcher=slurm):")
    out.extend(_fields(SlurmConfig, indent="  "))
    return "\n".join(out)
