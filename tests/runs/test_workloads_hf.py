"""workload=hf: a transformers causal LM from a config; blocks from `_no_split_modules`; bad input in one line.
And the matrix of every technique on every new workload, each pair with its expected outcome."""

from __future__ import annotations

import json
import math

import pytest
import torch

from membench.cli import main
from membench.config import CONF_DIR, build
from membench.errors import ConfigError
from membench.predict import model_states, predict
from membench.techniques import compose as tcompose
from membench.techniques.base import Context
from tests.helpers import compose, run_inprocess

pytest.importorskip("transformers")

STEPS = ("run.train_steps=4", "run.warmup_steps=1", "run.measure_steps=1", "run.batch_size=2")
CATEGORIES = {"params", "grads", "optimizer", "activations", "other"}


def _workload(*overrides: str):
    cfg = compose(*overrides)
    return build(cfg["workload"], "workload").build(0), cfg


@pytest.mark.parametrize(
    "preset,block,n", [("hf", "LlamaDecoderLayer", 2), ("hf_gpt2_tiny", "GPT2Block", 2)], ids=["llama", "gpt2"]
)
def test_blocks_are_the_no_split_modules(preset, block, n):
    wl, _ = _workload(f"workload={preset}")
    assert [type(b).__name__ for b in wl.blocks()] == [block] * n
    assert all(b in set(wl.model.modules()) for b in wl.blocks())  # the model's own modules, not copies


def test_hf_llama_has_the_parameter_count_of_the_llama_workload_at_the_same_geometry():
    hf, _ = _workload("workload=hf")  # hidden 64, ffn 176, 2 layers, 4 q / 2 kv heads, byte vocab, untied
    ours, _ = _workload("workload=llama_tiny")
    assert sum(p.numel() for p in hf.model.parameters()) == sum(p.numel() for p in ours.model.parameters()) == 125_248


def test_checkpointing_on_an_hf_llama_is_exact_and_every_category_is_recorded():
    base = run_inprocess("workload=hf", *STEPS)
    ckpt = run_inprocess("workload=hf", *STEPS, "technique=[activation_checkpointing]")
    assert ckpt["quality"]["loss_curve"] == base["quality"]["loss_curve"]
    held = [r["memory"]["held_after_forward"]["activations"] for r in (base, ckpt)]
    assert held[1] < held[0]
    assert set(base["memory"]["by_category"]) >= CATEGORIES
    assert base["memory"]["predicted_by_category"]["activations"] is None  # no analytic model: not guessed


def test_a_local_config_json_is_read_and_overrides_apply_on_top(tmp_path):
    import transformers

    cfg = transformers.AutoConfig.for_model("gpt2", n_embd=32, n_layer=3, n_head=2, n_inner=100, vocab_size=300)
    cfg.to_json_file(tmp_path / "config.json")
    # the preset's overrides (n_embd=64, n_layer=2, vocab_size=256, ...) win over the file; n_inner comes from it
    wl, _ = _workload("workload=hf_gpt2_tiny", f"workload.config_path={tmp_path}", "workload.overrides.vocab_size=300")
    assert type(wl.model).__name__ == "GPT2LMHeadModel" and len(wl.blocks()) == 2
    assert wl.blocks()[0].mlp.c_fc.weight.shape == (64, 100)
    assert wl.model.get_input_embeddings().weight.shape == (300, 64)
    assert 255 < int(wl.train_ids.max()) < 300  # hashed trigrams fill the vocabulary


