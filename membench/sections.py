"""The measured sections of a record as typed dataclasses, and the names they are keyed by, defined once.

Keyword-only dataclasses, fields in the order their keys are written. A record on disk is JSON (schema_version 2, membench/records.py); each section here turns into exactly the keys it
has always had (`to_dict`) and back (`from_dict`, which names the first missing key). Keys a section does not
declare (a workload's own info, keys of a later schema) ride along in `more` and are written back unchanged, so a
record survives a round trip. Readers (report, compare, history, export) keep reading the dicts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

# The tracker's split of a device's bytes. optimizer = the optimizer's persistent state; optimizer_temp = what the
# optimizer step allocates and frees (foreach temporaries, DeepSpeed's flattened buffers); temporaries = backward's
# own (activation gradients). On CUDA by_category also has `untracked`: the allocator's peak of the same step minus
# the tracker's total.
CATEGORIES = ("params", "grads", "optimizer", "optimizer_temp", "activations", "temporaries", "other")
UNTRACKED = "untracked"
MODEL_STATES = ("params", "grads", "optimizer")  # counted exactly from tensors (memory.model_states)
PREDICTED_CATEGORIES = (*MODEL_STATES, "activations")  # what the analytic predictor splits
# The step schedule's phases, in order (membench/execute.py::_schedule); each metered by measure.PhaseMeter.
PHASES = ("setup", "warmup", "memory_step", "flop_step", "timed", "rest", "eval")
PLAIN_PHASES = ("timed", "rest")  # steps with no instrumentation active: the CUDA headline peak is theirs


class _Absent:
    """The value of a key a record does not have (distinct from a key whose value is null)."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


def optional() -> Any:
    """A key written only when the run has it (multi-rank, CUDA, energy counters, ...)."""
    return field(default=ABSENT)


@dataclass(kw_only=True)
class Section:
    """Base of every section: its record key, and the dict <-> dataclass conversion with unchanged keys."""

    KEY: ClassVar[str] = ""

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "more":
                out.update(value)
            elif value is not ABSENT:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict):
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields} - {"more"}
        for f in fields:
            if f.name not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"record: missing {cls.KEY}.{f.name}")
        known = {k: v for k, v in d.items() if k in names}
        return cls(**known, more={k: v for k, v in d.items() if k not in names})


@dataclass(kw_only=True)
class Memory(Section):
    """Bytes of an ok run (membench/assemble.py::memory_section says where each figure comes from)."""

    KEY: ClassVar[str] = "memory"
    peak_bytes: int
    peak_source: str
    device_name: str
    by_category: dict[str, int]  # CATEGORIES (+ UNTRACKED on CUDA) of the run device at its tracker peak
    by_device: dict[str, dict]
    held_after_forward: dict[str, int]
    held_after_forward_by_device: dict[str, dict]
    model_states: dict[str, int]
    model_states_by_device: dict[str, dict]
    extra_state_reattributed: Any
    predicted_by_category: dict[str, int]
    predicted_detail: dict
    relative_error: dict
    relative_error_basis: str
    phases: dict[str, dict]  # PHASES -> the phase's device counters
    device: dict  # whole-process high-water marks
    budget_mib: float | None
    headline: str = optional()  # multi-rank: which rank the figures are from
    per_rank: list = optional()
    more: dict = field(default_factory=dict)

    def check(self) -> None:
        """The categories and phases every ok record carries."""
        for k in CATEGORIES:
            if k not in self.by_category:
                raise ValueError(f"record: memory category {k} missing")
        for k in PREDICTED_CATEGORIES:
            if k not in self.predicted_by_category:
                raise ValueError(f"record: predicted memory category {k} missing")
        for p in PHASES:
            if p not in self.phases:
                raise ValueError(f"record: memory phase {p} missing")
        hist = self.phases["memory_step"].get("cuda_history_at_peak")  # run.cuda_memory_history: summary or error
        if hist is not None and not ("peak_allocated_bytes" in hist or hist.get("error")):
            raise ValueError("record: memory.phases.memory_step.cuda_history_at_peak has neither a peak nor an error")
        if self.device_name not in self.by_device:
            raise ValueError(f"record: memory.by_device has no entry for the run device {self.device_name}")


@dataclass(kw_only=True)
class OomMemory(Section):
    """What an oom run reached: the budget's own check carries its figure; a CUDA OOM has the allocator's peak."""

    KEY: ClassVar[str] = "memory"
    budget_mib: float | None
    peak_bytes: int | None = None
    peak_source: str | None = None
    more: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class Timing(Section):
    """Times of the plain timed steps (measure.timing_stats) and the run's context."""

    KEY: ClassVar[str] = "timing"
    step_times_s: list[float]
    median_step_s: float
    iqr_step_s: float
    total_measured_s: float
    samples_per_s: float
    tokens_per_s: float
    warmup_steps: int
    device: str
    note: str | None
    wall_by_phase_s: dict[str, float]
    load: dict = optional()
    energy_j_per_step: float = optional()
    energy_j_per_sample: float = optional()
    more: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class Flops(Section):
    KEY: ClassVar[str] = "flops"
    counted_per_step: int
    counted_by_op: dict[str, int]
    model_per_step: int | None
    cpu_attention_formula_added: bool
    grouped_attention_formula_added: bool = optional()  # absent from records made before it existed
    achieved_flops_per_s: float
    more: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class Quality(Section):
    KEY: ClassVar[str] = "quality"
    metric: str
    value: float
    higher_is_better: bool
    extra: dict
    loss_curve: list[float]
    train_steps: int
    loss_curve_note: str = optional()  # multi-rank: how the ranks' curves were combined
    more: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class Workload(Section):
    """The built workload; `more` holds the workload's own info (corpus, vocabulary, sample counts)."""

    KEY: ClassVar[str] = "workload"
    name: str
    preset: str
    num_params: int
    num_trainable_params: int
    tokens_per_sample: int
    more: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class Distributed(Section):
    KEY: ClassVar[str] = "distributed"
    world_size: int
    rank: int
    backend: str
    communication: dict
    batch_note: str
    more: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class Env(Section):
    """Provenance: code version, software versions and the hardware the run had."""

    KEY: ClassVar[str] = "env"
    git: dict
    python: str
    platform: str
    versions: dict[str, str | None]
    cpu: str
    cpu_flags: list[str]
    cpu_count: int | None
    device: str | None
    slurm: dict | None = optional()  # job id, array task, node, partition, CPUs under Slurm; null outside it
    torch_threads: int = optional()
    gpu: str = optional()
    cuda: str = optional()
    gpu_nvml: dict | None = optional()
    more: dict = field(default_factory=dict)


OK_SECTIONS = (Memory, Timing, Flops, Quality, Workload, Env)  # every ok record has these (and Distributed if N > 1)
