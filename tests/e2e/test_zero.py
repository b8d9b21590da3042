"""ZeRO on CPU over gloo with 2 ranks: per-rank state bytes against the ZeRO paper's formula, losses against
stage 0, communication volume against 2 Psi / 3 Psi, a DeepSpeed run per stage, composition, failure handling.

The 2-rank runs share one torch.multiprocessing spawn (one process group, several runs) to keep the file fast;
stage 0 of each backend runs once, for 24 steps, and its first 5 steps stand in for the 5-step cells' baseline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from membench.distributed import run_ranks
from membench.errors import ConfigError
from tests.helpers import compose, run_inprocess

TINY = ("workload=gpt_tiny", "run.warmup_steps=1", "run.measure_steps=1", "run.train_steps=5", "run.num_threads=1")
SHORT_STEPS = 5
LONG_STEPS = 24  # DeepSpeed's default clipping at 1.0 changes the trajectory from step 2; 5 steps hid it
# Stage 0 runs only the long schedule: its memory and FLOP steps are steps 1 and 2 as in a 5-step run, and the LR
# schedule does not depend on run.train_steps, so its first 5 losses are the 5-step run's (one run fewer per backend).
LONG = [("torch", 0), ("deepspeed", 0)]
CELLS = [("torch", s) for s in range(1, 4)] + [("deepspeed", s) for s in range(1, 4)]
# FSDP2 under its MixedPrecisionPolicy (16-bit gathers, fp32 reduce)
HALF_CELLS = [("torch", 2, "bf16"), ("torch", 3, "bf16"), ("torch", 3, "fp16")]


def _overrides(backend: str, stage: int, n: int = 2, *extra: str, techniques: str = "zero") -> list[str]:
    zero = [f"technique=[{techniques}]", f"technique.zero.backend={backend}", f"technique.zero.stage={stage}"]
    return [*TINY, *zero, f"run.world_size={n}", *extra]


def _rank(rank: int, port: int, out_dir: str) -> None:
    import faulthandler

    import torch.distributed as dist

    # A rank that dies by a signal leaves only "terminated with signal ..." in the parent: keep its stderr (C++
    # "terminate called after ..." lines included) and, on SIGABRT/SIGSEGV, every thread's Python stack in a file
    # the fixture shows when the spawn fails.
    log = open(Path(out_dir, f"rank{rank}.stderr"), "w")  # noqa: SIM115 (open for the life of the process)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log, all_threads=True)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # `import deepspeed` imports mlflow when installed (for its autotuner, unused here): ~4.5 s of CPU per rank
    sys.modules["mlflow"] = None
    # a file rendezvous: a port picked by _free_port and bound later by rank 0's TCPStore can be taken in between
    # by another session on this machine (measured: both groups then fail), a file in this session's tmp dir cannot
    dist.init_process_group("gloo", init_method=f"file://{Path(out_dir, 'rendezvous')}", rank=rank, world_size=2)
    from membench.execute import execute

    for backend, stage in CELLS:
        out = execute(compose(*_overrides(backend, stage)))
        if rank == 0:
            Path(out_dir, f"{backend}{stage}.json").write_text(json.dumps(out, default=str))
    for backend, stage, half in HALF_CELLS:
        out = execute(compose(*_overrides(backend, stage, techniques=f"zero,{half}")))
        if rank == 0:
            Path(out_dir, f"{backend}{stage}-{half}.json").write_text(json.dumps(out, default=str))
    for backend, stage in LONG:
        out = execute(compose(*_overrides(backend, stage, 2, f"run.train_steps={LONG_STEPS}")))
        if rank == 0:
            Path(out_dir, f"{backend}{stage}-long.json").write_text(json.dumps(out, default=str))
    dist.barrier()  # neither rank tears its gloo pairs down while the other still talks on them
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[tuple[str, int], dict]:
    from membench.distributed import _free_port

    out = tmp_path_factory.mktemp("zero2")
    try:
        torch.multiprocessing.spawn(_rank, args=(_free_port(), str(out)), nprocs=2)
    except torch.multiprocessing.ProcessExitedException as e:
        tails = {p.name: p.read_text()[-6000:] for p in sorted(out.glob("rank*.stderr"))}
        pytest.fail(f"{e}\n" + "\n".join(f"--- {name} (tail) ---\n{text}" for name, text in tails.items()))
    runs = {(b, s): json.loads((out / f"{b}{s}.json").read_text()) for b, s in CELLS}
    runs.update({(b, s, "long"): json.loads((out / f"{b}{s}-long.json").read_text()) for b, s in LONG})
    runs.update({(b, s): runs[(b, s, "long")] for b, s in LONG})
    runs.update({(b, s, h): json.loads((out / f"{b}{s}-{h}.json").read_text()) for b, s, h in HALF_CELLS})
    return runs


def _curve(rec: dict) -> list[float]:
    """The first 5 losses: all of a 5-step cell's, the 5-step baseline's part of a stage-0 run."""
    curve = rec["quality"]["loss_curve"]
    assert len(curve) in (SHORT_STEPS, LONG_STEPS)
    return curve[:SHORT_STEPS]


def _psi(rec: dict) -> int:
    return rec["technique_info"]["zero.psi"]


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_ddp_and_fsdp_hold_exactly_the_formula_bytes_per_rank(two_ranks, stage):
    rec = two_ranks[("torch", stage)]
    psi, n = _psi(rec), 2
    n_tensors = 2 + 2 * 16 + 2 + 1  # tok, pos | 16 per block (LN, q/k/v/proj, fc, fc_out: weight+bias) | ln_f | head
    for r in rec["memory"]["per_rank"]:
        st = r["model_states"]
        # at rest FSDP2 holds its parameter shard at stage 2 as well (unlike ZeRO-2; see docs/zero.md)
        assert st["params"] == 4 * psi // (n if stage >= 2 else 1)
        assert st["grads"] == 4 * psi // (n if stage >= 2 else 1)
        # AdamW: exp_avg + exp_avg_sq (8 bytes/param over the rank's shard) + one fp32 `step` scalar per tensor
        assert st["optimizer"] == 8 * psi // (n if stage >= 1 else 1) + 4 * n_tensors
    pred = rec["memory"]["predicted_by_category"]
    assert pred["grads"] == 4 * psi / (n if stage >= 2 else 1)


def test_fsdp_stage2_keeps_unsharded_params_during_compute_and_stage3_does_not(two_ranks):
    psi = _psi(two_ranks[("torch", 2)])
    assert two_ranks[("torch", 2)]["memory"]["by_category"]["params_unsharded"] == 4 * psi
    assert two_ranks[("torch", 3)]["memory"]["by_category"]["params_unsharded"] < 4 * psi / 2


@pytest.mark.parametrize(("stage", "half"), [(2, "bf16"), (3, "bf16"), (3, "fp16")])
def test_fsdp_with_16_bit_precision_runs_its_mixed_precision_policy_and_gathers_16_bit_parameters(
    two_ranks, stage, half
):
    """torch backend + bf16/fp16 at stages 2-3: FSDP2's MixedPrecisionPolicy (16-bit all-gathers and compute, fp32
    gradient reduction) instead of autocast; the record says so, and FSDPMemTracker sees the all-gathered
    parameters at 2 bytes each: half the fp32 run's, and what the states step predicts from the modules.
    fp16 keeps its GradScaler (DTensor all-reduces the scaler's inf check)."""
    rec, fp32 = two_ranks[("torch", stage, half)], two_ranks[("torch", stage)]
    info = rec["technique_info"]
    dtype = {"bf16": "bfloat16", "fp16": "float16"}[half]
    assert info["zero.mixed_precision"] == {"policy": "FSDP2 MixedPrecisionPolicy", "param_dtype": dtype,
                                            "reduce_dtype": "float32", "autocast_dtype": None}  # fmt: skip
    assert fp32["technique_info"]["zero.mixed_precision"]["policy"] == "none"
    most = info["zero.fsdp_unsharded_params_max_bytes"]
    assert 2 * most == fp32["technique_info"]["zero.fsdp_unsharded_params_max_bytes"]
    assert most == rec["memory"]["predicted_detail"]["other_terms"]["fsdp_unsharded_params"]
    if stage == 2:  # every parameter gathered before forward and kept through backward: at the peak too
        assert rec["memory"]["by_category"]["params_unsharded"] == 2 * _psi(rec)
    # sharded parameters, gradients and optimizer state stay fp32 (the policy casts only the gathered copies)
    assert rec["memory"]["model_states"]["params"] == fp32["memory"]["model_states"]["params"]
    assert rec["memory"]["model_states"]["grads"] == fp32["memory"]["model_states"]["grads"]
    # approximate: within the precision technique's declared tolerance of fp32 data parallelism
    rtol = rec["exactness"][half]["loss_rtol"]
    assert _curve(rec) == pytest.approx(_curve(two_ranks[("torch", 0)]), rel=rtol)


def test_zero_redundancy_optimizer_shards_state_within_one_parameter(two_ranks):
    rec = two_ranks[("torch", 1)]
    psi = _psi(rec)
    largest = 256 * 64  # the head / token embedding: the coarsest unit ZeroRedundancyOptimizer can assign
    per_rank = [r["model_states"]["optimizer"] for r in rec["memory"]["per_rank"]]
    assert all(abs(b - 8 * psi / 2) <= 8 * largest + 4 * 40 for b in per_rank)
    assert sum(per_rank) == two_ranks[("torch", 0)]["memory"]["model_states"]["optimizer"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_torch_stages_train_like_stage_0(two_ranks, stage):
    base = _curve(two_ranks[("torch", 0)])
    assert _curve(two_ranks[("torch", stage)]) == pytest.approx(base, rel=1e-5)


def test_communication_stage3_is_one_and_a_half_times_stage0(two_ranks):
    c0 = two_ranks[("torch", 0)]["distributed"]["communication"]
    c3 = two_ranks[("torch", 3)]["distributed"]["communication"]
    psi = _psi(two_ranks[("torch", 0)])
    assert c0["paper_elements"] == pytest.approx(2 * psi, rel=1e-3)
    assert c3["paper_elements"] == 3 * psi
    assert c3["paper_elements"] / c0["paper_elements"] == pytest.approx(1.5, rel=1e-3)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_stage_runs_shards_and_tracks_stage0(two_ranks, stage):
    rec = two_ranks[("deepspeed", stage)]
    psi, n = _psi(rec), 2
    st = rec["memory"]["model_states"]
    if stage >= 1:  # DeepSpeed keeps an fp32 master partition even in fp32 training
        assert st["fp32_master"] == 4 * psi // n
        assert st["optimizer"] - 8 * psi // n in range(0, 4 * 40)
    if stage >= 1:  # DeepSpeed allocates its whole default reduce bucket (5e8 elements), however small the model
        bucket = rec["technique_info"]["zero.deepspeed_zero_in_force"]["reduce_bucket_size"]
        assert rec["memory"]["predicted_detail"]["other_terms"]["deepspeed_reduce_bucket"] == 4 * bucket
        assert rec["memory"]["peak_bytes"] > 4 * bucket
    if stage == 3:  # DeepSpeed's default knobs: gpt_tiny's tensors are all under the 1e5-element persistence
        # threshold, so each rank holds every parameter whole next to its partition
        assert st["params"] == 4 * psi // n + 4 * psi == rec["memory"]["predicted_by_category"]["params"]
        assert rec["technique_info"]["zero.deepspeed_zero_in_force"]["param_persistence_threshold"] == 100_000
    assert _curve(rec) == pytest.approx(_curve(two_ranks[("torch", 0)]), rel=1e-3)


def test_deepspeed_stage0_trains_like_ddp_over_24_steps(two_ranks):
    """Same model, same data, same AdamW: DeepSpeed's plain data parallelism must follow DDP step for step.
    Tolerance: with N=2 the gradient all-reduce adds two addends (commutative, so order-free) and halves the sum
    (exact in binary), so only kernel-level differences (flattened buffers, optimizer loop) could remain; 1e-5
    relative is ~100x float32's epsilon (measured on CPU/gloo: the curves are identical). Without the explicit
    gradient_clipping=0.0, DeepSpeed's default 1.0 makes them part from step 4 and differ by up to 50% by step 24."""
    ddp = two_ranks[("torch", 0, "long")]
    ds = two_ranks[("deepspeed", 0, "long")]
    assert ds["technique_info"]["zero.deepspeed_config"]["gradient_clipping"] == 0.0
    assert len(ddp["quality"]["loss_curve"]) == LONG_STEPS
    assert ds["quality"]["loss_curve"] == pytest.approx(ddp["quality"]["loss_curve"], rel=1e-5, abs=0)


def test_two_deepspeed_engines_one_after_the_other_in_one_process():
    """Each in-process run starts and destroys its own world-of-one process group; DeepSpeed's cached clone of the
    first world group must not reach the second engine (it failed with "Group ... is not registered" on GPU)."""
    curves = []
    for stage in (0, 1):
        out = run_inprocess(
            *TINY, "technique=[zero]", "technique.zero.backend=deepspeed", f"technique.zero.stage={stage}"
        )
        curves.append(out["quality"]["loss_curve"])
    assert curves[1] == pytest.approx(curves[0], rel=1e-5)


def test_deepspeed_stage3_leaves_torch_linear_as_it_found_it():
    """Stage 3 swaps F.linear for DeepSpeed's own autograd Function process-wide ("persists unless manually
    reset"): inside the run that is what stage 3 runs, after it a later in-process run must get torch's again."""
    import torch.nn.functional as F

    linear = F.linear
    run_inprocess(*TINY, "technique=[zero]", "technique.zero.backend=deepspeed", "technique.zero.stage=3")
    assert F.linear is linear


def test_zero_composes_with_checkpointing_and_bf16_in_one_run():
    for backend, stage in (("torch", 3), ("deepspeed", 2)):
        out = run_inprocess(
            *TINY,
            "technique=[zero,activation_checkpointing,bf16]",
            f"technique.zero.backend={backend}",
            f"technique.zero.stage={stage}",
            "run.warmup_steps=1",
            "run.train_steps=4",
        )
        assert out["techniques_applied"] == ["activation_checkpointing", "bf16", "zero"]
        assert out["technique_info"]["activation_checkpointing.checkpointed_blocks"] == 2
        if backend == "deepspeed":  # DeepSpeed's bf16 mode: bf16 params, fp32 master partition
            assert out["technique_info"]["zero.deepspeed_config"]["bf16"]["enabled"]
            assert out["memory"]["model_states"]["params"] == 2 * out["technique_info"]["zero.psi"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["technique=[zero,fp16]", "technique.zero.backend=deepspeed"], "no fp16"),
        (["technique=[zero]", "technique.zero.offload_optimizer=cpu"], "already on CPU"),
        (["technique=[zero]", "technique.zero.stage=1", "technique.zero.offload_params=cpu"], "needs stage=3"),
        (["technique=[zero]", "technique.zero.stage=4"], "technique.zero.stage=4"),
        (["run.world_size=2"], "needs technique zero"),
        (["run.world_size=0"], "run.world_size=0"),
    ],
)
def test_bad_zero_input_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose("workload=gpt_tiny", "run.device=cpu", *overrides)


