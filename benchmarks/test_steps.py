"""One benchmark per technique family: real training steps of a tiny CPU cell (GPU presets marked `gpu`).

Rounds are optimizer steps on successive batches (the model keeps training, as in a run); warm-up rounds
absorb first-step costs (allocator growth, lazy state creation). extra_info carries the cell's record
sections measured by membench itself: peak and bytes by category, model-state bytes, FLOPs, quality.
"""

from __future__ import annotations

import math

import pytest

from benchmarks.trainer import training_step
from membench.cells import configs as plan
from membench.execute import execute

CPU = ["run.num_threads=1"]  # one thread: on a shared machine two threads stall each other
ROUNDS, WARMUP = 30, 3
CELLS = {
    "baseline": ["workload=gpt_tiny", *CPU],
    "activation_checkpointing": ["workload=gpt_tiny", "technique=[activation_checkpointing]", *CPU],
    "precision_bf16": ["workload=gpt_tiny", "technique=[bf16]", *CPU],
    "optimizer_8bit": ["workload=gpt_tiny", "technique=[optimizer_8bit]", *CPU],
    "quantized_base_nf4": ["workload=gpt_tiny", "technique=[quantized_base]", *CPU],
    "digits_baseline": ["workload=digits_cnn_tiny", *CPU],
    "prune_structured": ["workload=digits_cnn_tiny", "technique=[prune_structured]", *CPU],
    "prune_unstructured": ["workload=digits_cnn_tiny", "technique=[prune_unstructured]", *CPU],
    # last: gloo prefixes the process's later log lines with [rank0]
    "zero_stage1_torch": [
        "workload=gpt_tiny",
        "technique=[zero]",
        "technique.zero.backend=torch",
        "technique.zero.stage=1",
        *CPU,
    ],
}
GPU = ["run.device=cuda"]
GPU_CELLS = {
    "gpu_baseline": ["workload=gpt2", *GPU],
    "gpu_activation_checkpointing": ["workload=gpt2", "technique=[activation_checkpointing]", *GPU],
    "gpu_bf16": ["workload=gpt2", "technique=[bf16]", *GPU],
}
PARAMS = [pytest.param(v, id=k) for k, v in CELLS.items()]
PARAMS += [pytest.param(v, id=k, marks=pytest.mark.gpu) for k, v in GPU_CELLS.items()]


def _config(overrides: list[str]) -> dict:
    (cell,) = plan(overrides, multirun=False)
    return cell


def _measured(config: dict) -> dict:
    """A short membench run of the same cell, in this process: what its record would say."""
    short = dict(config, run=dict(config["run"], warmup_steps=1, measure_steps=2, train_steps=5))
    out = execute(short)
    m, f, q = out["memory"], out["flops"], out["quality"]
    return {
        "peak_bytes": m["peak_bytes"],
        "by_category": m["by_category"],
        "model_states": m["model_states"],
        "flops_counted_per_step": f["counted_per_step"],
        "quality": {"metric": q["metric"], "value": q["value"], "train_steps": q["train_steps"]},
        "timing_note": out["timing"]["note"],
    }


@pytest.mark.parametrize("overrides", PARAMS)
def test_training_step(benchmark, overrides):
    config = _config(overrides)
    benchmark.extra_info.update(_measured(config), overrides=overrides)
    benchmark.group = config["workload"]["preset"]
    with training_step(config) as step:
        loss = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert math.isfinite(loss)
