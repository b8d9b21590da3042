"""workload=custom: the example under examples/ runs under techniques like a built-in workload; bad factories
fail in one line with exit 2."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from membench.cli import main
from membench.config import build
from membench.errors import ConfigError
from membench.workloads.custom import CustomParts
from tests.helpers import compose, run_inprocess

STEPS = ("workload=custom", "run.train_steps=5", "run.warmup_steps=1", "run.measure_steps=2")


def test_the_example_runs_and_checkpointing_is_exact():
    base = run_inprocess(*STEPS)
    ckpt = run_inprocess(*STEPS, "technique=[activation_checkpointing]")
    assert ckpt["quality"]["loss_curve"] == base["quality"]["loss_curve"]
    assert ckpt["technique_info"]["activation_checkpointing.checkpointed_blocks"] == 4
    held = [r["memory"]["held_after_forward"]["activations"] for r in (base, ckpt)]
    assert held[1] < held[0]
    assert base["quality"]["metric"] == "heldout_loss" and base["workload"]["block_classes"] == ["ResidualBlock"]
    assert set(base["memory"]["by_category"]) >= {"params", "grads", "optimizer", "activations", "other"}


def test_factory_options_reach_the_model():
    wl = build(compose("workload=custom", "+workload.options={width: 48, depth: 3}")["workload"], "workload").build(0)
    assert len(wl.blocks()) == 3 and wl.blocks()[0].fc1.in_features == 48


BAD = [
    ("nope.mod:build", "workload.factory=nope.mod:build: cannot import nope.mod"),
    ("examples.custom_model", "workload.factory=examples.custom_model: expected package.module:function"),
    ("examples.custom_model:nope", "workload.factory=examples.custom_model:nope: examples.custom_model has no"),
]


@pytest.mark.parametrize("factory,message", BAD, ids=[b[0] for b in BAD])
def test_bad_factory_is_one_line_exit_2(factory, message, capsys, tmp_path):
    assert main(["run", "workload=custom", f"workload.factory={factory}", f"run.results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("membench: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


class _Block(nn.Linear):
    pass


def loose_blocks(seed: int) -> CustomParts:  # blocks not held in a ModuleList: techniques could not wrap them
    model = nn.Module()
    model.a, model.b = _Block(4, 4), _Block(4, 4)
    return CustomParts(model, lambda s, n, d: torch.zeros(n, 4), lambda m, b: b.sum(), (_Block,))


def test_blocks_outside_a_module_list_are_refused():
    cfg = compose("workload=custom", "workload.factory=tests.runs.test_workloads_custom:loose_blocks")
    with pytest.raises(ConfigError, match="no nn.ModuleList/Sequential holds only blocks of _Block"):
        build(cfg["workload"], "workload").build(0)
