"""Composition of cells: Hydra overrides -> fully resolved, validated config dicts, one per cell. Nothing runs here.

Overrides follow Hydra's grammar. Sweeps (`-m`, e.g. `run.seed=0,1` or `technique=choice([],[bf16])`) are
expanded with Hydra's own sweeper; `+experiment=NAME` adds the experiment's cells. Every cell is composed and
validated (schemas, technique combinations, the user's own input files) before the first one runs. Hydra's errors
are rewritten into one line that names the key, why it failed and what is allowed. Used by the CLI (`run`, `fit`),
the planner (membench/plan/), the multi-node spec writer (membench/distributed.py), tests and scripts.
"""

from __future__ import annotations

import re

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from membench import confpath, technique
from membench.config import CONF_DIR, SlurmConfig, build, build_run, locate, register_schema
from membench.errors import ConfigError
from membench.inputs import check_out, check_writable
from membench.launch import split_sweep

_TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def one_line(e: BaseException) -> str:
    """An exception's message on one line, without Hydra's config search path."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return text.split(" Config search path:")[0][:400]


def options(group: str) -> str:
    return ", ".join(confpath.options(group))


def expand(overrides: list[str], multirun: bool) -> list[list[str]]:
    """One list of overrides per cell of the sweep (Hydra's BasicSweeper)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"bad override: {one_line(e)}") from None
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if sweeps and not multirun:
        raise ConfigError(f"{sweeps[0]}: a sweep needs -m/--multirun")
    return [cell for batch in BasicSweeper.split_arguments(parsed, None) for cell in batch]


def select(overrides: list[str], key: str):
    return OmegaConf.select(hydra_compose(config_name="config", overrides=overrides), key)


def allowed(overrides: list[str], parent: str) -> list[str] | None:
    """Keys under `parent` in the config composed without the offending override (None if that fails too)."""
    try:
        node = select(overrides, parent)
    except Exception:  # noqa: BLE001 - the list of allowed keys is a courtesy; the error is reported either way
        return None
    return sorted(k for k in node.keys() if k != "_target_") if node is not None else None


def unknown_key(key: str, overrides: list[str]) -> ConfigError:
    """Hydra's "Could not override 'KEY'" in membench's words: which key, why, what is allowed."""
    given = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), key)
    others = [o for o in overrides if o is not given]
    parent = key.rpartition(".")[0]
    parts = key.split(".")
    if parts[0] == "technique" and len(parts) >= 3:
        selected = allowed(others, "technique") or []
        if parts[1] not in selected:
            return ConfigError(
                f"{given}: technique {parts[1]} is not selected; add it (technique=[...,{parts[1]}]); "
                f"selected: {selected or '[]'}; allowed techniques: {options('technique')}"
            )
    keys = allowed(others, parent) if parent else None
    why = "unknown key"
    if parts[0] == "workload" and len(parts) == 2:
        preset = allowed(others, "workload") and select(others, "workload.preset")
        why = f"not a knob of workload {preset}" if preset else why
    return ConfigError(f"{given}: {why}" + (f"; allowed: {', '.join(keys)}" if keys else ""))


def compose(overrides: list[str]):
    """Hydra's compose (inside initialize_config_dir), its errors as one-line ConfigErrors."""
    try:
        return hydra_compose(config_name="config", overrides=overrides)
    except MissingConfigException as e:
        for group in ("workload", "technique", "experiment"):
            for o in overrides:
                key = o.lstrip("+~").split("=", 1)[0]
                if key == group and f"'{group}/" in str(e):
                    name = str(e).split(f"'{group}/", 1)[1].split("'", 1)[0]
                    raise ConfigError(f"{group}={name}: unknown; allowed: {options(group)}") from None
        raise ConfigError(one_line(e)) from None
    except (HydraException, OmegaConfBaseException) as e:
        m = re.search(r"Could not override '([^']+)'", str(e))
        if m:
            raise unknown_key(m.group(1), overrides) from None
        m = re.search(r"Error merging override (\S+)", str(e))
        cause = e.__cause__
        if m and isinstance(cause, ValidationError):
            t = re.search(r"could not be converted to (\w+)", str(cause))
            if t:
                want = _TYPE_WORDS.get(t.group(1), t.group(1))
                raise ConfigError(f"{m.group(1)}: expected {want}") from None
            raise ConfigError(f"{m.group(1)}: {one_line(cause)}") from None
        raise ConfigError(one_line(e)) from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda: no CUDA device is visible; allowed here: auto, cpu")
    return torch.device(name)


