"""Enumeration: one override list per technique combination, composed into cells and validated with `run`'s
rules."""

from __future__ import annotations

import copy
import functools
import itertools
import json
from collections.abc import Iterator

import yaml
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from membench import technique
from membench.cells import CONF_DIR
from membench.cells import compose as _compose
from membench.config import build, build_run, register_schema
from membench.errors import ConfigError
from membench.plan.config import PlanConfig


def candidates(world_size: int, device_type: str, pc: PlanConfig, fixed: tuple[str, ...] = ()) -> list[list[str]]:
    """Override lists, one per combination (before validation). `fixed`: kinds every candidate contains (the
    user's technique=[...]); their families are not searched."""
    choices = []  # per family: None (left out) and (kind, knobs) per value its members declare
    for fam, members in technique.families().items():
        if fam not in pc.techniques or any(m.kind in fixed for m in members):
            choices.append([None])  # left out (at N > 1 without a distributed technique, validation says why)
            continue
        values = [(m.kind, v) for m in members if m.exact or pc.allow_approximate
                  for v in m.plan_values(world_size, device_type)]  # fmt: skip
        required = world_size > 1 and any(m.distributed for m in members)
        choices.append(([] if required else [None]) + values)
    out = []
    for combo in itertools.product(*choices):
        picked = [c for c in combo if c is not None]
        ov = [f"technique=[{','.join([*fixed, *(k for k, _ in picked)])}]"]
        ov += [f"technique.{k}.{f}={v}" for k, knobs in picked for f, v in knobs.items()]
        out.append(ov)
    return out


def validated(cfg: dict, device_type: str, cache: dict | None = None):
    """The same rules as `run` (membench.execute.build_all), for a device that need not be present here. `cache`:
    built configs by node (the planner's candidates share their run, workload and most technique nodes; building
    each through OmegaConf was a fifth of a llama_8b plan). A node object seen before (`shared_cells` gives every
    candidate the same objects) is found by identity, without serialising it again: the cache holds each node it
    was given, so its id stays its own, and the planner never changes a node once built."""

    def once(key: str, node: dict, make):
        if cache is None:
            return make(node)
        seen = cache.get((key, id(node)))
        if seen is not None and seen[0] is node:
            return seen[1]
        ck = (key, json.dumps(node, sort_keys=True, default=str))
        if ck not in cache:
            cache[ck] = make(node)
        cache[key, id(node)] = (node, cache[ck])
        return cache[ck]

    run = once("run", cfg["run"], build_run)
    wcfg = once("workload", cfg["workload"], lambda n: build(n, "workload"))
    techs = [
        once(k, n, functools.partial(build, key=f"technique.{k}")) for k, n in (cfg.get("technique") or {}).items()
    ]
    technique.validate(techs, device_type)
    if run.world_size > 1 and not any(t.distributed for t in techs):  # execute.build_all's rule
        need = " or ".join(technique.distributed_kinds())
        raise ConfigError(f"run.world_size={run.world_size}: needs technique {need} (stage 0 is plain DDP)")
    return run, wcfg, techs


def compose_cells(user: list[str], extra: list[list[str]]) -> list[dict | ConfigError]:
    """Compose user overrides + each candidate's; a ConfigError in place of a cell that fails composition."""

    register_schema()
    out: list = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for ov in extra:
            try:
                out.append(OmegaConf.to_container(_compose([*user, *ov]), resolve=True))
            except ConfigError as e:
                out.append(e)
    return out


def fast_cells(user: list[str], base: dict, extra: list[list[str]]) -> list[dict]:
    """The same dicts compose_cells would give, from one Hydra composition: technique nodes are independent
    group members, so each candidate copies the ones it names and sets its `technique.K.F=V` overrides.
    (Composing hundreds of candidates through Hydra took minutes on this machine.) Each cell is its own copy;
    `shared_cells` gives the same cells without copying."""
    return [copy.deepcopy(c) for c in shared_cells(user, base, extra)]


def shared_cells(user: list[str], base: dict, extra: list[list[str]]) -> Iterator[dict]:
    """fast_cells' dicts, read-only and made one at a time: every cell holds `base`'s own nodes (run, workload, ...),
    and one technique node object per (kind, its knob overrides), shared by every candidate naming them. Copying
    `base` and parsing each knob's value for each of a llama_8b plan's 230,400 candidates was a third of the plan."""
    kinds = sorted({k for ov in extra for k in _kinds(ov)})
    nodes = compose_cells(user, [[f"technique=[{','.join(kinds)}]"]])[0]["technique"] if kinds else {}
    made: dict[tuple, dict] = {}  # (kind, its `technique.kind.F=V` overrides) -> its node

    def node(kind: str, knobs: tuple[str, ...]) -> dict:
        if (kind, knobs) not in made:
            n = copy.deepcopy(nodes[kind])
            for o in knobs:
                path, value = o.split("=", 1)
                n[path.split(".")[2]] = yaml.safe_load(value)
            made[kind, knobs] = n
        return made[kind, knobs]

    for ov in extra:
        knobs: dict[str, list[str]] = {}
        for o in ov[1:]:
            knobs.setdefault(o.split("=", 1)[0].split(".")[1], []).append(o)
        yield {**base, "technique": {k: node(k, tuple(knobs.get(k, ()))) for k in _kinds(ov)}}


def _kinds(ov: list[str]) -> list[str]:
    """The kinds a candidate's `technique=[...]` override names, in its order."""
    return [k for k in ov[0].split("=", 1)[1].strip("[]").split(",") if k]


def _is_list(o: str) -> bool:
    """The `technique=[...]` override itself (not a `technique.X.Y=` knob)."""
    return o.lstrip("+~").split("=", 1)[0] == "technique"


def without_list(user: list[str]) -> list[str]:
    """User overrides less `technique=[...]`: each candidate names the full list (the user's kinds first)."""
    return [o for o in user if not _is_list(o)]