def test_a_dying_rank_ends_the_group_at_once():
    t0 = time.monotonic()
    code = "import os, sys, time; sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(120)"
    assert run_ranks(2, [sys.executable, "-c", code]) == 3
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_cli_two_rank_run_writes_one_record_with_every_rank(tmp_path):
    cmd = [sys.executable, "-m", "membench.cli", "run", *_overrides("torch", 3), f"run.results_dir={tmp_path}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (rec_path,) = (tmp_path / "runs").glob("*.json")
    rec = json.loads(rec_path.read_text())
    assert rec["status"] == "ok"
    assert [r["rank"] for r in rec["memory"]["per_rank"]] == [0, 1]
    assert rec["memory"]["peak_bytes"] == max(r["peak_bytes"] for r in rec["memory"]["per_rank"])
    assert rec["distributed"]["world_size"] == 2


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_deepspeed_mixed_precision_and_offload_on_gpu(precision):
    out = run_inprocess(
        *TINY,
        f"technique=[zero,{precision}]",
        "technique.zero.stage=3",
        "technique.zero.offload_optimizer=cpu",
        "technique.zero.offload_params=cpu",
        "run.device=cuda",
    )
    assert out["technique_info"]["zero.deepspeed_config"]["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert out["memory"]["predicted_by_category"]["grads"] == 2 * out["technique_info"]["zero.psi"]
