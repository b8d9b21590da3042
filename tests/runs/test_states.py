"""The pure model-state pipeline (Technique.states) against independent counts: bitsandbytes' real 8-bit state
bytes under a quantized base, and DeepSpeed's reduce bucket in closed form from the technique's config."""

from __future__ import annotations

import pytest
import torch

from membench.technique import Context, apply_all, model_states
from membench.techniques.optim8bit import Optimizer8bit
from membench.techniques.precision import BF16
from membench.techniques.quantized_base import QuantizedBase
from membench.techniques.zero import Zero
from membench.workloads.gpt import GPT, GPTConfig

CPU = torch.device("cpu")
TINY = {"n_layer": 2, "n_head": 2, "d_model": 64, "seq_len": 32, "vocab_size": 256}


@pytest.mark.parametrize("freeze_rest", [True, False])
def test_8bit_states_under_a_quantized_base_are_sized_over_the_trainable_parameters(freeze_rest):
    """The planner prices 8-bit states on the model as built (every parameter trainable there); under a quantized
    base only adapters (and, unless freeze_rest, the layers left alone) carry state. Measured: bitsandbytes'
    AdamW8bit state tensors after one step over the model that QuantizedBase really made."""
    from membench.execute import state_bytes

    techs = [QuantizedBase(freeze_rest=freeze_rest), Optimizer8bit()]
    wcfg = GPTConfig(**TINY)
    wl = wcfg.build(0)
    fresh = wcfg.build(0).model
    planned = model_states(fresh, fresh.blocks, techs, world_size=1)
    model, patch = apply_all(techs, wl.model, Context(workload=wl, device=CPU, run=None))
    opt = patch.optimizer_factory(model)
    wl.loss(model, wl.batch(0, 2, CPU)).backward()
    opt.step()
    measured = state_bytes(model, opt, {})["cpu"]["optimizer"]
    assert planned["device"]["optimizer"] == measured
    everything = Optimizer8bit().total_bytes([p.numel() for p in fresh.parameters()])
    assert measured < everything  # what the planner used to predict: states over the whole model


@pytest.mark.parametrize(("stage", "bucket"), [(0, 0), (1, 5_000_000), (2, 5_000_000), (3, 5_000_000)])
def test_deepspeed_reduce_bucket_is_predicted_at_stages_1_to_3(stage, bucket):
    """docs/zero.md: stages 1-3 reduce gradients through a bucket of reduce_bucket_size elements in the gradient
    dtype (fp32: 4 bytes; DeepSpeed mixed precision: 2), allocated whole even where the model has fewer gradients
    (measured in tests/e2e/test_zero.py)."""
    with torch.device("meta"):  # 4 x 12 x 4096^2 + embeddings: far more than one bucket
        model = GPT(GPTConfig(n_layer=4, n_head=32, d_model=4096, seq_len=1024, vocab_size=5000))
    fp32 = model_states(model, model.blocks, [Zero(stage=stage, reduce_bucket_size=5_000_000)], world_size=8)
    mixed = model_states(model, model.blocks, [Zero(stage=stage, reduce_bucket_size=5_000_000), BF16()], world_size=8)
    torch_backend = model_states(model, model.blocks, [Zero(stage=stage, backend="torch")], world_size=8)
    # fp32 training: DeepSpeed still keeps an fp32 master partition (its optimizer's flat copy, 4 bytes x Psi / N at
    # stages 1-3); with bf16 it is inside the mixed-precision states (K = 12), not a buffer of its own
    psi = sum(p.numel() for p in model.parameters())
    master = {"fp32_master": 4 * psi / 8} if stage else {}
    # stages 1-2's optimizer step: the fp32 gradient partition and the inner (CPU, single-tensor) AdamW's two
    # temporaries over it; stage 3: the tensors above DeepSpeed's 1e5-element persistence threshold stay gathered
    # from forward into backward, at most stage3_max_live_parameters (1e9) elements (docs/plan.md)
    step = {}
    if stage in (1, 2):
        step = {"deepspeed_fp32_grad_partition": 4 * psi / 8, "deepspeed_optimizer_temps": 8 * psi / 8}
    partitioned = min(sum(p.numel() for p in model.parameters() if p.numel() > 100_000), 10**9)
    gathered = lambda nbytes: {"deepspeed_gathered_params": nbytes * partitioned} if stage == 3 else {}  # noqa: E731
    assert fp32["other"] == ({"deepspeed_reduce_bucket": 5_000_000 * 4} if bucket else {}) | master | step | gathered(4)
    assert mixed["other"] == ({"deepspeed_reduce_bucket": 5_000_000 * 2} if bucket else {}) | step | gathered(2)
    assert "deepspeed_reduce_bucket" not in torch_backend["other"]
    small = GPTConfig(**TINY).build(0).model  # fewer parameters than one bucket: DeepSpeed still allocates it whole
    tiny = model_states(small, small.blocks, [Zero(stage=2, reduce_bucket_size=10**9)], world_size=2)
    psi = sum(p.numel() for p in small.parameters())
    assert tiny["other"] == {"deepspeed_reduce_bucket": 4 * 10**9, "fp32_master": 4 * psi / 2,
                             "deepspeed_fp32_grad_partition": 4 * psi / 2, "deepspeed_optimizer_temps": 8 * psi / 2}


