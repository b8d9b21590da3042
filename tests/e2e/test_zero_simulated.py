"""The planner's simulation of zero (FSDP2 on fake tensors over torch's fake process group, in this one process)
against real 2-rank gloo runs of the same cells (torch backend, stages 2-3, fp32 and bf16 under FSDP2's
MixedPrecisionPolicy): each rank's model states byte for byte, and the per-rank peak.

Peak tolerance: none. The fake step runs the ops the real step runs, on tensors of the same shapes and dtypes, and
FSDPMemTracker counts both; FSDP2 allocates its all-gather outputs and reduce-scatter inputs itself, before the
collective, so a fake collective (which moves no data) leaves the same allocations as gloo's. A difference would
be a real effect the simulation misses (a buffer a real backend allocates), not noise: the tracker's counts are
deterministic.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from membench.plan.predictors import analytic, fake_workload, simulated
from membench.simulate import simulate
from tests.helpers import compose, config_parts

# (workload, techniques, stage): FSDP2 alone, under its bf16 policy, with checkpointing inside the sharded blocks,
# on Llama (RMSNorm, RoPE buffers), and with LoRA (frozen sharded base, trainable adapters)
CELLS = [("gpt_tiny", "zero", 2), ("gpt_tiny", "zero", 3), ("gpt_tiny", "zero,bf16", 2), ("gpt_tiny", "zero,bf16", 3),
         ("gpt_tiny", "zero,activation_checkpointing,bf16", 3), ("llama_tiny", "zero,bf16", 3),
         ("gpt_tiny", "zero,lora", 3)]  # fmt: skip
RUN = ("run.warmup_steps=1", "run.measure_steps=1", "run.train_steps=4", "run.num_threads=1")


def _overrides(workload: str, techs: str, stage: int) -> list[str]:
    return [f"workload={workload}", *RUN, f"technique=[{techs}]", "technique.zero.backend=torch",
            f"technique.zero.stage={stage}", "run.world_size=2"]  # fmt: skip


def _name(cell: tuple) -> str:
    return f"{cell[0]}-{cell[1].replace(',', '+')}-stage{cell[2]}"


def _rank(rank: int, out_dir: str) -> None:
    import torch.distributed as dist

    log = open(Path(out_dir, f"rank{rank}.stderr"), "w")  # noqa: SIM115 (open for the life of the process)
    os.dup2(log.fileno(), 2)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    sys.modules["mlflow"] = None  # `import deepspeed` (registry discovery) would import it: seconds per rank
    # a file rendezvous in this test's tmp dir: no port another session could take (tests/e2e/test_zero.py)
    dist.init_process_group("gloo", init_method=f"file://{Path(out_dir, 'rendezvous')}", rank=rank, world_size=2)
    from membench.execute import execute

    for cell in CELLS:
        out = execute(compose(*_overrides(*cell)))
        if rank == 0:
            Path(out_dir, f"{_name(cell)}.json").write_text(json.dumps(out, default=str))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[tuple, dict]:
    out = tmp_path_factory.mktemp("zero_sim")
    try:
        torch.multiprocessing.spawn(_rank, args=(str(out),), nprocs=2)
    except torch.multiprocessing.ProcessExitedException as e:
        tails = {p.name: p.read_text()[-6000:] for p in sorted(out.glob("rank*.stderr"))}
        pytest.fail(f"{e}\n" + "\n".join(f"--- {name} ---\n{text}" for name, text in tails.items()))
    return {cell: json.loads((out / f"{_name(cell)}.json").read_text()) for cell in CELLS}


@pytest.mark.parametrize("cell", CELLS, ids=[_name(c) for c in CELLS])
def test_simulated_rank_matches_a_real_two_rank_run(real, cell):
    rec = real[cell]
    cfg = compose(*_overrides(*cell))
    wcfg, techs = config_parts(cfg)
    sim = simulate(wcfg, techs, cfg["run"]["batch_size"], cfg["run"]["seed"], max_layers=None, world_size=2)
    assert sim["left_out"] == [] and sim["world_size"] == 2
    for r in rec["memory"]["per_rank"]:  # both ranks hold equal shards (every tensor of these presets splits in two)
        assert {k: sim["states"][k] for k in ("params", "grads", "optimizer")} == r["model_states"]
        assert sim["peak_bytes"] == r["peak_bytes"]
    # the split at the peak too: sharded states, FSDP2's gathered parameters (16-bit under the policy), activations
    real_split = {k: v for k, v in rec["memory"]["by_category"].items() if v}
    assert {k: v for k, v in sim["by_category"].items() if v} == real_split
    # the planner's row: a simulation, not a hybrid, with the same peak
    states = analytic(fake_workload(wcfg, cfg["run"]["seed"]), techs, cfg["run"]["batch_size"], 2, "cpu")["states"]
    kind, pred = simulated(sim, techs, states, 2)
    assert kind == "simulation" and pred["peak_bytes"] == rec["memory"]["peak_bytes"]
