"""float8 (torchao's float8 training): rejected off CUDA in one line; on CPU its conversion runs in torchao's
emulation mode, which checks which linears convert, that the loss stays within the declared tolerance and that the
model states do not change (a throughput technique, not a memory one)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from membench.config import build
from membench.errors import ConfigError
from membench.technique import model_states
from membench.techniques.float8 import Float8, eligible_linears
from tests.helpers import compose

CPU = torch.device("cpu")


def test_rejects_cpu_in_one_line():
    with pytest.raises(ConfigError, match=r"^technique.float8: needs run.device=cuda"):
        compose("workload=llama_tiny", "run.device=cpu", "technique=[float8]")


def test_converts_the_blocks_linears_and_keeps_the_loss():
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    cfg = compose("workload=llama_tiny", "run.batch_size=2")
    wl = build(cfg["workload"], "workload").build(0)
    batch = wl.batch(0, 2, CPU)
    plain = wl.loss(wl.model, batch).item()
    before = sum(p.numel() * p.element_size() for p in wl.model.parameters())
    chosen = {id(m) for m in eligible_linears(wl.blocks())}
    assert len(chosen) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 blocks; the head is outside the blocks
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name("tensorwise"), emulate=True)
    convert_to_float8_training(wl.model, config=config, module_filter_fn=lambda m, fqn: id(m) in chosen)
    assert sum(type(m).__name__ == "Float8Linear" for m in wl.model.modules()) == 14
    assert type(wl.model.head) is torch.nn.Linear
    loss = wl.loss(wl.model, batch)
    loss.backward()
    assert abs(loss.item() - plain) / plain < Float8.loss_rtol
    assert sum(p.numel() * p.element_size() for p in wl.model.parameters()) == before


def test_states_unchanged_and_the_weight_copy_named():
    cfg = compose("workload=llama_tiny")
    wl = build(cfg["workload"], "workload").build(0)
    plain = model_states(wl.model, wl.blocks(), [], 1)
    f8 = model_states(wl.model, wl.blocks(), [Float8()], 1)
    assert f8["device"] == plain["device"] and f8["host"] == plain["host"]
    assert f8["other"] == {"float8_weight_copy": 64 * 176}  # the largest converted weight (d_model x ffn), 1 byte each
