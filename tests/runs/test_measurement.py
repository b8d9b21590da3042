"""Measurement against independent counts: exact state bytes, bytes allocated on purpose, FLOP formulas, the
throughput arithmetic; device bookkeeping (host and device kept apart, each storage counted once)."""

from __future__ import annotations

import pytest
import torch

from membench import measure
from membench.measure import timing_stats
from tests.helpers import compose, exact_step_bytes, live_tensor_bytes, run_inprocess

STEPS = ("run.train_steps=4", "run.warmup_steps=1", "run.measure_steps=1")


@pytest.fixture(scope="module")
def gpt_base():
    return run_inprocess("workload=gpt_tiny", *STEPS)


def test_fp32_adamw_holds_16_bytes_per_parameter(gpt_base):
    n = gpt_base["workload"]["num_params"]
    n_tensors = 2 + 2 * 16 + 2 + 1  # tok+pos, 2 blocks x (2 LN + 6 Linear) x (w, b), ln_f w+b, head w
    states = gpt_base["memory"]["model_states"]
    assert states["params"] == 4 * n
    assert states["grads"] == 4 * n
    # AdamW: exp_avg + exp_avg_sq (8 bytes/param) + one fp32 `step` scalar per parameter tensor
    assert states["optimizer"] == 8 * n + 4 * n_tensors
    assert gpt_base["memory"]["predicted_by_category"]["params"] == 4 * n
    # the tracker at its peak (after forward: no grads, no optimizer temporaries) sees exactly the same states
    cats = gpt_base["memory"]["by_category"]
    assert (cats["params"], cats["optimizer"], cats["grads"], cats["optimizer_temp"]) == (
        4 * n,
        states["optimizer"],
        0,
        0,
    )


def test_counted_flops_equal_the_analytic_model_plus_flash_recompute(gpt_base):
    # FlopCounterMode (with the CPU flash-attention formula added) vs model FLOPs 6*N*T + 12*L*s*h*T.
    # Hardware FLOPs exceed model FLOPs by exactly the score recompute of flash backward: 2*b*s^2*h per layer.
    L, b, s, h = 2, 8, 64, 64
    assert gpt_base["flops"]["counted_per_step"] == gpt_base["flops"]["model_per_step"] + L * 2 * b * s * s * h


def test_cpu_record_names_its_peak_source_and_meters_every_phase(gpt_base):
    """The CPU peak is what the test's own tracked step of the same config sees (not a copy of the record's other
    field), and it holds at least the exact bytes alive between forward and backward of a real step counted
    without any tracker."""
    from membench.execute import Trainer, build_all

    m = gpt_base["memory"]
    assert m["device_name"] == "cpu" and set(m["by_device"]) == {"cpu"} and "MemTracker" in m["peak_source"]
    cfg = compose("workload=gpt_tiny", *STEPS)
    tr = Trainer(*build_all(cfg))
    tr.step(0)  # the warm-up step allocates the optimizer state; the record's memory step follows it
    split, _ = measure.measure_memory(lambda after_forward: tr.step(1, after_forward), tr.model, tr.optimizer)
    assert m["peak_bytes"] == split.total("cpu")
    real = exact_step_bytes(cfg)
    assert m["peak_bytes"] >= real["params"] + real["optimizer"] + real["activations"]
    assert (m["by_category"]["params"], m["by_category"]["optimizer"]) == (real["params"], real["optimizer"])
    assert list(m["phases"]) == ["setup", "warmup", "memory_step", "flop_step", "timed", "rest", "eval"]
    assert all(
        p["wall_s"] > 0 and p["rss_peak_bytes"] > 0 for p in m["phases"].values() if p is not m["phases"]["rest"]
    )
    assert gpt_base["timing"]["wall_by_phase_s"]["timed"] == m["phases"]["timed"]["wall_s"]


def _toy():
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    return model, torch.optim.AdamW(model.parameters())


def test_host_and_device_bytes_are_kept_apart():
    """The meta device stands in for an accelerator: its bytes must never join the host's peak, and each device's
    activations are exactly the tensors allocated there on purpose."""
    model, opt = _toy()
    x = torch.randn(64, 256)

    def step(after_forward):
        y = model(x)  # 64 x 256 fp32 output on the host: 64 KiB
        dev = torch.empty(1024, 1024, device="meta") * 2  # two 4 MiB "device" tensors, one live after the op
        after_forward()
        y.sum().backward()
        opt.step()
        opt.zero_grad()
        return dev

    split, _ = measure.measure_memory(step, model, opt)
    assert split.after_forward["meta"]["ACT"] == 4 * 2**20  # the temporary empty() freed, its product held
    assert split.after_forward["cpu"]["ACT"] == 64 * 256 * 4
    assert split.total("cpu") < 4 * 2**20  # the host peak never sees the device's bytes
    assert split.total("meta") == split.peak["meta"]["ACT"] >= 4 * 2**20