def test_zero_defaults_are_deepspeeds_own():
    """Bucket sizes default to DeepSpeed's, read from the installed package; stage 3's prefetch, live-parameter and
    persistence knobs are left out of the generated config, so DeepSpeed's defaults apply."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from membench.techniques.zero import DS_PERSISTENCE_THRESHOLD, _stage3_knobs

    fields = DeepSpeedZeroConfig.model_fields
    assert fields["param_persistence_threshold"].default == DS_PERSISTENCE_THRESHOLD
    z = Zero(stage=3)
    assert z.reduce_bucket_size == fields["reduce_bucket_size"].default
    assert z.allgather_bucket_size == fields["allgather_bucket_size"].default
    assert _stage3_knobs(z) == {}
    assert _stage3_knobs(Zero(stage=3, stage3_knobs="paper"))["stage3_param_persistence_threshold"] == 0


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fsdp_gathers_are_predicted_in_the_policys_dtype(stage):
    """torch stages 2-3: FSDP2's all-gathered parameters, counted from the model's own modules (every parameter at
    stage 2; the root's own plus the largest block at stage 3), at 2 bytes under bf16's MixedPrecisionPolicy and 4
    without a policy (fp32, or fsdp_param_dtype=float32: autocast over fp32 gathers). DDP and ZeRO-1 gather none."""
    model = GPTConfig(**TINY).build(0).model
    psi = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.blocks[0].parameters())
    root = psi - sum(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    elements = {0: 0, 1: 0, 2: psi, 3: root + block}[stage]

    def gathered(*techs):
        return model_states(model, model.blocks, list(techs), world_size=2)["other"].get("fsdp_unsharded_params", 0)

    assert gathered(Zero(stage=stage, backend="torch"), BF16()) == 2 * elements
    assert gathered(Zero(stage=stage, backend="torch")) == 4 * elements
    assert gathered(Zero(stage=stage, backend="torch", fsdp_param_dtype="float32"), BF16()) == 4 * elements
    assert gathered(Zero(stage=stage, backend="deepspeed"), BF16()) == 0


def test_the_policy_takes_the_step_out_of_autocast_and_the_activation_model_follows():
    """precision + zero compose in the techniques: under FSDP2's policy the bf16 step context is no autocast and
    the activation model is the all-16-bit one; DDP (stage 1) keeps autocast."""
    from membench.technique import Prediction

    wl = GPTConfig(**TINY).build(0)
    for stage, replaced in ((1, False), (3, True)):
        ctx = Context(workload=wl, device=CPU, run=None)
        patch = BF16().apply(wl.model, ctx)
        ctx.applied["bf16"] = patch.applied
        ctx.applied["zero"] = {"replaces_autocast": Zero(stage=stage, backend="torch").fsdp_param_dtype_for(
            torch.bfloat16) is not None}  # fmt: skip
        with patch.step_context():
            assert torch.is_autocast_enabled("cpu") is not replaced
        pred = Prediction()
        for t in (BF16(), Zero(stage=stage, backend="torch")):
            t.activation_terms(pred)
        assert (pred.autocast_dtype is None) is replaced
        assert pred.act_elem_bytes == 2
