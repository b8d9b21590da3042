"""run.grad_accum_steps=k: the batch of step i split in k micro-batches trains like the whole batch (loss curve within
1e-4), holds one micro-batch's activations, and keeps the whole gradient buffer alive across the micro-steps."""

from __future__ import annotations

import pytest
import torch

from membench.errors import ConfigError
from membench.execute import split_batch
from membench.records import config_hash
from tests.helpers import compose, held_activations, run_inprocess

LLAMA = ("workload=llama_tiny", "run.batch_size=8", "run.train_steps=6", "run.warmup_steps=1", "run.measure_steps=1")


@pytest.fixture(scope="module")
def runs():
    out = {k: run_inprocess(*LLAMA, f"run.grad_accum_steps={k}") for k in (1, 2, 4)}
    out["half"] = run_inprocess(*LLAMA[:1], "run.batch_size=4", *LLAMA[2:])  # a batch of 4, unsplit
    return out


def _param_bytes(cfg) -> int:
    from membench.config import build

    model = build(cfg["workload"], "workload").build(0).model
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("k", [2, 4])
def test_loss_curve_equals_the_unsplit_batch(runs, k):
    base, acc = runs[1]["quality"]["loss_curve"], runs[k]["quality"]["loss_curve"]
    assert len(acc) == len(base) == 6
    assert max(abs(a - b) for a, b in zip(acc, base, strict=True)) < 1e-4


def test_gradients_persist_across_micro_steps(runs):
    grads = _param_bytes(compose(*LLAMA))  # fp32 gradient of every parameter
    # the unsplit step's forward runs with no gradient alive (zero_grad set them to None); the second micro-batch's
    # forward runs with the first one's whole gradient buffer
    assert runs[1]["memory"]["held_after_forward"]["grads"] == 0
    for k in (2, 4):
        assert runs[k]["memory"]["held_after_forward"]["grads"] == grads
        assert runs[k]["memory"]["by_category"]["grads"] == grads  # and at the step's peak
        assert runs[k]["memory"]["model_states"]["grads"] == grads


def test_activations_are_a_micro_batchs(runs):
    # k=2 over a batch of 8 holds what an unsplit batch of 4 holds, plus at most the whole batch's input tensors
    # (the micro-batches are views of them): 2 int64 tensors of 8 x 64 tokens
    batch_bytes = 2 * 8 * 64 * 8
    extra = held_activations(runs[2]) - held_activations(runs["half"])
    assert 0 <= extra <= batch_bytes
    assert held_activations(runs[2]) < 0.55 * held_activations(runs[1])
    assert runs[2]["memory"]["peak_bytes"] < runs[1]["memory"]["peak_bytes"]


def test_record_predicts_the_micro_batchs_activations(runs):
    assert (
        runs[2]["memory"]["predicted_by_category"]["activations"]
        == (runs["half"]["memory"]["predicted_by_category"]["activations"])
    )
    assert abs(runs[2]["memory"]["relative_error"]["activations"]) < 0.01


@pytest.mark.parametrize("value", ["0", "3"])
def test_rejects_a_count_that_does_not_divide_the_batch(value):
    with pytest.raises(ConfigError, match=rf"^run.grad_accum_steps={value}: must be >= 1 and divide run.batch_size=8"):
        compose(*LLAMA, f"run.grad_accum_steps={value}")


def test_optimizer_in_backward_rejects_accumulation():
    with pytest.raises(ConfigError, match=r"^run.grad_accum_steps=2: optimizer_in_backward steps in every backward"):
        run_inprocess(*LLAMA, "run.grad_accum_steps=2", "technique=[optimizer_in_backward]")


def test_split_batch_splits_every_tensor_along_samples():
    x, y = torch.arange(24).reshape(6, 4), torch.arange(6)
    parts = split_batch({"ids": x, "labels": y, "n": 3}, 3)
    assert [p["ids"].tolist() for p in parts] == [x[0:2].tolist(), x[2:4].tolist(), x[4:6].tolist()]
    assert [p["labels"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert [p["n"] for p in parts] == [3, 3, 3]
    assert split_batch((x, y), 1) == [(x, y)]


def test_default_leaves_the_cell_identity_unchanged():
    cfg = compose(*LLAMA)
    without = {**cfg, "run": {k: v for k, v in cfg["run"].items() if k != "grad_accum_steps"}}
    assert config_hash(cfg) == config_hash(without)
    assert config_hash(compose(*LLAMA, "run.grad_accum_steps=2")) != config_hash(cfg)


def test_planner_simulates_the_accumulated_step(runs):
    """The planner's fake-tensor step runs the k micro-batches too: its peak has the first micro-batch's gradients
    alive through the second's backward, as the run's has (a single micro-batch's step would miss them)."""
    from membench.plan.config import PlanConfig
    from membench.plan.verification import predict_one

    cfg = compose(*LLAMA, "run.grad_accum_steps=2")
    p = predict_one(cfg, PlanConfig())
    assert p["predictor"] == "simulation"
    batch_bytes = 2 * 8 * 64 * 8  # a run's micro-batches are views of the whole batch's input tensors
    assert abs(p["peak_bytes"] - runs[2]["memory"]["peak_bytes"]) <= batch_bytes
    one_micro = predict_one(compose(*LLAMA[:1], "run.batch_size=4", *LLAMA[2:]), PlanConfig())
    assert p["peak_bytes"] > one_micro["peak_bytes"]