BAD = [
    (["workload.config_path=/nonexistent/config.json"], "workload.config_path=/nonexistent/config.json: no such file"),
    (["workload.model_type=nope"], "workload.model_type=nope: not a transformers causal LM type"),
    (["+workload.overrides.bogus=1"], "workload.overrides.bogus=1: not an attribute of the llama config"),
    (["workload.seq_len=128"], "workload.seq_len=128: > the config's max_position_embeddings=64"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_hf_input_is_one_line_exit_2(overrides, message, capsys, tmp_path):
    assert main(["run", "workload=hf", *overrides, f"run.results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("membench: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_a_bad_config_json_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert-ish"}))
    assert main(["run", "workload=hf", f"workload.config_path={tmp_path}", f"run.results_dir={tmp_path}"]) == 2
    assert "not a transformers causal LM type" in capsys.readouterr().err


# Every technique x every new workload: what applying it, one training step, the before-eval hooks and the evaluation
# do (zero: composition only, it needs a process group; tests/e2e/test_zero.py runs it). "ok" or the start of the one-line
# rejection.
TECHNIQUES = sorted(p.stem for p in (CONF_DIR / "technique").glob("*.yaml"))
NO_LINEAR = "has no nn.Linear in its blocks"
NOT_A_TENSOR = "technique.prune_structured: the model's output is not produced by a Linear/Conv2d layer"  # ModelOutput
SMALL = {"custom": ()}  # a small corpus and one eval batch keep the matrix cheap (pruning evaluates twice)
EXPECTED = {
    "llama_tiny": {"prune_structured": "workload.n_kv_head=2: structured pruning changed the attention widths"},
    "hf": {"prune_structured": NOT_A_TENSOR},
    "hf_gpt2_tiny": {
        "quantized_base": NO_LINEAR,
        "lora": "declares no linear",  # GPT-2's blocks are transformers Conv1D layers, not nn.Linear
        "weight_quant": "technique.weight_quant",
        "prune_unstructured": "the workload's blocks have no",
        "prune_structured": NOT_A_TENSOR,
    },
    "custom": {"fused_ce": "technique=[fused_ce] on workload custom: has no language-model head"},
}
PAIRS = [pytest.param(w, t, id=f"{w}-{t}") for w in EXPECTED for t in TECHNIQUES]
CUDA_ONLY = {"float8", "optimizer_offload"}  # their check() rejects a CPU run when the config is composed
# full checkpointing (the default mode) over a quantized base: the review's plan row whose run failed in evaluate
PAIRS.append(pytest.param("llama_tiny", "activation_checkpointing,quantized_base", id="llama_tiny-ckpt+quantized_base"))


@pytest.mark.parametrize("workload,technique", PAIRS)
def test_every_technique_on_the_new_workloads(workload, technique):
    from membench.execute import build_all

    small = SMALL.get(workload, ("workload.max_corpus_bytes=100000", "workload.eval_batches=1"))
    if technique in CUDA_ONLY:
        with pytest.raises(ConfigError, match=rf"^technique.{technique}: needs run.device=cuda"):
            compose(f"workload={workload}", f"technique=[{technique}]", *STEPS, *small)
        return
    cfg = compose(f"workload={workload}", f"technique=[{technique}]", *STEPS, *small)  # check() runs here
    if technique == "zero":
        return
    run, wcfg, techs, device = build_all(cfg)
    torch.manual_seed(0)
    wl = wcfg.build(0)
    ctx = Context(workload=wl, device=device, run=run)
    expected = EXPECTED[workload].get(technique, "ok")
    try:
        states = model_states(wl.model, wl.blocks(), techs, 1, roles=wl.linear_roles())  # as Trainer does
        model, patch = tcompose.apply_all(techs, wl.model, ctx)
        wl.model = model
        predict(wl, techs, states, ctx, 2)
        with patch.step_context():
            loss = wl.loss(model, wl.batch(0, 2, device))
        loss.backward()
        for hook in patch.before_eval:  # post-training quantizers reject here
            hook(model)
        with torch.no_grad():  # the run's quality section, as membench/execute.py evaluates it
            quality = wl.evaluate(model, device)
        assert math.isfinite(quality.value), quality
        outcome = "ok"
    except ConfigError as e:
        outcome = str(e)
        assert "\n" not in outcome
    except RuntimeError as e:
        outcome = f"RuntimeError: {e}"
    assert outcome.startswith(expected) or expected in outcome, outcome


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_the_fake_tensor_step_takes_the_real_steps_attention_path(model_type):
    """transformers counts a FakeTensor as tracing: without the workload's fake_tensor_context the planner's fake step
    builds an explicit causal mask per layer and repeats k/v to every head (+5.7-7% on these cells); with it the
    simulated peak is the run's, to the byte (both are MemTracker's counts of the same ops)."""
    from membench import simulate as sim
    from membench.plan.config import PlanConfig
    from membench.plan.verification import predict_one

    over = ("workload=hf", f"workload.model_type={model_type}", "run.batch_size=4", "run.train_steps=4",
            "run.warmup_steps=1", "run.measure_steps=1")  # fmt: skip
    measured = run_inprocess(*over)["memory"]["peak_bytes"]
    p = predict_one(compose(*over), PlanConfig())
    assert p["predictor"] == "simulation" and p["peak_bytes"] == measured
    # and the context is what makes it so: without it the fake step holds the mask and the repeated k/v
    cfg = build(compose(*over)["workload"], "workload")
    plain = sim.simulate(cfg, [], 4, max_layers=None, device="cpu")
    assert plain["peak_bytes"] == measured
    import contextlib
    from unittest import mock

    with mock.patch("membench.workloads.hf.HFWorkload.fake_tensor_context", lambda self: contextlib.nullcontext()):
        assert sim.simulate(cfg, [], 4, max_layers=None, device="cpu")["peak_bytes"] > measured
