"""The planner's model states against the libraries' own counts (issue 17): LoRA on a role subset priced on exactly
the targeted layers (PEFT's trainable count)."""

from __future__ import annotations

import pytest

from membench import plan as pl
from membench.config import build
from tests.helpers import compose

# PEFT's own module-name suffixes for each role, per workload (written from the model definitions, independent of
# the workloads' linear_roles() that the planner reads)
PEFT_NAMES = {
    "gpt_tiny": {"attention": ["attn.q", "attn.k", "attn.v", "attn.proj"], "mlp": ["fc", "fc_out"], "head": ["head"],
                 "q": ["attn.q"], "v": ["attn.v"]},
    "llama_tiny": {"attention": ["attn.q", "attn.k", "attn.v", "attn.o"], "mlp": ["gate", "up", "down"],
                   "head": ["head"], "q": ["attn.q"], "v": ["attn.v"]},
}  # fmt: skip


def _peft_trainable(workload: str, targets: list[str], rank: int) -> tuple[int, int]:
    """(trainable parameters, trainable tensors) by PEFT's get_peft_model on the real model."""
    from peft import LoraConfig, get_peft_model

    wl = build(compose(f"workload={workload}")["workload"], "workload").build(0)
    names = [n for t in targets for n in PEFT_NAMES[workload][t]]
    model = get_peft_model(wl.model, LoraConfig(r=rank, lora_alpha=16, target_modules=names))
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model.get_nb_trainable_parameters()[0], len(trainable)


@pytest.mark.parametrize("workload", ["gpt_tiny", "llama_tiny"])
@pytest.mark.parametrize("targets", [["attention"], ["q", "v", "head"], ["mlp"]], ids="+".join)
def test_lora_on_a_role_subset_is_priced_on_exactly_those_layers(workload, targets):
    """The plan's analytic model states under technique=[lora] with targets by role: grads 4 B and AdamW 8 B per
    trainable element plus a 4-byte step per trainable tensor, over PEFT's trainable set. (The planner refused
    roles other than `blocks`: its pure step had no linear_roles().)"""
    rank = 4
    n, tensors = _peft_trainable(workload, targets, rank)
    pc, user = pl.split_overrides([f"workload={workload}", "run.device=cpu", "run.memory_budget_mib=64", "plan.records=[/nonexistent]",
                                   "technique=[lora]", f"technique.lora.rank={rank}",
                                   f"technique.lora.targets=[{','.join(targets)}]", "plan.techniques=[]"])  # fmt: skip
    pc.simulate = 0
    (row,) = pl.plan(user, pc, progress=lambda m: None)["rows"]
    states = row["predictions"]["analytic"]["by_category"]
    assert states["grads"] == 4 * n
    assert states["optimizer"] == 8 * n + 4 * tensors


@pytest.mark.parametrize("workload", ["gpt_tiny", "digits_cnn_tiny"])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_structured_pruning_by_channels_is_priced_at_what_torch_pruning_removes(workload, ratio):
    """amount_of=channels: the plan's parameter and gradient bytes are those of the model torch-pruning leaves (the
    technique's apply on the real model, magnitude ranking), to the element. The former rule shrank every block
    tensor by 1 - ratio: on digits_cnn_tiny at 0.3 it kept 3,663 parameters where 2,350 stay (a conv loses input
    and output channels both; the stem and head follow), on gpt_tiny 106,972 where 100,518 stay (heads go)."""
    import torch

    from membench.technique import Context
    from membench.techniques.prune_structured import PruneStructured

    wl = build(compose(f"workload={workload}")["workload"], "workload").build(0)
    PruneStructured(ratio=ratio, amount_of="channels").apply(wl.model, Context(wl, torch.device("cpu"), None))
    params = sum(p.numel() for p in wl.model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in wl.model.buffers())
    pc, user = pl.split_overrides([f"workload={workload}", "run.device=cpu", "run.memory_budget_mib=64",
                                   "plan.records=[/nonexistent]", "technique=[prune_structured]",
                                   "technique.prune_structured.amount_of=channels",
                                   f"technique.prune_structured.ratio={ratio}", "plan.techniques=[]"])  # fmt: skip
    pc.simulate = 0
    (row,) = pl.plan(user, pc, progress=lambda m: None)["rows"]
    states = row["predictions"]["analytic"]["by_category"]
    assert states["grads"] == 4 * params
    assert states["params"] == 4 * params + buffers


def test_paged_8bit_states_of_a_cuda_plan_are_on_the_host():
    """bitsandbytes' paged optimizers (PagedAdamW8bit: optimizer_8bit's paged=auto on CUDA) put the state buffers of
    tensors of 1e5 elements or more in CUDA managed memory (cudaMallocManaged), outside the caching allocator: the
    plan counts those two uint8 codes per element in its host column, not in the device peak. A CPU plan (unpaged)
    keeps them on the device. (The planner counted them on the device for every plan before.)"""
    pytest.importorskip("bitsandbytes")
    wl = build(compose("workload=gpt_small")["workload"], "workload").build(0)
    paged = sum(2 * p.numel() for p in wl.model.parameters() if p.numel() >= 100_000)
    rows = {}
    for device in ("cuda", "cpu"):
        pc, user = pl.split_overrides(["workload=gpt_small", f"run.device={device}", "run.memory_budget_mib=4096",
                                       "plan.records=[/nonexistent]", "technique=[optimizer_8bit]",
                                       "plan.techniques=[]"])  # fmt: skip
        pc.simulate = 0
        (rows[device],) = pl.plan(user, pc, progress=lambda m: None)["rows"]
    assert paged > 0
    assert rows["cuda"]["host_bytes"] == paged and rows["cpu"]["host_bytes"] == 0
    cuda, cpu = (rows[d]["predictions"]["analytic"]["by_category"]["optimizer"] for d in ("cuda", "cpu"))
    assert cpu - cuda == paged


def test_the_fake_model_is_cloned_by_its_own_fake_mode_not_deep_copied():
    """torch-pruning prices structured pruning on a copy of the planner's fake model. `copy.deepcopy` of FakeTensors
    outside FakeCopyMode deep-copies their FakeTensorMode and corrupted the heap (segfaults in unrelated code later);
    `fake_clone` makes each tensor anew with the model's own mode: new tensors of the same shapes and dtypes,
    Parameters still Parameters, tied weights still tied, one mode, and `memo` maps the blocks onto the copy's."""
    import torch

    from membench.plan.predictors import fake_workload
    from membench.techniques.prune_structured import fake_clone

    for workload in ("gpt_tiny", "llama_tiny"):
        wl = fake_workload(build(compose(f"workload={workload}")["workload"], "workload"), 0)
        mode = next(wl.model.parameters()).fake_mode
        memo: dict = {}
        clone = fake_clone(wl.model, memo)
        pairs = list(zip(wl.model.parameters(), clone.parameters(), strict=True))  # parameters() skips a tied repeat
        assert all(c.fake_mode is mode and c is not p for p, c in pairs)
        assert all(isinstance(c, torch.nn.Parameter) and (c.shape, c.dtype) == (p.shape, p.dtype) for p, c in pairs)
        assert all(c.requires_grad == p.requires_grad for p, c in pairs)
        originals = list(wl.model.buffers())
        copies = list(clone.buffers())
        assert [(b.shape, b.dtype) for b in copies] == [(b.shape, b.dtype) for b in originals]
        assert not {id(b) for b in copies} & {id(b) for b in originals}
        assert memo[id(wl.blocks())] is not wl.blocks() and isinstance(memo[id(wl.blocks())], torch.nn.Module)
