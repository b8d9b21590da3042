"""Activation checkpointing is exact, saves activations and costs one extra forward of the wrapped blocks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers import compose, run_inprocess
from tests.helpers import held_activations as _held

STEPS = ("run.train_steps=6", "run.warmup_steps=1", "run.measure_steps=1")
MODES = {
    "none": (),
    "full": ("technique=[activation_checkpointing]",),
    "every_k": ("technique=[activation_checkpointing]", "technique.activation_checkpointing.mode=every_k"),
    "selective": ("technique=[activation_checkpointing]", "technique.activation_checkpointing.mode=selective"),
}


@pytest.fixture(scope="module", params=["gpt_tiny", "digits_cnn_tiny"])
def runs(request):
    wl = request.param
    extra = ("workload.n_layer=4",) if wl == "gpt_tiny" else ("workload.num_blocks=4",)
    return wl, {m: run_inprocess(f"workload={wl}", *extra, *STEPS, *ov) for m, ov in MODES.items()}


def test_losses_and_quality_are_bit_identical(runs):
    _, rs = runs
    base = rs["none"]["quality"]
    for mode, r in rs.items():
        assert r["quality"]["loss_curve"] == base["loss_curve"], mode
        assert r["quality"]["value"] == base["value"], mode


def test_saved_activation_bytes_fall(runs):
    _, rs = runs
    assert _held(rs["full"]) < _held(rs["every_k"]) < _held(rs["none"])
    assert _held(rs["selective"]) < _held(rs["none"])
    assert rs["full"]["memory"]["peak_bytes"] < rs["none"]["memory"]["peak_bytes"]


def test_measured_activation_bytes_match_the_analytic_model(runs):
    _, rs = runs
    for mode, r in rs.items():
        err = r["memory"]["relative_error"]["activations"]
        assert abs(err) < 0.03, (mode, err)


def _block_forward_flops(workload: str) -> list[int]:
    """FLOPs of one forward through each block, counted directly on the same batch."""
    from membench.config import build

    cfg = compose(f"workload={workload}", "workload.n_layer=4" if workload == "gpt_tiny" else "workload.num_blocks=4")
    wl = build(cfg["workload"], "workload").build(0)
    x, _ = wl.batch(0, cfg["run"]["batch_size"], torch.device("cpu"))
    m = wl.model
    with torch.no_grad():
        if workload == "gpt_tiny":
            h = m.tok(x) + m.pos(torch.arange(x.shape[1]))
        else:
            h = m.stem(x)
        inputs = []
        for blk in m.blocks:
            inputs.append(h)
            h = blk(h)
    per_block = []
    for blk, inp in zip(m.blocks, inputs, strict=True):
        with FlopCounterMode(display=False) as fc:
            blk(inp)
        per_block.append(fc.get_total_flops())
    return per_block


def test_recompute_costs_exactly_one_forward_of_the_checkpointed_blocks(runs):
    wl, rs = runs
    base = rs["none"]["flops"]["counted_per_step"]
    per_block = _block_forward_flops(wl)
    if wl == "gpt_tiny":
        # torch's non-reentrant checkpoint stops recomputing once the last saved tensor is rebuilt
        # (early stop): the block's final matmul (fc_out: 2 * tokens * 4h * h) is never re-run.
        tokens, h = 8 * 64, 64
        per_block = [f - 2 * tokens * 4 * h * h for f in per_block]
    assert rs["full"]["flops"]["counted_per_step"] - base == sum(per_block)
    # every_k with k=2 of 4 blocks: blocks 0 and 2 are recomputed
    assert rs["every_k"]["flops"]["counted_per_step"] - base == per_block[0] + per_block[2]
    # selective keeps matmul/conv outputs: recompute adds no matmul FLOPs
    assert rs["selective"]["flops"]["counted_per_step"] == base


# ---- selective policies by name ---------------------------------------------------------------------------------
def _selective(policy: str) -> tuple[str, ...]:
    return (*MODES["selective"], f"technique.activation_checkpointing.policy={policy}")


POLICIES = {"none": (), "matmul": _selective("matmul"), "megatron": _selective("megatron"), "op": _selective("op"),
            "full": MODES["full"]}  # fmt: skip


@pytest.fixture(scope="module", params=["gpt_tiny", "llama_tiny"])
def policy_runs(request):
    wl = request.param
    return wl, {p: run_inprocess(f"workload={wl}", "workload.n_layer=4", *STEPS, *ov) for p, ov in POLICIES.items()}


def test_every_policy_is_bit_identical(policy_runs):
    _, rs = policy_runs
    for policy, r in rs.items():
        assert r["quality"]["loss_curve"] == rs["none"]["quality"]["loss_curve"], policy


def test_policies_keep_what_they_name(policy_runs):
    # megatron keeps all but the attention core, matmul only matmul/attention outputs, op half of the matmuls too
    _, rs = policy_runs
    held = {p: _held(r) for p, r in rs.items()}
    assert held["none"] > held["megatron"] > held["matmul"] > held["op"] > held["full"], held


def test_megatron_with_a_fused_kernel_drops_the_logsumexp_only(policy_runs):
    # the fused kernel's output is the output projection's input (saved anyway): what goes is its fp32 logsumexp,
    # one per head and token in each of the 4 blocks
    wl, rs = policy_runs
    c = compose(f"workload={wl}")
    heads, tokens = c["workload"]["n_head"], c["run"]["batch_size"] * c["workload"]["seq_len"]
    assert _held(rs["none"]) - _held(rs["megatron"]) == 4 * heads * tokens * 4


def test_recompute_costs_follow_the_policy(policy_runs):
    _, rs = policy_runs
    flops = {p: r["flops"]["counted_per_step"] for p, r in rs.items()}
    assert flops["none"] == flops["matmul"] < flops["megatron"] < flops["full"]  # matmul redoes no counted op
    assert flops["matmul"] < flops["op"] < flops["full"]


def test_megatron_on_the_math_path_drops_the_attention_matrices():
    # SDPA's math path saves the b x h x s x s softmax probabilities (Korthikanti's 5as^2b terms): megatron drops them,
    # and what it holds equals what it holds with the fused kernel (the attention core keeps nothing either way)
    llama = ("workload=llama_tiny", "workload.n_layer=4", *STEPS)
    math = (*llama, "workload.attention_kernel=math")
    rs = {"none": run_inprocess(*math), "megatron": run_inprocess(*math, *_selective("megatron")),
          "fused": run_inprocess(*llama, *_selective("megatron"))}  # fmt: skip
    assert rs["megatron"]["quality"]["loss_curve"] == rs["none"]["quality"]["loss_curve"]
    c = compose(*llama)
    b, h, s = c["run"]["batch_size"], c["workload"]["n_head"], c["workload"]["seq_len"]
    assert _held(rs["none"]) - _held(rs["megatron"]) >= 4 * b * h * s * s * 4
    assert _held(rs["megatron"]) == _held(rs["fused"])
