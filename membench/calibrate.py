"""Predictor (c): calibration from records measured on the same hardware profile.

From ok records whose hardware matches (CPU model and bf16 instructions for CPU runs; GPU name for CUDA runs, any GPU when planning
for CUDA on a machine without one), it derives: step-time ratios of a technique set against the baseline of
the same preset and batch; quality deltas against that baseline; the ratio of the measured MemTracker peak to
the record's own analytic sum (params + grads + optimizer + activations); and on CUDA the allocator/tracker
gap (max_memory_allocated / tracker peak). Medians over matching records; no fitting library is needed.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch


def _profile(record: dict) -> tuple[str, str] | None:
    dev = str((record.get("timing") or {}).get("device") or "")
    env = record.get("env") or {}
    if dev.startswith("cuda"):
        return ("cuda", env.get("gpu") or "")
    if dev.startswith("cpu"):
        return ("cpu", _cpu_name(env.get("cpu") or "", env.get("cpu_flags") or []))
    return None


def _cpu_name(model: str, flags: list[str]) -> str:
    """CPU model plus whether it has bf16 instructions: one cloud model name covers hosts with and without
    them, and 16-bit step times differ 20-40x between the two (membench.execute's precision note)."""
    return model + (" +bf16" if {"avx512_bf16", "amx_bf16"} & set(flags) else " -bf16")


def current_profile(device_type: str) -> tuple[str, str | None]:
    """Profile to match: this CPU's model, or this GPU's name (None: any GPU, when none is visible)."""
    from membench.records import _cpu_model, cpu_flags

    if device_type == "cuda":
        return ("cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return ("cpu", _cpu_name(_cpu_model(), cpu_flags()))


def load(roots: list[str], device_type: str) -> list[dict]:
    """ok records under `roots` (any depth) on the current hardware profile; single-rank runs only."""
    kind, name = current_profile(device_type)
    out = []
    for root in roots:
        for p in sorted(Path(root).rglob("*.json")):
            try:
                r = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(r, dict) or r.get("status") != "ok" or "memory" not in r:
                continue
            prof = _profile(r)
            if prof is None or prof[0] != kind or (name is not None and prof[1] != name):
                continue
            if int(r["config"]["run"].get("world_size", 1)) != 1:
                continue
            out.append(r)
    return out


def key(techniques: dict | None) -> str:
    """A technique set with its options, as the plan names it: kind(opt=value,...) sorted by kind."""
    parts = []
    for kind, node in sorted((techniques or {}).items()):
        opts = {k: v for k, v in node.items() if k != "_target_"}
        parts.append(kind + ("(" + ",".join(f"{k}={v}" for k, v in sorted(opts.items())) + ")" if opts else ""))
    return "+".join(parts) or "baseline"


# Options worth showing in a plan's short label (the rest stay at their YAML defaults in the plans enumerated).
_LABEL_OPTS = {"activation_checkpointing": ("mode",), "zero": ("stage", "offload_optimizer", "offload_params")}


def label(techniques: dict | None) -> str:
    """Short name of a technique set: ac:full+bf16+zero:2/off_opt."""
    parts = []
    for kind, node in sorted((techniques or {}).items()):
        opts = [str(node[o]) if node[o] != "cpu" else f"off_{o.split('_')[1][:3]}" for o in _LABEL_OPTS.get(kind, ())
                if node.get(o) not in (None, "none")]  # fmt: skip
        parts.append(kind + (":" + "/".join(opts) if opts else ""))
    return "+".join(parts) or "baseline"


class Calibration:
    def __init__(self, records: list[dict]):
        self.records = records
        self.base: dict[tuple, dict] = {}
        for r in records:
            if not r["config"].get("technique"):
                self.base[(r["config"]["workload"]["preset"], r["config"]["run"]["batch_size"])] = r

    def _matching(self, kinds_key: str, family: str | None) -> list[dict]:
        return [
            r
            for r in self.records
            if key(r["config"].get("technique")) == kinds_key
            and (family is None or r["config"]["workload"]["_target_"] == family)
        ]

    def time_ratio(self, kinds_key: str, family: str | None = None) -> tuple[float, int] | None:
        ratios = []
        for r in self._matching(kinds_key, family):
            b = self.base.get((r["config"]["workload"]["preset"], r["config"]["run"]["batch_size"]))
            if b is not None:
                ratios.append(r["timing"]["median_step_s"] / b["timing"]["median_step_s"])
        return (statistics.median(ratios), len(ratios)) if ratios else None

    def quality_delta(self, kinds_key: str, family: str | None = None) -> tuple[float, str, int] | None:
        deltas, metric = [], ""
        for r in self._matching(kinds_key, family):
            b = self.base.get((r["config"]["workload"]["preset"], r["config"]["run"]["batch_size"]))
            if b is not None and r["quality"]["metric"] == b["quality"]["metric"]:
                deltas.append(r["quality"]["value"] - b["quality"]["value"])
                metric = r["quality"]["metric"]
        return (statistics.median(deltas), metric, len(deltas)) if deltas else None

    def peak_factor(self, kinds_key: str, family: str | None = None) -> tuple[float, int] | None:
        """Median measured peak / the record's own analytic sum, for this technique set."""
        ratios = []
        for r in self._matching(kinds_key, family):
            pred = r["memory"].get("predicted_by_category") or {}
            total = sum(v for v in pred.values() if v)
            if total:
                ratios.append(r["memory"]["peak_bytes"] / total)
        return (statistics.median(ratios), len(ratios)) if ratios else None

    def allocator_gap(self) -> tuple[float, int] | None:
        """CUDA: median max_memory_allocated / MemTracker peak (the allocator's extra: workspaces, caching)."""
        gaps = []
        for r in self.records:
            dev = (r["memory"].get("device") or {}).get("cuda_max_allocated_bytes")
            if dev and r["memory"]["peak_bytes"]:
                gaps.append(dev / r["memory"]["peak_bytes"])
        return (statistics.median(gaps), len(gaps)) if gaps else None

    def baseline_step_s(self, preset: str, batch_size: int) -> float | None:
        b = self.base.get((preset, batch_size))
        return b["timing"]["median_step_s"] if b else None
