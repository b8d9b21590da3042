"""Where a sweep's cells run: `local` (a pool over this machine's cores or GPUs) or `slurm` (submitit).

The sweep itself (membench/sweep.py, `membench run`) plans every cell first; a launcher then runs the cells that
have no ok record yet, each `worker(config)` in its own child (the sweep passes the worker), and returns their records. Sweep-level knobs (run.jobs, run.launcher, the slurm group) are split off the
cells here, so they are neither part of a cell's identity (config_hash) nor of its record's config.
A sweep file (RESULTS_DIR/sweeps/ID.json) lists the cells and their labels, so `membench status` can re-attach.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from membench.child import start_time
from membench.errors import ConfigError
from membench.records import config_hash

SWEEP_RUN_KEYS = ("jobs", "launcher")  # per-sweep knobs in the run group
# keys a label leaves out: where results go and how the sweep runs say nothing about what a cell measures
_LABEL_SKIP_RUN = ("results_dir", "force", "timeout_s", *SWEEP_RUN_KEYS)


@dataclass
class Planned:
    """A cell ready to run: its config (without sweep knobs), a label naming its knobs, its identity."""

    config: dict
    label: str
    chash: str = ""


@dataclass
class Sweep:
    jobs: str
    launcher: str
    slurm: dict = field(default_factory=dict)
    cells: list[Planned] = field(default_factory=list)


def label(config: dict, overrides: list[str]) -> str:
    """`gpt_tiny [activation_checkpointing] mode=selective batch_size=4`: preset, techniques, then every knob the
    cell's overrides set (three checkpointing modes get three labels; a resized gpt_tiny shows its sizes)."""
    techs = list((config.get("technique") or {}).keys())
    parts = [str(config["workload"].get("preset")) + (f" [{','.join(techs)}]" if techs else "")]
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        group, _, rest = key.partition(".")
        if not rest or group in ("experiment", "hydra", "slurm"):
            continue
        if group == "run" and rest in _LABEL_SKIP_RUN:
            continue
        if group == "technique" and len(techs) == 1:
            rest = rest.partition(".")[2] or rest  # one technique: `mode=selective`, not the full path
        parts.append(f"{rest}={value}")
    return " ".join(dict.fromkeys(parts))  # an override repeated by experiment and user shows once


def split_sweep(planned: list[tuple[dict, list[str]]]) -> Sweep:
    """Pull the sweep knobs off every cell; they must agree across cells (a sweep over run.jobs makes no sense)."""
    seen: dict[str, object] = {}
    cells: list[Planned] = []
    for cfg, overrides in planned:
        knobs = {k: cfg["run"].pop(k) for k in SWEEP_RUN_KEYS if k in cfg["run"]}
        knobs["slurm"] = cfg.pop("slurm", {}) or {}
        for k, v in knobs.items():
            if k in seen and seen[k] != v:
                name = k if k == "slurm" else f"run.{k}"
                raise ConfigError(f"{name}: differs between cells ({seen[k]} vs {v}); it is one setting per sweep")
            seen[k] = v
        cells.append(Planned(cfg, label(cfg, overrides), config_hash(cfg)))
    return Sweep(str(seen.get("jobs", "1")), str(seen.get("launcher", "local")), dict(seen.get("slurm") or {}), cells)


def sweeps_dir(results_dir: str | Path) -> Path:
    return Path(results_dir) / "sweeps"


def write_sweep_file(results_dir: str | Path, sweep: Sweep, argv: list[str], extra: dict | None = None) -> Path:
    d = sweeps_dir(results_dir)
    d.mkdir(parents=True, exist_ok=True)
    sweep_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"
    path = d / f"{sweep_id}.json"
    body = {
        "sweep_id": sweep_id,
        "started": time.time(),
        "pid": os.getpid(),
        "pid_start": start_time(os.getpid()),  # with the pid, names this process (a pid alone may be recycled)
        "host": socket.gethostname(),
        "argv": argv,
        "launcher": sweep.launcher,
        "jobs": sweep.jobs,
        "cells": [{"config_hash": c.chash, "label": c.label} for c in sweep.cells],
        **(extra or {}),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, path)
    return path


def update_sweep_file(path: Path, **fields) -> None:
    body = json.loads(path.read_text())
    body.update(fields)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, path)