def build_all(config: dict):
    """Config dict -> (run, workload config, techniques, device), validating everything. No model is built."""
    run = build_run(config["run"])
    wcfg = build(config["workload"], "workload")
    techs = [build(node, f"technique.{name}") for name, node in (config.get("technique") or {}).items()]
    device = resolve_device(run.device)
    technique.validate(techs, device.type)
    technique.validate_run(techs, run)
    if run.world_size > 1 and not any(t.distributed for t in techs):
        need = " or ".join(technique.distributed_kinds())
        raise ConfigError(f"run.world_size={run.world_size}: needs technique {need} (stage 0 is plain DDP)")
    return run, wcfg, techs, device


def check_inputs(cfg: dict) -> None:
    """Inputs a run would only trip over minutes later: a results folder it cannot write, the workload's own
    check_inputs (e.g. a data file)."""
    check_writable("run.results_dir", cfg["run"]["results_dir"])
    check = getattr(locate(cfg["workload"]["_target_"]), "check_inputs", None)
    if check is not None:
        check(cfg["workload"])
    if "slurm" in cfg:
        SlurmConfig(**cfg["slurm"])
        if cfg["run"].get("launcher") == "slurm" and cfg["slurm"].get("folder"):
            check_writable("slurm.folder", cfg["slurm"]["folder"])


def check_plan_inputs(overrides: list[str], out: str) -> None:
    """`membench plan`: the results folder (or plan.out) it writes and the workload's input files, checked before
    the planner composes and simulates its candidates (minutes for a large model)."""
    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            node = OmegaConf.to_container(compose(overrides), resolve=True)
        except OmegaConfBaseException as e:
            raise ConfigError(one_line(e)) from None
    if out:
        check_out("plan.out", out)
    else:
        check_writable("run.results_dir", node["run"]["results_dir"])
    check = getattr(locate(node["workload"]["_target_"]), "check_inputs", None)
    if check is not None:
        check(node["workload"])


def plan_cells(overrides: list[str], multirun: bool) -> list[tuple[dict, list[str]]]:
    """Overrides -> (fully resolved, validated config dict, the overrides that made it), one per cell.
    Nothing runs here. The configs still hold the sweep knobs (run.jobs, run.launcher, slurm)."""
    register_schema()
    cells: list[tuple[dict, list[str]]] = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for user in expand(overrides, multirun):
            base = compose(user)
            exp = base.get("experiment", {}) or {}
            for extra in _seeded(list(exp.get("cells", []) or []) or [[]], exp.get("seeds"), user):
                # experiment cell first, the user's overrides last so they win (e.g. run.train_steps=...)
                cfg = compose([*list(extra), *user]) if extra else base
                try:
                    resolved = OmegaConf.to_container(cfg, resolve=True)
                except OmegaConfBaseException as e:
                    raise ConfigError(one_line(e)) from None
                build_all(resolved)
                check_inputs(resolved)
                cells.append((resolved, [*list(extra), *user]))
    return cells


def _seeded(cells: list, seeds, user: list[str]) -> list[list[str]]:
    """A study's `experiment.seeds: [0, 1, ...]` runs each of its cells once per seed (`run.seed=S` added), so that
    a re-run of the study holds the same seed groups as its committed records (docs/tracking.md: the time verdict
    on runs needs >= --time-min-runs seeds per side). A cell that sets run.seed itself, or a user's run.seed
    override, keeps its own seed."""
    if seeds is None:
        return [list(c) for c in cells]
    if OmegaConf.is_config(seeds):
        seeds = OmegaConf.to_container(seeds)
    if not isinstance(seeds, (list, tuple)) or not seeds or not all(type(s) is int and s >= 0 for s in seeds):
        raise ConfigError(f"experiment.seeds={seeds!r}: must be a non-empty list of integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"experiment.seeds={list(seeds)}: a seed is listed twice")
    out: list[list[str]] = []
    for c in cells:
        if any(str(o).startswith("run.seed=") for o in [*c, *user]):
            out.append(list(c))
        else:
            out.extend([*c, f"run.seed={s}"] for s in seeds)
    return out


def configs(overrides: list[str], multirun: bool) -> list[dict]:
    """Overrides -> fully resolved, validated config dicts, one per cell (without the sweep knobs). Nothing runs."""
    return [c.config for c in split_sweep(plan_cells(overrides, multirun)).cells]
