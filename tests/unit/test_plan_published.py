"""The planner against the field's published numbers (issue 17, item 7), beside the ZeRO paper's Table 1
(tests/unit/test_plan.py). Nothing here is fitted to a published figure: each expected value is the publication's
own formula or measurement, and every difference is a named term (docs/plan.md, "Reproduced published numbers").

Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (arXiv:2205.05198), sec. 4
and Table 2: activation bytes per transformer layer with 16-bit activations, no tensor or sequence parallelism
(t = 1): sbh(34 + 5as/h) without recomputation, 34sbh with selective recomputation (the attention core recomputed),
2sbh with full recomputation. Their GPT-3 175B row (Table 3): h = 12288, a = 96, s = 2048, micro-batch b = 1.

torchtune README, "Optimization flags" (pytorch/torchtune, PR #2003): Llama 3.2 3B, full_finetune_single_device,
bf16 parameters, gradients and AdamW states, batch 2, packed to 4096 tokens, A100: "Peak Memory Active" 60.0 GiB
for the row without torch.compile."""

from __future__ import annotations

import pytest

from membench import plan as pl
from membench.simulate import simulate
from tests.helpers import compose, config_parts

H, A, S, B = 12288, 96, 2048, 1  # Korthikanti et al., Table 3, GPT-3 175B (t = 1)
SBH = S * B * H


def _per_layer(*techniques: str) -> int:
    """Activation bytes one more GPT layer holds at the end of forward (what backward will read), from the
    planner's fake-tensor simulation at 1 and 2 layers (its per-layer extrapolation), pure 16-bit (bf16_pure: the
    paper's fp16 bytes), dropout 0."""
    held = []
    for n_layer in (1, 2):
        wcfg, techs = config_parts(compose(
            "workload=gpt2_xl", f"workload.n_layer={n_layer}", f"workload.d_model={H}", f"workload.n_head={A}",
            f"workload.seq_len={S}", "workload.dropout=0.0", f"run.batch_size={B}", *techniques))  # fmt: skip
        held.append(simulate(wcfg, techs, B, max_layers=None)["after_forward"]["activations"])
    return held[1] - held[0]


def test_korthikanti_full_recomputation_holds_exactly():
    """Table 2, full recomputation: 2sbh (the layer's 16-bit input)."""
    got = _per_layer("technique=[bf16_pure,activation_checkpointing]", "technique.activation_checkpointing.mode=full")
    assert got == 2 * SBH


def test_korthikanti_without_recomputation_differs_by_named_terms():
    """Table 2, no recomputation: sbh(34 + 5as/h) = 114 sbh here. Does not hold for this model, by three terms:
    - 5as^2b (80 sbh at these settings: the softmax output 2as^2b, its dropout mask as^2b and dropout output 2as^2b)
      does not exist: scaled_dot_product_attention's fused kernel keeps no s x s matrix, only an fp32 logsumexp per
      head and query, 4asb bytes;
    - the two 1-byte dropout masks (attention output, MLP output: 2sbh) are absent at dropout 0;
    - the LayerNorms' mean and rstd per token (2 LayerNorms x 2 x 2 bytes on CPU kernels: 8sb), which the paper
      leaves out as O(sb).
    The remaining 32sbh are the paper's own terms, one for one."""
    got = _per_layer("technique=[bf16_pure]")
    paper = SBH * (34 + 5 * A * S / H)
    assert got == paper - 5 * A * S * S * B - 2 * SBH + 4 * A * S * B + 8 * S * B
    assert got / paper == pytest.approx(0.281, abs=0.001)  # the formula over-states this layer 3.6x


def test_korthikanti_selective_recomputation_holds_but_for_dropout_masks():
    """Table 2, selective recomputation (the attention core recomputed; Megatron's policy here): 34sbh. Holds but
    for the two dropout masks (2sbh, absent at dropout 0) and the LayerNorm statistics (8sb); the recomputed core
    also drops the logsumexp."""
    got = _per_layer("technique=[bf16_pure,activation_checkpointing]",
                     "technique.activation_checkpointing.mode=selective",
                     "technique.activation_checkpointing.policy=megatron")  # fmt: skip
    assert got == 34 * SBH - 2 * SBH + 8 * S * B


LLAMA_3_2_3B = ["workload=llama_1b", "workload.n_layer=28", "workload.n_head=24", "workload.n_kv_head=8",
                "workload.d_model=3072", "workload.ffn_dim=8192", "workload.tie_embeddings=true"]  # fmt: skip
GIB = 2**30


def test_torchtune_llama_3_2_3b_packed_row_within_10_percent():
    """The row without torch.compile: 60.0 GiB "Peak Memory Active" (torch.cuda active_bytes.all.peak). Planned as a
    CUDA plan on CPU (fake tensors run CPU kernels): the tracker's peak, 60.58 GiB. 10% (the issue's bar) covers what
    the plan does not model here: CPU vs CUDA kernels' saved tensors (RMSNorm keeps fp32 copies on CPU, the fused
    attention's logsumexp layout), the allocator's 512-byte rounding of every block, and torchtune's own model code
    (its RoPE cache, its loss upcasting the logits); the difference measured is +1.0%."""
    pc, user = pl.split_overrides([*LLAMA_3_2_3B, "workload.seq_len=4096", "run.batch_size=2", "run.device=cuda",
                                   "run.memory_budget_mib=81920", "plan.records=[/nonexistent]",
                                   "technique=[bf16_pure]", "plan.techniques=[]"])  # fmt: skip
    pc.simulate = 1
    (row,) = pl.plan(user, pc, progress=lambda m: None)["rows"]
    assert row["best_predictor"] == "simulation"
    assert abs(row["peak_bytes"] / GIB - 60.0) / 60.0 < 0.10
