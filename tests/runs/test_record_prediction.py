"""A run's record predicts its model states with the planner's one rule: `technique.model_states` (each technique's
pure `states` step) on the model as built, before any technique touched it. Computed here independently on a freshly
built workload, it must equal the record's prediction; where the rule is exact, it equals the measured bytes too."""

from __future__ import annotations

import pytest

from membench import technique
from membench.config import build
from tests.helpers import SHORT_RUN, compose, run_inprocess

CASES = {
    "baseline": ("workload=gpt_tiny",),
    "bf16_pure": ("workload=gpt_tiny", "technique=[bf16_pure]"),
    "bf16_pure_digits": ("workload=digits_cnn_tiny", "technique=[bf16_pure]"),  # BatchNorm buffers cast to bf16
    "qlora": ("workload=gpt_tiny", "technique=[quantized_base,lora]"),
    "optimizer_8bit": ("workload=gpt_tiny", "technique=[optimizer_8bit]"),
    "zero2_torch": ("workload=gpt_tiny", "technique=[zero]", "technique.zero.backend=torch", "technique.zero.stage=2"),
    "prune_structured": ("workload=gpt_tiny", "technique=[prune_structured]", "technique.prune_structured.ratio=0.3"),
}
# the rule is exact here: the prediction equals the bytes of the tensors themselves (ZeRO prices the paper's K without
# torch's step scalars; structured pruning's count is an estimate from its ratio)
EXACT = {"baseline", "bf16_pure", "bf16_pure_digits", "qlora", "optimizer_8bit"}


def _fresh_states(cfg: dict) -> dict:
    wl = build(cfg["workload"], "workload").build(cfg["run"]["seed"])
    techs = [build(node, f"technique.{k}") for k, node in (cfg.get("technique") or {}).items()]
    return technique.model_states(wl.model, wl.blocks(), techs, 1, roles=wl.linear_roles())


@pytest.mark.parametrize("case", list(CASES))
def test_record_predicts_the_pure_model_states(case):
    overrides = (*CASES[case], *SHORT_RUN)
    rec = run_inprocess(*overrides)
    pure = _fresh_states(compose(*overrides))
    m = rec["memory"]
    detail = m["predicted_detail"]
    assert detail["model_states"] == {"device": pure["device"], "host": pure["host"], "psi": pure["psi"]}
    assert detail["rules"]["model_states"] == pure["rule"]
    assert all(detail["other_terms"][k] == v for k, v in pure["other"].items())
    predicted = {k: m["predicted_by_category"][k] for k in ("params", "grads", "optimizer")}
    assert predicted == {k: pure["device"][k] + pure["host"][k] for k in predicted}
    if case in EXACT:
        assert predicted == m["model_states"]
    if case == "prune_structured":  # the ratio's estimate against torch-pruning's real count (within the search's 1%)
        after = rec["technique_info"]["prune_structured.after"]["params"]
        assert abs(pure["psi"] - after) / after < 0.05