class _KeepsInput(torch.autograd.Function):
    """x @ w.t() keeping x as a ctx attribute, not a saved tensor (backward does not free it): bitsandbytes' int8
    matmuls do this (MatMul8bitLt ctx.tensors, MatMul8bitFp ctx.A)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.x, ctx.w = x, w
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.w, None


class _FrozenKeepsInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(256, 256))

    def forward(self, x):
        return _KeepsInput.apply(x, self.w)


def test_the_tracked_step_leaves_no_tensor_alive():
    """torch's ModTracker (inside MemTracker) hooks each module's inputs and never removes the hooks; each hook
    holds the grad_fn it hangs on (a cycle through C++ when that is a built-in node), so the step's graph upstream of
    it outlived the step and with it the 64 x 256 fp32 input the frozen layer keeps in its ctx (64 KiB here; gpt2's
    int8 base: 2016 MiB). After the tracked step exactly the tensors alive after a plain step may be alive."""
    torch.manual_seed(0)
    lin = torch.nn.Linear  # the last Linear's input hangs on LayerNorm's (C++) grad_fn, upstream of the frozen layer
    model = torch.nn.Sequential(lin(256, 256), _FrozenKeepsInput(), torch.nn.LayerNorm(256), lin(256, 256))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(64, 256)

    def step(after_forward=lambda: None):
        loss = model(x).square().mean()
        after_forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer state exists before the count
    plain = live_tensor_bytes()
    measure.measure_memory(step, model, opt)
    assert live_tensor_bytes() - plain == 0


def test_optimizer_temporaries_are_their_own_category():
    """Tiny activations, large parameters: the peak lies inside AdamW's step, whose foreach temporaries are not
    optimizer state. The state category must equal the exact state bytes read from optimizer.state."""
    model, opt = _toy()
    x = torch.randn(1, 256)
    model(x).sum().backward()
    opt.step()  # states exist before the measured step
    opt.zero_grad()

    def step(after_forward):
        loss = model(x).sum()
        after_forward()
        loss.backward()
        opt.step()
        opt.zero_grad()

    split, _ = measure.measure_memory(step, model, opt)
    state = sum(v.untyped_storage().nbytes() for s in opt.state.values() for v in s.values())
    cats = measure.categorise(split.peak["cpu"], state)
    assert cats["optimizer"] == state
    assert cats["optimizer_temp"] > 0
    assert cats["grads"] == 4 * (256 * 256 + 256)  # the peak is in the step: every grad is alive


def test_extra_state_is_counted_once_under_its_own_category():
    """A persistent buffer the step writes into (as DDP writes its gradient buckets): declaring it as a technique's
    grads must move its bytes out of activations, not add them a second time."""
    model, opt = _toy()
    bucket = torch.zeros(256 * 256)
    x = torch.randn(8, 256)

    def step(after_forward):
        loss = model(x).sum()
        after_forward()
        loss.backward()
        bucket.copy_(model.weight.grad.flatten())  # the op's output is the bucket: the tracker sees it as ACT
        opt.step()
        opt.zero_grad()

    plain, _ = measure.measure_memory(step, model, opt)
    declared, _ = measure.measure_memory(step, model, opt, extra=lambda: {"grads": [bucket]})
    assert declared.total("cpu") == plain.total("cpu")
    assert declared.peak["cpu"]["grads"] == bucket.untyped_storage().nbytes() == 4 * 256 * 256
    assert declared.extra == {"cpu": {"grads": 4 * 256 * 256}}


def test_ddp_buckets_count_once_as_grads(gpt_base):
    """torch DDP (ZeRO stage 0, one rank) keeps one fp32 gradient bucket per parameter byte: the peak grows by
    exactly 4 bytes/parameter over the baseline, as grads, and activations do not change."""
    base = gpt_base  # the same baseline run (workload=gpt_tiny, STEPS)
    ddp = run_inprocess(
        "workload=gpt_tiny", *STEPS, "technique=[zero]", "technique.zero.stage=0", "technique.zero.backend=torch"
    )
    n = base["workload"]["num_params"]
    assert ddp["memory"]["peak_bytes"] - base["memory"]["peak_bytes"] == 4 * n
    assert ddp["memory"]["by_category"]["grads"] == 4 * n
    assert ddp["memory"]["by_category"]["activations"] == base["memory"]["by_category"]["activations"]


def test_throughput_is_samples_over_total_measured_time():
    t = timing_stats([0.1, 0.2, 0.3, 0.6], samples_per_step=8, tokens_per_sample=64)
    assert t["samples_per_s"] == pytest.approx(32 / 1.2)
    assert t["tokens_per_s"] == pytest.approx(32 * 64 / 1.2)
    assert t["median_step_s"] == pytest.approx(0.25)
    assert t["iqr_step_s"] == pytest.approx(0.375 - 0.175)
    assert t["samples_per_s"] != pytest.approx(8 / 0.25)  # not samples / median


def test_timed_steps_are_separate_from_instrumented_ones(gpt_base):
    assert len(gpt_base["timing"]["step_times_s"]) == 1
    assert len(gpt_base["quality"]["loss_curve"]) == 4


def test_cuda_history_names_the_sites_live_at_the_peak():
    """The allocator-history summary on a synthetic trace: the peak moment and what was live then."""
    fr = lambda f, line, name: {"filename": f, "line": line, "name": name}  # noqa: E731
    trace = [
        {
            "action": "alloc",
            "addr": 1,
            "size": 100,
            "frames": [fr("/x/torch/nn/functional.py", 1, "linear"), fr("/r/workloads/gpt.py", 85, "forward")],
        },
        {"action": "alloc", "addr": 2, "size": 50, "frames": [fr("/x/torch/optim/adamw.py", 9, "_multi_tensor_adamw")]},
        {"action": "free_completed", "addr": 2, "size": 50},
        {"action": "alloc", "addr": 3, "size": 30, "frames": []},
        {"action": "free_completed", "addr": 1, "size": 100},
    ]
    out = measure.cuda_history_at_peak({"device_traces": [trace]}, allocated_at_start=1000)
    assert out["peak_allocated_bytes"] == 1150
    assert out["live_at_peak_by_site"] == [
        {"site": "gpt.py:85 forward <- linear", "bytes": 100},
        {"site": "adamw.py:9 _multi_tensor_adamw", "bytes": 50},
    ]


# The allocator's history (run.cuda_memory_history) is a diagnostic: a step that fails while it is recorded runs
# again without it. There is no CUDA here: the recorder is stubbed and the history path forced on for the CPU run.
HISTORY_CELL = ("workload=gpt_tiny", *STEPS)


def _with_history(monkeypatch, start=lambda: None, snapshot=lambda: {"device_traces": []}):
    """Force the history path on CPU; `start()` runs when recording is switched on, `stop` undoes what it did."""
    from membench import execute

    undo: list = []

    def record(enabled="all", **kwargs):
        if enabled is None:
            while undo:
                undo.pop().remove()
        else:
            undo.extend(start() or [])

    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", record)
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", snapshot)
    plain = execute._memory_step
    monkeypatch.setattr(execute, "_memory_step", lambda meter, tr, i, history: plain(meter, tr, i, True))


def _fail_in_backward():
    """As on the H200 (nf4 + checkpointing + bf16, torch 2.11): backward raises while recording. The hook sits on
    the first module output, whose gradient comes last: every later layer's grads are already accumulated."""
    from torch.nn.modules.module import register_module_forward_hook

    def fail(grad):
        raise SystemError("<built-in method run_backward> returned a result with an exception set")

    def first_output(mod, args, out):
        if torch.is_tensor(out) and out.requires_grad and not handles[1:]:
            handles.append(out.register_hook(fail))

    handles = [register_module_forward_hook(first_output)]
    return handles


