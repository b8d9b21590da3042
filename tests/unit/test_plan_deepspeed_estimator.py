"""membench's per-rank model-state prediction beside DeepSpeed's own estimators (issue 17 item 4; docs/plan.md,
"DeepSpeed's estimators beside the planner").

DeepSpeed ships `estimate_zero2_model_states_mem_needs_all_cold` (runtime/zero/stage_1_and_2.py) and
`estimate_zero3_model_states_mem_needs_all_cold` (runtime/zero/stage3.py); they print a table built from
`estimate_zero{2,3}_model_states_mem_needs`, whose returned (cpu, gpu) bytes are compared here with the planner's
model states (`fake_workload` + `analytic`, backend=deepspeed, bf16) for the same model, stage, offload and world
size. Every difference is a named term, asserted exactly, so the test fails if either side changes:

- `fp32_grad` = 4 Psi/N: DeepSpeed's stage-2 GPU figure is 2 Psi + 18 Psi/N, 18 = 2 (16-bit grads) + 4 (fp32 grad
  partition) + 4 (fp32 master) + 8 (Adam); membench's DeepSpeed mixed precision is 2 + 2 + 12, without the fp32 grad
  partition (on the device, made at the optimizer step; on the host under offload, a pinned buffer). At stage 3 the
  same 18 also holds the 16-bit parameter shard (2 + 4 + 4 + 8, as its offload rows split it): no 16-bit grad
  partition, which membench counts.
- membench's buffers (whole on every rank) and, at stage 3, the parameters at or under DeepSpeed's
  stage3_param_persistence_threshold kept whole on every rank: not in DeepSpeed's estimate.
- stage 3: DeepSpeed's `4 x largest layer` (the largest module's own parameters gathered, 16-bit params + grads);
  membench's model states have no gathered-parameter term for DeepSpeed.
- offload: DeepSpeed puts nothing but the 16-bit parameters (stage 2) or the largest layer (stage 3) on the GPU;
  membench keeps the rank's 16-bit gradient partition on the device.
- CPU: DeepSpeed's figure is per node (8 GPUs per node here) times its `additional_buffer_factor` of 1.5; without
  offload it is the fp32 model built in each process (4 bytes x Psi x GPUs per node), which membench's host column
  (training-time states only) does not hold.
- membench's named `deepspeed_reduce_bucket` (reduce_bucket_size x 2 bytes, outside the states): not in DeepSpeed's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import warnings

import pytest

pytest.importorskip("deepspeed")

from deepspeed.runtime.zero.config import DeepSpeedZeroConfig  # noqa: E402
from deepspeed.runtime.zero.stage3 import (  # noqa: E402
    estimate_zero3_model_states_mem_needs,
    estimate_zero3_model_states_mem_needs_all_cold,
    estimate_zero3_model_states_mem_needs_all_live,
    model_to_params,
)
from deepspeed.runtime.zero.stage_1_and_2 import (  # noqa: E402
    estimate_zero2_model_states_mem_needs,
    estimate_zero2_model_states_mem_needs_all_cold,
    estimate_zero2_model_states_mem_needs_all_live,
)

from membench.plan.predictors import analytic, fake_workload  # noqa: E402
from tests.helpers import compose, config_parts  # noqa: E402

GPUS_PER_NODE = 8
FACTOR = 1.5  # DeepSpeed's default additional_buffer_factor
GiB = 2**30
# (stage, offload_optimizer, offload_params)
CONFIGS = [(2, "none", "none"), (2, "cpu", "none"), (3, "none", "none"), (3, "cpu", "none"), (3, "cpu", "cpu")]


@pytest.fixture(scope="module", params=["gpt2", "llama_1b", "llama_8b"])
def model(request):
    wcfg, techs = config_parts(compose(f"workload={request.param}", "technique=[zero,bf16]",
                                       "technique.zero.backend=deepspeed"))  # fmt: skip
    wl = fake_workload(wcfg, 0)
    params = list(wl.model.parameters())
    zc = DeepSpeedZeroConfig()
    with warnings.catch_warnings():  # torch warns (once) that a FakeTensor's data_ptr is meaningless
        warnings.simplefilter("ignore", UserWarning)
        ds_total, largest = model_to_params(wl.model)  # DeepSpeed's own count, on the planner's fake model
    return {
        "name": request.param,
        "wl": wl,
        "techs": techs,
        "psi": sum(p.numel() for p in params),
        "ds_total_on_fake": ds_total,
        "largest": largest,
        "buffers": sum(b.numel() * b.element_size() for b in wl.model.buffers()),
        "persistent": sum(p.numel() for p in params if p.numel() <= zc.param_persistence_threshold),
        "bucket": zc.reduce_bucket_size * 2,  # bf16 gradients
    }


def _membench(m: dict, stage: int, opt: str, par: str, n: int) -> dict:
    techs = [
        dataclasses.replace(t, stage=stage, offload_optimizer=opt, offload_params=par) if t.kind == "zero" else t
        for t in m["techs"]
    ]  # offload composes on CUDA only (check): set on the Zero config itself
    return analytic(m["wl"], techs, 1, n)["states"]


def _printed(fn, *args, **kw) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args, **kw)
    return out.getvalue()


def test_deepspeed_counts_parameters_by_data_pointer(model):
    """DeepSpeed's model_to_params dedups shared parameters by data_ptr(): on the planner's fake (or meta) model
    every pointer is the same, so `_all_live` would count one tensor; the comparison passes Psi to `_all_cold`."""
    assert model["ds_total_on_fake"] < model["psi"]


@pytest.mark.parametrize("n", [8, 64])
@pytest.mark.parametrize("stage,opt,par", CONFIGS)
def test_deepspeed_estimate_minus_named_terms_is_membench(model, stage, opt, par, n):
    psi, big, buf, pers = model["psi"], model["largest"], model["buffers"], model["persistent"]
    nodes = n // GPUS_PER_NODE
    st = _membench(model, stage, opt, par, n)
    dev, host = st["device"], st["host"]
    dev_total, host_total = sum(dev.values()), sum(host.values())
    fp32_grad = 4 * psi / n  # DeepSpeed's fp32 gradient partition (its 18 = 2 + 2 + 4 + 4 + 8)
    other = dict(st["other"])  # membench's named DeepSpeed buffers, outside the model states
    assert other.pop("deepspeed_reduce_bucket") == model["bucket"]  # membench's, not DeepSpeed's
    if stage == 2 and opt == "none":
        # the optimizer step's fp32 gradient partition: DeepSpeed's estimator's term, which membench now names too,
        # and the inner AdamW's temporaries over it (this config composes for the CPU: torch's single-tensor AdamW)
        assert other.pop("deepspeed_fp32_grad_partition") == fp32_grad
        assert other.pop("deepspeed_optimizer_temps") == 2 * fp32_grad
    if stage == 3:
        # gathered from forward into backward, in bf16: every partitioned (above-threshold) parameter up to
        # stage3_max_live_parameters (1e9), where DeepSpeed's estimator takes the largest layer (4L below)
        assert other.pop("deepspeed_gathered_params") == 2 * min(psi - pers, 10**9)
    assert other == {}

    if stage == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(psi, GPUS_PER_NODE, nodes, cpu_offload=opt == "cpu")
        printed = _printed(estimate_zero2_model_states_mem_needs_all_cold, psi, GPUS_PER_NODE, nodes)
        if opt == "none":
            assert gpu == dev_total - buf + fp32_grad
            assert host_total == 0 and cpu == FACTOR * 4 * psi * GPUS_PER_NODE  # the fp32 model per process
        else:
            assert dev["optimizer"] == 0 and gpu == dev_total - buf - dev["grads"]
            # max(4 x GPUs, 16): the load-time fp32 model over *all* GPUs wins at N >= 4; the 16 is every rank's
            # host states on one CPU: membench's 12 bytes/param plus the fp32 grad partition
            assert cpu == FACTOR * psi * max(4 * n, 16)
            assert 16 * psi == n * (host_total + fp32_grad)
    else:
        kw = {"cpu_offload": opt == "cpu", "cpu_offload_params": par == "cpu"}
        cpu, gpu, layer = estimate_zero3_model_states_mem_needs(psi, big, GPUS_PER_NODE, nodes, **kw, zero_init=True)
        cpu_cold, gpu_cold, _ = estimate_zero3_model_states_mem_needs(psi, big, GPUS_PER_NODE, nodes, **kw,
                                                                      zero_init=False)  # fmt: skip
        printed = _printed(estimate_zero3_model_states_mem_needs_all_cold, psi, big, GPUS_PER_NODE, nodes)
        assert layer == 4 * big and gpu_cold == gpu  # zero_init moves only the CPU figure
        if opt == "none":
            # stage 3's 18 = 2 (16-bit param shard) + 4 (fp32 grad) + 4 + 8: no 16-bit grad partition
            assert gpu == dev_total - buf - 2 * pers - dev["grads"] + fp32_grad + layer
            assert host_total == 0 and cpu == FACTOR * layer * GPUS_PER_NODE
            assert cpu_cold == FACTOR * 4 * psi * GPUS_PER_NODE
        elif par == "none":
            assert dev["optimizer"] == 0 and gpu == dev_total - buf - 2 * pers - dev["grads"] + layer
            assert cpu == FACTOR * GPUS_PER_NODE * (host_total + fp32_grad)  # 16 Psi / nodes
        else:
            assert dev == {"params": buf, "grads": dev["grads"], "optimizer": 0} and gpu == layer
            assert cpu == FACTOR * GPUS_PER_NODE * (host_total - 2 * pers + fp32_grad)  # 18 Psi / nodes
    # the printed table of the `_all_cold` function carries the same figures
    assert f" {cpu / GiB:7.2f}GB | {gpu / GiB:6.2f}GB | " in printed


@pytest.mark.parametrize("workload", ["gpt_tiny", "llama_tiny"])
def test_all_live_on_a_real_model_equals_all_cold_with_the_planners_counts(workload):
    """On real tensors `_all_live` counts what the comparison passes to `_all_cold`: the planner's Psi and
    DeepSpeed's largest layer."""
    wcfg, _ = config_parts(compose(f"workload={workload}"))
    model = wcfg.build(0).model
    psi = sum(p.numel() for p in model.parameters())
    big = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert _printed(estimate_zero2_model_states_mem_needs_all_live, model, 8, 1) == _printed(
        estimate_zero2_model_states_mem_needs_all_cold, psi, 8, 1
    )
    assert _printed(estimate_zero3_model_states_mem_needs_all_live, model, 8, 1) == _printed(
        estimate_zero3_model_states_mem_needs_all_cold, psi, big, 8, 1
    )
