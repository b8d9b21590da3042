"""fused_ce: the loss never holds the full logits, its gradients are autograd's, and the loss curve is the plain one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from membench.errors import ConfigError
from membench.techniques.fused_ce import ChunkedLinearCE, FusedCE
from tests.helpers import compose, run_inprocess

STEPS = ("run.train_steps=4", "run.warmup_steps=1", "run.measure_steps=1")
FUSED = ("technique=[fused_ce]", "technique.fused_ce.chunk_size=64")
BIG_VOCAB = 8192


def test_gradients_are_autograds():
    """gradcheck in fp64, with chunks that do not divide the tokens."""
    torch.manual_seed(0)
    h = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 20, (37,))
    assert torch.autograd.gradcheck(lambda a, b: ChunkedLinearCE.apply(a, b, t, 5, torch.float64), (h, w))
    loss = ChunkedLinearCE.apply(h, w, t, 5, torch.float64)
    assert loss.item() == pytest.approx(F.cross_entropy(h @ w.T, t).item(), rel=1e-12)


@pytest.mark.parametrize("workload", ["gpt_tiny", "llama_tiny", "hf_gpt2_tiny"])
def test_loss_curve_within_1e_4_of_the_plain_loss(workload):
    base = run_inprocess(f"workload={workload}", *STEPS)["quality"]
    fused = run_inprocess(f"workload={workload}", *STEPS, *FUSED)["quality"]
    assert fused["loss_curve"] == pytest.approx(base["loss_curve"], rel=1e-4)
    assert fused["value"] == pytest.approx(base["value"], rel=1e-4)


@pytest.fixture(scope="module")
def big_vocab():
    over = ("workload=llama_tiny", f"workload.vocab_size={BIG_VOCAB}", *STEPS)
    return run_inprocess(*over), run_inprocess(*over, *FUSED), compose(*over)


def test_saved_bytes_fall_by_the_fp32_logits(big_vocab):
    """Saved for backward at the end of forward: the fp32 log-softmax of every token (tokens x vocab x 4 bytes)
    goes, an fp32 logsumexp per token (tokens x 4) comes."""
    base, fused, cfg = big_vocab
    tokens = cfg["run"]["batch_size"] * cfg["workload"]["seq_len"]
    fell = base["memory"]["held_after_forward"]["activations"] - fused["memory"]["held_after_forward"]["activations"]
    assert fell == pytest.approx(tokens * BIG_VOCAB * 4 - tokens * 4, rel=0.01)
    assert fused["quality"]["loss_curve"] == pytest.approx(base["quality"]["loss_curve"], rel=1e-4)


def test_peak_falls_by_at_least_the_logits_and_their_gradient(big_vocab):
    base, fused, cfg = big_vocab
    tokens = cfg["run"]["batch_size"] * cfg["workload"]["seq_len"]
    assert base["memory"]["peak_bytes"] - fused["memory"]["peak_bytes"] >= 2 * tokens * BIG_VOCAB * 4 * 0.95


def test_the_activation_prediction_follows(big_vocab):
    _, fused, _ = big_vocab
    assert abs(fused["memory"]["relative_error"]["activations"]) < 0.03


def test_runs_on_fake_tensors():
    """The planner simulates it: one step on fake tensors, with fewer activation bytes than the plain loss."""
    from membench.config import build
    from membench.simulate import simulate_once

    cfg = compose("workload=llama_tiny", f"workload.vocab_size={BIG_VOCAB}")
    wcfg = build(cfg["workload"], "workload")
    plain = simulate_once(wcfg, [], batch_size=8)
    fused = simulate_once(wcfg, [FusedCE(chunk_size=64)], batch_size=8)
    assert fused["peak_bytes"] < plain["peak_bytes"] - 8 * 64 * BIG_VOCAB * 4


def test_rejections():
    with pytest.raises(ConfigError, match="impl"):
        FusedCE(impl="nope")
    with pytest.raises(ConfigError, match="CUDA"):
        FusedCE(impl="liger").check({"fused_ce"}, "cpu")
    from membench.config import build
    from membench.technique import Context

    wl = build(compose("workload=digits_cnn_tiny")["workload"], "workload").build(0)
    assert "no language-model head" in FusedCE().check_model(wl.model, wl.blocks())
    lm = build(compose("workload=llama_tiny")["workload"], "workload").build(0)
    assert FusedCE().check_model(lm.model, lm.blocks()) is None
    with pytest.raises(ConfigError, match="no language-model head"):
        FusedCE().apply(wl.model, Context(workload=wl, device=torch.device("cpu"), run=None))
