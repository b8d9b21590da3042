"""Predictor (c): calibration from records measured on the same hardware profile.

From ok records whose hardware matches (CPU model and bf16 instructions for CPU runs; GPU name for CUDA runs, any GPU when planning
for CUDA on a machine without one), it derives: step-time ratios of a technique set against the baseline of
the same sweep, preset, batch and seed (pairs measured on a quiet machine where any exist); quality deltas
against that baseline; the ratio of the measured MemTracker peak to the record's own analytic sum (params +
grads + optimizer + activations); and on CUDA the allocator/tracker gap (the allocator's peak of the tracked
step / the tracker's). Medians over matching records; no fitting library is needed.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from membench import technique
from membench.records import cpu_flags, short_target
from membench.records import cpu_model as _cpu_model


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


def label(techniques: dict | None) -> str:
    """Short name of a technique set: ac:full+bf16+zero:2/off_opt."""
    registry = technique.discover()
    parts = []
    for kind, node in sorted((techniques or {}).items()):
        # options worth showing (Technique.label_opts); the rest stay at their YAML defaults in the plans enumerated
        shown = registry[kind].label_opts if kind in registry else ()
        opts = [str(node[o]) if node[o] != "cpu" else f"off_{o.split('_')[1][:3]}" for o in shown
                if node.get(o) not in (None, "none")]  # fmt: skip
        parts.append(kind + (":" + "/".join(opts) if opts else ""))
    return "+".join(parts) or "baseline"


def _pair(r: dict) -> tuple:
    """What a technique record's baseline must share with it: the same sweep (experiment), preset, batch and seed.
    A baseline from another study ran at another time, often under another load: pairing across studies gave
    checkpointing a step-time ratio of 0.71 (the pruning study's loaded baseline against the checkpointing study's
    cells), where the study itself measured 1.11."""
    exp = r["config"].get("experiment") or {}
    run = r["config"]["run"]
    return (exp.get("name"), r["config"]["workload"]["preset"], run["batch_size"], run.get("seed"))


def _loaded(r: dict) -> bool:
    return bool(((r.get("timing") or {}).get("load") or {}).get("loaded"))


def _quiet(rs: list[dict]) -> list[dict]:
    """The records taken on a quiet machine, if any (timing.load.loaded=false); else all of them."""
    return [r for r in rs if not _loaded(r)] or rs


class Calibration:
    def __init__(self, records: list[dict]):
        self.records = records
        self.base: dict[tuple, dict] = {}
        for r in records:
            if not r["config"].get("technique"):
                self.base[_pair(r)] = r

    def _matching(self, kinds_key: str, family: str | None) -> list[dict]:
        return [
            r
            for r in self.records
            if key(r["config"].get("technique")) == kinds_key
            and (family is None or short_target(r["config"]["workload"]["_target_"]) == short_target(family))
        ]

    def _paired(self, kinds_key: str, family: str | None) -> list[tuple[dict, dict]]:
        return [(r, self.base[_pair(r)]) for r in self._matching(kinds_key, family) if _pair(r) in self.base]

    def time_ratio(self, kinds_key: str, family: str | None = None) -> tuple[float, int] | None:
        """Median step-time ratio over (record, its own sweep's baseline) pairs; quiet pairs only where any."""
        pairs = self._paired(kinds_key, family)
        quiet = [(r, b) for r, b in pairs if not any(_loaded(x) for x in (r, b))]
        ratios = [r["timing"]["median_step_s"] / b["timing"]["median_step_s"] for r, b in (quiet or pairs)]
        return (statistics.median(ratios), len(ratios)) if ratios else None

    def quality_delta(self, kinds_key: str, family: str | None = None) -> tuple[float, str, int] | None:
        deltas, metric = [], ""
        for r, b in self._paired(kinds_key, family):
            if r["quality"]["metric"] == b["quality"]["metric"]:
                deltas.append(r["quality"]["value"] - b["quality"]["value"])
                metric = r["quality"]["metric"]
        return (statistics.median(deltas), metric, len(deltas)) if deltas else None

    def peak_factor(self, kinds_key: str, family: str | None = None) -> tuple[float, int] | None:
        """Median measured peak / the record's own analytic sum, for this technique set. The peak is the tracker's
        (schema 2: memory.by_device[device].tracker_peak_bytes; on CUDA the headline is the allocator's, whose
        extra is allocator_gap's to add), so the predictors all predict the same quantity."""
        ratios = []
        for r in self._matching(kinds_key, family):
            pred = r["memory"].get("predicted_by_category") or {}
            total = sum(v for v in pred.values() if v)
            if total:
                ratios.append(_tracker_peak(r) / total)
        return (statistics.median(ratios), len(ratios)) if ratios else None

    def allocator_gap(self) -> tuple[float, int] | None:
        """CUDA: median allocator peak / tracker peak of the same step (workspaces, kernel buffers)."""
        gaps = []
        for r in self.records:
            dev = _own_device(r).get("allocator_peak_bytes") or (r["memory"].get("device") or {}).get(
                "cuda_max_allocated_bytes"
            )
            tracker = _tracker_peak(r)
            if dev and tracker:
                gaps.append(dev / tracker)
        return (statistics.median(gaps), len(gaps)) if gaps else None

    def baseline_step_s(self, preset: str, batch_size: int) -> float | None:
        """Median over the baselines of this preset and batch (quiet ones where any)."""
        bs = _quiet([b for k, b in self.base.items() if k[1:3] == (preset, batch_size)])
        return statistics.median(b["timing"]["median_step_s"] for b in bs) if bs else None


def _own_device(r: dict) -> dict:
    """The run device's entry of memory.by_device (schema 2); {} for schema-1 records."""
    m = r["memory"]
    return (m.get("by_device") or {}).get(m.get("device_name") or "") or {}


def _tracker_peak(r: dict) -> float:
    return _own_device(r).get("tracker_peak_bytes") or r["memory"]["peak_bytes"]  # schema 1: the tracker's
