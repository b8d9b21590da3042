"""Versioned run records: one JSON file per run under results_dir/runs/, written atomically.

Records are append-only; a re-run writes a new file. `config_hash` identifies a cell (the resolved config
without the knobs that do not change what is measured), so sweeps can skip cells already recorded ok.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from membench import SCHEMA_VERSION, gpuinfo
from membench.confpath import locate
from membench.sections import OK_SECTIONS, Env, Memory

STATUSES = ("ok", "oom", "error", "timeout")
# Keys that do not change what a run measures, left out of the cell identity.
_NOT_IDENTITY = ("results_dir", "force", "timeout_s", "gpu_busy", "mlflow_uri")
# Run knobs added after records were committed: left out of the identity at their default (cells keep their hash).
_RUN_ADDED = {"grad_accum_steps": 1}
_LIBS = (
    "torch",
    "hydra-core",
    "omegaconf",
    "numpy",
    "scikit-learn",
    "bitsandbytes",
    "torchao",
    "torch-pruning",
    "deepspeed",
)


def short_target(target: str) -> str:
    """A `_target_` without the installed package's prefix: `membench.techniques.zero.Zero` and the pre-install
    `techniques.zero.Zero` of older records name the same class (cell identity and workload families compare
    these)."""
    return (
        target.removeprefix("membench.")
        if target.startswith(("membench.techniques.", "membench.workloads."))
        else target
    )


def _short_targets(node):
    if isinstance(node, dict):
        return {
            k: short_target(v) if k == "_target_" and isinstance(v, str) else _short_targets(v) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_short_targets(v) for v in node]
    return node


def config_hash(config: dict) -> str:
    ident = _short_targets(json.loads(json.dumps(config)))
    for k in _NOT_IDENTITY:
        ident.get("run", {}).pop(k, None)
    for k, default in _RUN_ADDED.items():
        if ident.get("run", {}).get(k) == default:
            del ident["run"][k]
    ident.pop("experiment", None)
    _drop_added_defaults(ident.get("workload"))
    for node in (ident.get("technique") or {}).values():  # a technique's knob added later, left at its default
        _drop_added_defaults(node)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _drop_added_defaults(node: dict | None) -> None:
    """Fields a workload schema or a technique added after records were committed (its `identity_added`) are left out of the cell
    identity while at their default, so a cell recorded before the field existed keeps its hash."""
    target = (node or {}).get("_target_")
    if not target:
        return
    try:
        cls = locate(target)
    except (ImportError, AttributeError):  # a record of a workload not importable here: hash it as written
        return
    defaults = {f.name: f.default for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    for name in getattr(cls, "identity_added", ()):
        if name in node and node[name] == defaults.get(name, dataclasses.MISSING):
            del node[name]


def new_run_id(chash: str) -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{time.time_ns() % 1_000_000:06d}-{chash[:10]}"


def runs_dir(results_dir: str | Path) -> Path:
    return Path(results_dir) / "runs"


def write_record(results_dir: str | Path, record: dict) -> Path:
    """Atomic: write a temp file in the same directory, fsync, then rename over the final name."""
    d = runs_dir(results_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"{record['run_id']}.json"
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o644)  # readable by the group (mkstemp creates 0600); written by the owner only
        json.dump(record, f, indent=1, sort_keys=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def load_records(results_dir: str | Path) -> list[dict]:
    out = []
    for p in sorted(runs_dir(results_dir).glob("*.json")):
        with open(p) as f:
            out.append(json.load(f))
    return out


def latest_by_cell(records: list[dict]) -> dict[str, dict]:
    latest: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: r["run_id"]):
        latest[r["config_hash"]] = r
    return latest


def ok_hashes(results_dir: str | Path) -> set[str]:
    """Cells that already have an ok record (a sweep skips them unless run.force=true)."""
    return {r["config_hash"] for r in load_records(results_dir) if r["status"] == "ok"}


def _git() -> dict[str, Any]:
    """The commit of the membench checkout the code runs from; an install (no checkout around the package)
    carries the package's version instead."""
    root = Path(__file__).resolve().parent.parent
    if not ((root / ".git").exists() and (root / "pyproject.toml").is_file()):
        try:
            version = metadata.version("membench")
        except metadata.PackageNotFoundError:
            version = None
        return {"commit": None, "dirty": None, "version": version}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            # records and committed baselines under results/ do not change what the code measures
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": commit.stdout.strip() or None, "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# CPU features that decide how fast 16-bit autocast runs on a CPU (bf16 dot products, AMX tiles).
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in _CPU_FLAGS if f in have]
    except OSError:
        pass
    return []


def _slurm() -> dict[str, Any] | None:
    """Where Slurm ran the record: the task's own job id, its array task (what squeue shows), node and CPUs."""
    e = os.environ
    if "SLURM_JOB_ID" not in e:
        return None
    array = f"{e['SLURM_ARRAY_JOB_ID']}_{e['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_TASK_ID" in e else None
    cpus = e.get("SLURM_CPUS_PER_TASK") or e.get("SLURM_JOB_CPUS_PER_NODE", "").split("(")[0]
    return {
        "job_id": e["SLURM_JOB_ID"],
        "array_task": array,
        "node": e.get("SLURMD_NODENAME"),
        "partition": e.get("SLURM_JOB_PARTITION"),
        "cpus": int(cpus) if cpus.isdigit() else None,
        "cpu_affinity": len(os.sched_getaffinity(0)),
    }


def environment(device: str | None = None) -> dict[str, Any]:
    versions = {}
    for lib in _LIBS:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    env = Env(
        git=_git(),
        python=platform.python_version(),
        platform=platform.platform(),
        versions=versions,
        cpu=cpu_model(),
        cpu_flags=cpu_flags(),
        cpu_count=os.cpu_count(),
        device=device,
        slurm=_slurm(),
    )
    try:
        import torch

        env.torch_threads = torch.get_num_threads()
        if torch.cuda.is_available():
            env.gpu = torch.cuda.get_device_name(0)
            env.cuda = torch.version.cuda
        if device and device.startswith("cuda"):  # driver, clocks, power limit, ECC, UUID (None without NVML)
            env.gpu_nvml = gpuinfo.provenance(gpuinfo.handle(device))
    except ImportError:
        pass
    return env.to_dict()


def skeleton(run_id: str, chash: str, config: dict, status: str) -> dict[str, Any]:
    """The fields every record has, whatever its status; the child fills in the measured sections."""
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "config_hash": chash,
        "status": status,
        "error": None,
        "experiment": (config.get("experiment") or {}).get("name"),
        "config": config,
        "workload": {"preset": config["workload"].get("preset"), "target": config["workload"].get("_target_")},
        "techniques": list((config.get("technique") or {}).keys()),
        "env": None,
        "memory": None,
        "timing": None,
        "flops": None,
        "quality": None,
        "wall_s": None,
    }


def validate_record(r: dict) -> None:
    """Raise ValueError naming the first missing or malformed field."""
    for key in ("schema_version", "run_id", "config_hash", "status", "config", "workload", "techniques"):
        if key not in r:
            raise ValueError(f"record: missing {key}")
    if r["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"record: schema_version {r['schema_version']} != {SCHEMA_VERSION}")
    if r["status"] not in STATUSES:
        raise ValueError(f"record: status {r['status']!r} not in {STATUSES}")
    if r["status"] != "ok":
        if not r.get("error"):
            raise ValueError("record: a failed run must carry an error message")
        return
    sections = {cls: cls.from_dict(r.get(cls.KEY) or {}) for cls in OK_SECTIONS}  # names the first missing key
    sections[Memory].check()
