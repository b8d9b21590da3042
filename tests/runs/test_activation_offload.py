"""activation_offload: what moves (saved activations, not parameters, each tensor once; under checkpointing only the
block inputs), backward is bit-exact with every tensor moved, a CPU run is a measured no-op, and the prediction puts
the activations on the host on CUDA only. The moving logic runs on CPU with source="cpu" (plain synchronous copies)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from membench.errors import ConfigError
from membench.predict import place_activations
from membench.techniques.activation_offload import ActivationOffload, Offloader
from tests.helpers import compose, run_inprocess

B, H, F = 8, 64, 256  # batch rows, width, hidden width of the toy MLP blocks


def _moved(fn, min_bytes=1024) -> tuple[int, int]:
    off = Offloader("cpu", min_bytes=min_bytes)
    with off.hooks():
        out = fn()
    out.backward()
    return off.moved_bytes, off.moved_tensors


def test_moves_the_saved_activations_not_the_weight():
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(H, H), torch.randn(B, H, requires_grad=True)
    # addmm saves its input and weight.t() (a view of the parameter: stays); relu saves its output
    assert _moved(lambda: lin(x).relu().sum()) == (2 * B * H * 4, 2)
    assert _moved(lambda: lin(x).relu().sum(), min_bytes=B * H * 4 + 1) == (0, 0)


def test_a_tensor_saved_by_three_matmuls_moves_once():
    torch.manual_seed(0)
    q, k, v = (torch.nn.Linear(H, H, bias=False) for _ in range(3))
    x = torch.randn(B, H, requires_grad=True)
    assert _moved(lambda: (q(x) + k(x) + v(x)).sum()) == (B * H * 4, 1)


def _blocks():
    torch.manual_seed(0)
    return [torch.nn.Sequential(torch.nn.Linear(H, F), torch.nn.GELU(), torch.nn.Linear(F, H)) for _ in range(2)]


def test_under_checkpointing_only_the_block_inputs_move():
    blocks, x = _blocks(), torch.randn(B, H, requires_grad=True)

    def plain():
        h = x
        for b in blocks:
            h = b(h)
        return h.sum()

    def ckpt():
        h = x
        for b in blocks:
            h = checkpoint(b, h, use_reentrant=False)
        return h.sum()

    # per block: linear1's input (B x H), GELU's input and linear2's input (B x F each)
    assert _moved(plain) == (2 * (B * H + 2 * B * F) * 4, 6)
    assert _moved(ckpt) == (2 * B * H * 4, 2)  # each checkpointed block's input, nothing it recomputes


def test_backward_is_bit_exact_with_every_saved_tensor_moved():
    from membench.config import build

    cfg = compose("workload=llama_tiny", "run.batch_size=2")
    grads = []
    for hooks in (False, True):
        wl = build(cfg["workload"], "workload").build(0)
        off = Offloader("cpu", min_bytes=0)
        with off.hooks() if hooks else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            loss = wl.loss(wl.model, wl.batch(0, 2, torch.device("cpu")))
        loss.backward()
        grads.append([p.grad.clone() for p in wl.model.parameters()])
        if hooks:
            assert off.moved_tensors > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


STEPS = ("workload=gpt_tiny", "run.train_steps=4", "run.warmup_steps=1", "run.measure_steps=1")


def test_on_cpu_it_runs_and_moves_nothing():
    base = run_inprocess(*STEPS)
    off = run_inprocess(*STEPS, "technique=[activation_offload]")
    assert off["quality"]["loss_curve"] == base["quality"]["loss_curve"]
    assert off["technique_info"]["activation_offload.moved_bytes_per_forward"] == 0
    assert off["technique_info"]["activation_offload.moves"].startswith("nothing: on cpu")
    assert off["memory"]["by_category"] == base["memory"]["by_category"]
    # no CUDA device: the record predicts every activation on the device, none on the host
    assert (
        off["memory"]["predicted_by_category"]["activations"] == base["memory"]["predicted_by_category"]["activations"]
    )


def test_the_planner_offers_it_on_cuda_only():
    assert ActivationOffload.plan_values(1, "cpu") == []
    assert ActivationOffload.plan_values(1, "cuda") == [{}]


def test_prediction_moves_activations_to_the_host_on_cuda():
    act = {"layers": 800.0, "head": 200.0, "total": 1000.0}  # 4 blocks of 200 bytes each, a 200-byte head
    assert place_activations(act, 4, True, "cuda") == (400.0, 1000.0)  # head + one block in flight; all on host
    assert place_activations(act, 4, True, "cpu") == (1000.0, 0.0)
    assert place_activations(act, 4, False, "cuda") == (1000.0, 0.0)
    assert place_activations({"total": None}, 4, True, "cuda") == (None, 0.0)


def test_rejects_a_negative_knob():
    with pytest.raises(ConfigError, match=r"^technique.activation_offload.min_bytes=-1: must be >= 0"):
        compose("workload=gpt_tiny", "technique=[activation_offload]", "technique.activation_offload.min_bytes=-1")


@pytest.mark.gpu
def test_cuda_moves_activations_to_the_host_column(tmp_path):
    from membench.sweep import run_cell

    cuda = ("workload=gpt_tiny", "run.device=cuda", "run.train_steps=4", "run.warmup_steps=1", "run.measure_steps=1")
    base = run_cell(compose(*cuda), str(tmp_path), 300)
    off = run_cell(compose(*cuda, "technique=[activation_offload]"), str(tmp_path), 300)
    assert off["status"] == "ok", off.get("error")
    assert off["quality"]["loss_curve"] == base["quality"]["loss_curve"]
    moved = off["technique_info"]["activation_offload.moved_bytes_per_forward"]
    assert moved > 0
    assert off["memory"]["by_device"]["cpu"]["tracker_peak_bytes"] >= moved  # the host copies, in the host column
    assert off["memory"]["held_after_forward"]["activations"] < base["memory"]["held_after_forward"]["activations"]
