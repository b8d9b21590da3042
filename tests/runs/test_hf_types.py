"""Every model type the `hf` workload names in its one-line error runs with the `hf` preset as written in
docs/workloads.md (`membench run workload=hf workload.model_type=T`): a tiny model built from transformers' own
config class (offline, random weights), a few real training steps, an evaluation (issue 20: phi3 failed at run time
on a pad_token_id outside the byte vocabulary; gpt2, opt and gpt_neox refused the preset's Llama names)."""

from __future__ import annotations

import math

import pytest

from membench.config import build
from tests.helpers import compose, run_inprocess

pytest.importorskip("transformers")

from membench.workloads.hf import COMMON_TYPES  # noqa: E402 - needs transformers only when built

STEPS = ("run.train_steps=4", "run.warmup_steps=1", "run.measure_steps=1", "run.batch_size=2")


@pytest.mark.parametrize("model_type", COMMON_TYPES)
def test_every_named_model_type_runs_with_the_hf_preset(model_type):
    cfg = compose("workload=hf", f"workload.model_type={model_type}")
    wl = build(cfg["workload"], "workload").build(0)
    hf = wl.hf_cfg
    # the preset's geometry reached the type's own attributes (attribute_map or the MLP-width synonym)
    assert (hf.model_type, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads) == (model_type, 64, 2, 4)
    assert len(wl.blocks()) == 2 and hf.vocab_size == 256
    width = next(getattr(hf, k) for k in ("intermediate_size", "n_inner", "ffn_dim") if getattr(hf, k, None))
    assert width == 176
    adapted = wl.info()["hf_overrides_adapted"]
    assert (getattr(hf, "num_key_value_heads", None) == 2) != any(
        "num_key_value_heads" in i for i in adapted["ignored"]
    )
    record = run_inprocess("workload=hf", f"workload.model_type={model_type}", *STEPS)
    assert math.isfinite(record["quality"]["value"]) and record["quality"]["metric"] == "eval_loss"
    assert all(math.isfinite(x) for x in record["quality"]["loss_curve"])


def test_a_special_token_outside_the_vocabulary_is_dropped_and_recorded_or_refused_when_given():
    from membench.errors import ConfigError

    wl = build(compose("workload=hf", "workload.model_type=phi3")["workload"], "workload").build(0)
    assert wl.hf_cfg.pad_token_id is None  # phi3's default 32000 cannot index a 256-byte vocabulary
    assert any(i.startswith("pad_token_id=32000") for i in wl.info()["hf_overrides_adapted"]["ignored"])
    with pytest.raises(
        ConfigError, match=r"workload.overrides.pad_token_id=300: outside the vocabulary; allowed: 0..255"
    ):
        compose("workload=hf", "workload.model_type=phi3", "+workload.overrides.pad_token_id=300")


def test_a_config_transformers_refuses_is_one_line(monkeypatch):
    import transformers

    from membench.errors import ConfigError

    def refuse(model_type, **kw):
        raise ValueError("num_key_value_heads must match\nnum_attention_heads")

    monkeypatch.setattr(transformers.AutoConfig, "for_model", refuse)
    with pytest.raises(
        ConfigError, match=r"the llama config refuses it \(ValueError: num_key_value_heads must match num"
    ):
        compose("workload=hf")
