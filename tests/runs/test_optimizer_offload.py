"""optimizer_offload (torchao's CPUOffloadOptimizer, CUDA only) and optimizer_8bit's paged states: where each
technique's states live, in the prediction and, on a GPU, in the record."""

from __future__ import annotations

import pytest
import torch

from membench.errors import ConfigError
from membench.technique import model_states
from membench.techniques.optim8bit import Optimizer8bit
from membench.techniques.optimizer_offload import OptimizerOffload
from membench.workloads.gpt import GPTConfig
from tests.helpers import compose

CPU = torch.device("cpu")


def _mlp():
    # tensors of 8192 (offloaded: >= 4096 elements), 128, 1024 and 8 elements (kept on the device)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8))


def test_offload_rejects_cpu_in_one_line():
    with pytest.raises(ConfigError, match=r"^technique.optimizer_offload: needs run.device=cuda"):
        compose("workload=gpt_tiny", "run.device=cpu", "technique=[optimizer_offload]")


def test_offload_rejects_another_optimizer():
    with pytest.raises(ConfigError, match=r"incompatible: both replace the optimizer"):
        compose("workload=gpt_tiny", "technique=[optimizer_offload,optimizer_8bit]")


def test_offloaded_states_are_on_the_host():
    s = model_states(_mlp(), [], [OptimizerOffload()], 1)
    big, small = 8192, 128 + 1024 + 8
    # host: an fp32 copy of the big weight, its fp32 grad, AdamW's two fp32 moments and a 4-byte step
    assert s["host"] == {"params": big * 4, "grads": big * 4, "optimizer": big * 8 + 4}
    # device: every parameter and gradient still, AdamW states of the three small tensors only
    assert s["device"] == {"params": (big + small) * 4, "grads": (big + small) * 4, "optimizer": small * 8 + 3 * 4}


def test_offload_gradients_leaves_the_small_ones_and_one_in_flight():
    s = model_states(_mlp(), [], [OptimizerOffload(offload_gradients=True)], 1)
    assert s["device"]["grads"] == (128 + 1024 + 8 + 8192) * 4
    s = model_states(_mlp(), [], [OptimizerOffload(offload_gradients=True, minimal_size=1000)], 1)
    assert s["device"]["grads"] == (128 + 8 + 8192) * 4  # 1024 and 8192 offloaded, the larger one in flight


def test_paged_8bit_codes_are_counted_on_the_host():
    """bitsandbytes pages the buffers of tensors of >= 1e5 elements (CUDA only; on CPU the same buffers are plain):
    measured here as the code tensors bitsandbytes' AdamW8bit really made for those tensors."""
    import bitsandbytes as bnb

    model = GPTConfig(n_layer=1, n_head=2, d_model=128, seq_len=16, vocab_size=1024).build(0).model  # wte: 131072
    opt = bnb.optim.AdamW8bit(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    big = [st for p, st in opt.state.items() if p.numel() >= 100_000]
    paged = sum(st[k].untyped_storage().nbytes() for st in big for k in ("state1", "state2"))
    assert len(big) >= 1 and paged > 0
    on_cuda = model_states(model, model.blocks, [Optimizer8bit()], 1, device_type="cuda")
    on_cpu = model_states(model, model.blocks, [Optimizer8bit()], 1, device_type="cpu")
    unpaged = model_states(model, model.blocks, [Optimizer8bit(paged="off")], 1, device_type="cuda")
    assert on_cuda["host"]["optimizer"] == paged
    assert on_cuda["device"]["optimizer"] + paged == on_cpu["device"]["optimizer"] == unpaged["device"]["optimizer"]
    assert on_cpu["host"]["optimizer"] == unpaged["host"]["optimizer"] == 0


@pytest.mark.gpu
def test_cuda_record_holds_the_offloaded_states_on_the_host(tmp_path):
    from membench.sweep import run_cell

    cfg = compose("workload=gpt_tiny", "run.device=cuda", "run.train_steps=4", "run.warmup_steps=1",
                  "run.measure_steps=1", "technique=[optimizer_offload]")  # fmt: skip
    r = run_cell(cfg, str(tmp_path), 300)
    assert r["status"] == "ok", r.get("error")
    m = r["memory"]
    assert m["model_states_by_device"]["cpu"] == m["predicted_detail"]["model_states"]["host"]


def test_offloaded_gradients_reject_accumulation_in_one_line():
    from membench.config import RunConfig

    OptimizerOffload().check_run(RunConfig(batch_size=8, grad_accum_steps=2))  # gradients kept: accumulation works
    with pytest.raises(ConfigError, match=r"^run.grad_accum_steps=2: technique.optimizer_offload.offload_gradients"):
        OptimizerOffload(offload_gradients=True).check_run(RunConfig(batch_size=8, grad_accum_steps=2))


@pytest.mark.gpu
def test_cuda_record_counts_paged_codes_on_the_host(tmp_path):
    """PagedAdamW8bit's managed buffers are CPU tensors to torch: the record finds them on device cpu, as predicted."""
    from membench.sweep import run_cell

    cfg = compose("workload=gpt_tiny", "workload.d_model=512", "run.device=cuda", "run.train_steps=4",
                  "run.warmup_steps=1", "run.measure_steps=1", "technique=[optimizer_8bit]")  # fmt: skip
    r = run_cell(cfg, str(tmp_path), 300)
    assert r["status"] == "ok", r.get("error")
    m = r["memory"]
    host = m["predicted_detail"]["model_states"]["host"]["optimizer"]
    assert host > 0 and m["model_states_by_device"]["cpu"]["optimizer"] == host
