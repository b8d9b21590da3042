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

import pytest

from membench.plan.predictors import analytic, fake_workload, simulated
from membench.simulate import simulate
from tests.helpers import compose, config_parts, two_rank_records

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


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[tuple, dict]:
    runs = two_rank_records(tmp_path_factory.mktemp("zero_sim"), [(_name(c), _overrides(*c)) for c in CELLS])
    return {cell: runs[_name(cell)] for cell in CELLS}


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
