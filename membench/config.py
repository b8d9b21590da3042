"""Structured config schema for the top level (`run`) and the config -> object builder.

Workload and technique YAMLs carry `_target_` naming their config dataclass; `build()` type-checks the YAML
node against that dataclass (OmegaConf structured merge) and constructs it, so a wrong type or value fails
when the config is composed, before any run starts.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from membench import confpath, mlflow_log, technique
from membench import workloads as wl_pkg
from membench.confpath import locate
from membench.errors import ConfigError
from membench.workloads.base import SCHEMAS

CONF_DIR = confpath.main_root()  # MEMBENCH_CONF replaces it; MEMBENCH_CONF_PATH adds roots (membench/confpath.py)
DEVICES = ("auto", "cpu", "cuda")
LAUNCHERS = ("local", "slurm")


@dataclass
class RunConfig:
    seed: int = 0
    batch_size: int = 8  # samples per step; the workload presets set their own default
    grad_accum_steps: int = 1  # micro-batches per optimizer step: each step's batch split in k along its first
    # dimension, gradients summed over them (k > 1 lowers activations to a micro-batch's, gradients stay whole)
    warmup_steps: int = 2  # untimed, unmeasured; >= 1 so the memory step sees allocated optimizer state
    measure_steps: int = 5  # timed steps (no instrumentation active)
    train_steps: int = 20  # total optimizer steps before quality is evaluated (>= warmup + 2 + measure)
    device: str = "auto"
    num_threads: int = 0  # 0 keeps torch's default
    results_dir: str = "results/scratch"
    timeout_s: float = 900.0
    memory_budget_mib: float | None = None  # a run whose peak exceeds it ends as `oom` (CPU and CUDA)
    world_size: int = 1  # ranks launched for one run (needs technique zero; batch_size is per rank)
    force: bool = False  # re-run cells that already have an ok record
    gpu_busy: str = "fail"  # another process on a cell's GPU: fail | wait (up to timeout_s) | ignore
    mlflow_uri: str | None = None  # also log each record to MLflow (e.g. file:./mlruns)
    cuda_memory_history: bool = False  # CUDA: record the allocator's history in the memory step; the record lists
    # what was live at its peak, by allocation site (slows that one step)
    # Sweep knobs: one value per sweep, split off the cells before they run (membench/launch/__init__.py), so
    # they are neither in a cell's identity nor in its record.
    jobs: str = "1"  # cells at once: K, or auto (CUDA: as many as the GPUs allow; CPU: cores // 4)
    launcher: str = "local"  # local (this machine) or slurm (submitit; knobs in the slurm group)

    def __post_init__(self) -> None:
        for key in ("batch_size", "measure_steps", "train_steps", "timeout_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"run.{key}={getattr(self, key)}: must be > 0")
        if self.warmup_steps < 1:  # a first step allocates optimizer state: measuring it would miss the steady peak
            raise ConfigError(f"run.warmup_steps={self.warmup_steps}: must be >= 1 (memory is measured after warm-up)")
        if self.device not in DEVICES:
            raise ConfigError(f"run.device={self.device!r}: allowed values are {', '.join(DEVICES)}")
        if self.gpu_busy not in ("wait", "fail", "ignore"):
            raise ConfigError(f"run.gpu_busy={self.gpu_busy!r}: allowed values are wait, fail, ignore")
        mlflow_log.check_uri(self.mlflow_uri)
        if self.memory_budget_mib is not None and self.memory_budget_mib <= 0:
            raise ConfigError(f"run.memory_budget_mib={self.memory_budget_mib}: must be > 0 or null")
        if self.grad_accum_steps < 1 or self.batch_size % self.grad_accum_steps:
            raise ConfigError(f"run.grad_accum_steps={self.grad_accum_steps}: must be >= 1 and divide "
                              f"run.batch_size={self.batch_size} (each step's batch is split in equal micro-batches)")  # fmt: skip
        if self.world_size < 1:
            raise ConfigError(f"run.world_size={self.world_size}: must be >= 1 (ranks launched for one run)")
        if self.jobs != "auto" and not (self.jobs.isdigit() and int(self.jobs) >= 1):
            raise ConfigError(f"run.jobs={self.jobs}: allowed: auto or a whole number >= 1")
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"run.launcher={self.launcher}: allowed: {', '.join(LAUNCHERS)}")
        need = self.warmup_steps + self.measure_steps + 2
        if self.train_steps < need:
            raise ConfigError(f"run.train_steps={self.train_steps}: must be >= warmup + measure + 2 = {need}")

    @property
    def micro_batch_size(self) -> int:
        """Samples per forward/backward: what activations scale with (the planner and the record predict at it)."""
        return self.batch_size // self.grad_accum_steps


@dataclass
class SlurmConfig:
    """The `slurm` group: how run.launcher=slurm submits a sweep (membench/launch/slurm.py)."""

    partition: str | None = None  # Slurm partition (sbatch --partition); null: the cluster's default
    account: str | None = None  # sbatch --account; null: the user's default
    qos: str | None = None  # sbatch --qos; null: the account's default
    gpus_per_node: int | None = None  # null: run.world_size on CUDA (auto: where the partition has GPUs)
    cpus_per_task: int | None = None  # null: one per rank of the widest CPU cell (the cluster's default for one rank)
    time_min: int | None = None  # limit of each task, minutes; null: the longest run.timeout_s + 2 min, rounded up
    mem_gb: float | None = None  # host memory per task; null: the cluster's default
    array_parallelism: int = 32  # tasks of the array running at once
    cluster: str | None = None  # null: Slurm when sbatch is found; `local` runs tasks as local processes
    folder: str | None = None  # submitit's logs and pickles; null: RESULTS_DIR/slurm/SWEEP_ID

    def __post_init__(self) -> None:
        for key in ("time_min", "array_parallelism", "cpus_per_task"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"slurm.{key}={getattr(self, key)}: must be >= 1")
        if self.cluster not in (None, "slurm", "local", "debug"):
            raise ConfigError(f"slurm.cluster={self.cluster}: allowed: null (auto), slurm, local, debug")


@functools.cache
def register_schema() -> None:
    """Typed schemas: `run`, and one per workload family, which each workload preset YAML extends through its
    defaults list (`- /schema/workload/gpt@_here_`), so every dataclass field can be overridden and a typo or a
    wrong type fails at composition. Once per process: Hydra's ConfigStore is a process-wide singleton."""
    confpath.install()  # MEMBENCH_CONF_PATH's roots join every composition from here on
    for mod in pkgutil.iter_modules(wl_pkg.__path__):  # each workload module registers its schema on import
        importlib.import_module(f"membench.workloads.{mod.name}")
    for root in confpath.extra_roots():  # workloads from outside: their preset YAML names the module to import
        for path in sorted((root / "workload").glob("*.yaml")):
            target = (OmegaConf.load(path) or {}).get("_target_")
            if target:
                locate(target)
    technique.discover()
    cs = ConfigStore.instance()
    cs.store(group="schema", name="run", node=RunConfig, package="run")
    cs.store(group="schema", name="slurm", node=SlurmConfig, package="slurm")
    for name, cls in SCHEMAS.items():
        node = OmegaConf.structured(cls)
        OmegaConf.set_struct(node, False)
        node._target_ = f"{cls.__module__}.{cls.__name__}"
        OmegaConf.set_struct(node, True)
        for key in ("overrides", "options"):  # free-form dicts (hf config attributes, custom factory kwargs)
            if key in node:
                OmegaConf.set_struct(node._get_node(key), False)
        cs.store(group="schema/workload", name=name, node=node)


def build(node: DictConfig | dict, key: str) -> Any:
    """Type-check a `_target_` node against its dataclass and construct it; errors name `key`."""
    node = OmegaConf.create(node) if isinstance(node, dict) else node
    target = node.get("_target_")
    if target is None:
        raise ConfigError(f"{key}: missing _target_")
    try:
        cls = locate(target)
    except confpath.MissingDependency as e:
        raise ConfigError(f"{key}: {e}") from None
    body = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "_target_"}
    try:
        typed = OmegaConf.merge(OmegaConf.structured(cls), body)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{key}.{e.full_key}: {_first_line(e)}") from None
    kwargs = OmegaConf.to_container(typed, resolve=True)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in kwargs.items() if k in names})


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]


def build_run(node: DictConfig | dict) -> RunConfig:
    body = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(body) - names)
    if unknown:
        raise ConfigError(f"run.{unknown[0]}: unknown key; allowed: {', '.join(sorted(names))}")
    return RunConfig(**body)
