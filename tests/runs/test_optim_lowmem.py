"""Each low-memory optimizer's predicted state bytes equal the bytes of the states it really holds after two steps."""

from __future__ import annotations

import pytest
import torch

from membench import technique as registry
from membench.config import build
from membench.errors import ConfigError
from membench.execute import state_bytes
from membench.technique import Context
from tests.helpers import compose

ALGOS = ("adafactor", "adam_mini", "galore", "apollo")


def _two_steps(workload: str, algo: str):
    cfg = compose(f"workload={workload}", "technique=[optimizer_lowmem]", f"technique.optimizer_lowmem.algo={algo}")
    torch.manual_seed(0)
    wl = build(cfg["workload"], "workload").build(0)
    techs = [build(node, f"technique.{k}") for k, node in cfg["technique"].items()]
    predicted = registry.model_states(wl.model, wl.blocks(), techs, 1)["device"]["optimizer"]
    model, patch = registry.apply_all(techs, wl.model, Context(workload=wl, device=torch.device("cpu"), run=None))
    opt = patch.optimizer_factory(model)
    losses = []
    for i in range(2):
        loss = wl.loss(model, wl.batch(i, 4, torch.device("cpu")))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return predicted, state_bytes(model, opt, patch.extra_state())["cpu"]["optimizer"], model, losses


@pytest.mark.parametrize("workload", ["gpt_tiny", "llama_tiny"])
@pytest.mark.parametrize("algo", ALGOS)
def test_predicted_state_bytes_are_exact(workload, algo):
    predicted, real, model, losses = _two_steps(workload, algo)
    adamw = 8 * sum(p.numel() for p in model.parameters())  # fp32 AdamW's m and v
    assert predicted == real
    assert real < adamw
    assert losses[1] < losses[0]  # it trains


def test_adafactor_state_is_the_factors():
    # independent count: gpt_tiny's 2-D tensors keep rows + cols, 1-D ones their size, every tensor a 4-byte step
    cfg = compose("workload=gpt_tiny")
    model = build(cfg["workload"], "workload").build(0).model
    ps = list(model.parameters())
    factors = sum(p.shape[0] + p.shape[1] if p.dim() == 2 else p.numel() for p in ps)
    _, real, _, _ = _two_steps("gpt_tiny", "adafactor")
    assert real == 4 * factors + 4 * len(ps)


def test_declared_incompatible_with_other_optimizer_replacements():
    for other in ("optimizer_8bit", "optimizer_in_backward"):
        with pytest.raises(ConfigError, match="incompatible"):
            compose("workload=gpt_tiny", f"technique=[optimizer_lowmem,{other}]")


def test_unknown_algo_is_rejected():
    with pytest.raises(ConfigError, match="algo"):
        compose("workload=gpt_tiny", "technique=[optimizer_lowmem]", "technique.optimizer_lowmem.algo=lion")


@pytest.mark.parametrize("algo", ALGOS)
def test_a_run_records_the_predicted_state_bytes(algo):
    from tests.helpers import run_inprocess

    r = run_inprocess("workload=gpt_tiny", "run.train_steps=4", "run.warmup_steps=1", "run.measure_steps=1",
                      "technique=[optimizer_lowmem]", f"technique.optimizer_lowmem.algo={algo}")  # fmt: skip
    m = r["memory"]
    assert m["predicted_by_category"]["optimizer"] == m["model_states"]["optimizer"]
    assert m["by_device"]["cpu"]["by_category"]["optimizer"] == m["model_states"]["optimizer"]  # tracked as such