def test_a_step_failing_while_history_records_runs_again_without_it(gpt_base, monkeypatch):
    """The failed attempt stopped before the optimizer's step: after dropping its partial grads the re-run is the
    same step, so the run's losses and evaluation are bit-identical to a run without history."""
    _with_history(monkeypatch, start=_fail_in_backward)
    rec = run_inprocess(*HISTORY_CELL)
    assert rec["memory"]["phases"]["memory_step"]["cuda_history_at_peak"] == {
        "error": "SystemError: <built-in method run_backward> returned a result with an exception set",
        "step_rerun_without_history": True,
    }
    assert rec["quality"]["loss_curve"] == gpt_base["quality"]["loss_curve"]
    assert rec["quality"]["value"] == gpt_base["quality"]["value"]
    assert rec["memory"]["model_states"] == gpt_base["memory"]["model_states"]


def test_a_failing_history_summary_keeps_the_step(gpt_base, monkeypatch):
    def snapshot():
        raise RuntimeError("snapshot failed")

    _with_history(monkeypatch, snapshot=snapshot)
    rec = run_inprocess(*HISTORY_CELL)
    assert rec["memory"]["phases"]["memory_step"]["cuda_history_at_peak"] == {
        "error": "RuntimeError: snapshot failed",
        "step_rerun_without_history": False,
    }
    assert rec["quality"]["loss_curve"] == gpt_base["quality"]["loss_curve"]


def test_a_failure_after_the_optimizer_stepped_is_not_rerun(monkeypatch):
    """Running the step again would apply its batch twice: the error stands."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def fail(*_):
        raise RuntimeError("failed in the optimizer's step")

    _with_history(monkeypatch, start=lambda: [register_optimizer_step_post_hook(fail)])
    with pytest.raises(RuntimeError, match="failed in the optimizer's step"):
        run_inprocess(*HISTORY_CELL)
