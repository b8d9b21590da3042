"""Every config composes; bad input fails with one line naming the key, exit 2, and touches no record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from membench.cells import configs as plan
from membench.cli import main
from membench.config import CONF_DIR
from membench.errors import ConfigError
from tests.helpers import compose, experiment_cells

WORKLOADS = sorted(p.stem for p in (CONF_DIR / "workload").glob("*.yaml"))
TECHNIQUES = sorted(p.stem for p in (CONF_DIR / "technique").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_workload_composes(workload):
    cfg = compose(f"workload={workload}")
    assert cfg["workload"]["preset"] == workload
    assert cfg["run"]["batch_size"] == cfg["workload"]["batch_size"]


# Pairs rejected when the config is composed (run.device=cpu), each with the reason its message must give.
# Every pair not listed must compose. Rejections that need a built model (digits has no nn.Linear in its blocks
# for quantized_base) are apply-time and tested in tests/runs/test_quantization.py.
REJECTED_PAIRS = {
    ("bf16", "bf16_pure"): "bf16_pure already runs everything in bf16",
    ("bf16", "fp16"): "two autocast dtypes in one step",
    ("bf16_pure", "fp16"): "mixes two 16-bit formats",
    ("bf16_pure", "zero"): "DeepSpeed keeps fp32 masters",
    ("fp16", "zero"): "DeepSpeed's CPU accelerator has no fp16",
    ("optimizer_8bit", "zero"): "zero builds its own (sharded) optimizer",
    ("optimizer_8bit", "optimizer_in_backward"): "both replace the optimizer",
    ("optimizer_8bit", "optimizer_lowmem"): "both replace the optimizer",
    ("optimizer_in_backward", "optimizer_lowmem"): "both replace the optimizer",
    ("optimizer_in_backward", "zero"): "own the backward and the step",
    ("optimizer_lowmem", "zero"): "zero builds its own (sharded) optimizer",
    ("fp16", "optimizer_in_backward"): "GradScaler unscales and checks every gradient",
    ("prune_structured", "prune_unstructured"): "each pretrains and reports its own before/after quality",
    ("prune_unstructured", "quantized_base"): "the quantizer replaces the nn.Linear modules that hold the masks",
    ("prune_unstructured", "weight_quant"): "the quantizer replaces the nn.Linear modules that hold the masks",
    ("lora", "weight_quant"): "would also quantize the adapters",
    ("quantized_base", "weight_quant"): "both quantize the same linear layers",
    ("quantized_base", "zero"): "shard floating-point parameters only",
    ("weight_quant", "zero"): "shard floating-point parameters only",
    ("optimizer_8bit", "optimizer_offload"): "both replace the optimizer",
    ("optimizer_in_backward", "optimizer_offload"): "both replace the optimizer",
    ("optimizer_lowmem", "optimizer_offload"): "both replace the optimizer",
    ("optimizer_offload", "zero"): "DeepSpeed/DDP/FSDP own the step",
    ("float8", "quantized_base"): "the quantizer replaces the nn.Linear modules float8 converts",
    ("float8", "weight_quant"): "the quantizer replaces the nn.Linear modules float8 converts",
}
# CUDA-only techniques: composed with run.device=cpu, their check rejects them in one line (after the pair rules)
CUDA_ONLY = {"float8", "optimizer_offload"}
PAIRS = [(a, b) for i, a in enumerate(TECHNIQUES) for b in TECHNIQUES[i + 1 :]]


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_workload_technique_pair_composes(workload, technique):
    if technique in CUDA_ONLY:
        with pytest.raises(ConfigError, match=rf"^technique.{technique}: needs run.device=cuda"):
            compose(f"workload={workload}", f"technique=[{technique}]", "run.device=cpu")
        return
    cfg = compose(f"workload={workload}", f"technique=[{technique}]", "run.device=cpu")
    assert list(cfg["technique"]) == [technique]


@pytest.mark.parametrize("pair", PAIRS, ids="+".join)
def test_each_technique_pair_composes_or_is_rejected_as_the_table_says(pair):
    overrides = ("workload=gpt_tiny", f"technique=[{pair[0]},{pair[1]}]", "run.device=cpu")
    if pair in REJECTED_PAIRS:
        with pytest.raises(ConfigError) as e:
            compose(*overrides)
        msg = str(e.value)
        assert "\n" not in msg and "technique=[" in msg and REJECTED_PAIRS[pair] in msg, msg
    elif CUDA_ONLY & set(pair):
        with pytest.raises(ConfigError, match=r"needs run.device=cuda"):
            compose(*overrides)
    else:
        assert set(compose(*overrides)["technique"]) == set(pair)


def test_the_rejection_table_names_real_techniques():
    assert set(REJECTED_PAIRS) <= set(PAIRS)


def _needs_cuda(experiment: str) -> bool:
    return "requires_cuda: true" in (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    if _needs_cuda(experiment) and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="run.device=cuda: no CUDA device is visible"):
            experiment_cells(experiment)
        return
    cells = experiment_cells(experiment)
    assert cells and all(c["experiment"]["name"] == experiment for c in cells)
    assert all(c["run"]["results_dir"] for c in cells)


def test_technique_order_follows_the_fixed_order_not_the_users():
    from membench.execute import build_all
    from membench.techniques.compose import ordered

    cfg = compose("technique=[bf16,activation_checkpointing]")
    _, _, techs, _ = build_all(cfg)
    assert [t.kind for t in ordered(techs)] == ["activation_checkpointing", "bf16"]


def test_multirun_expands_and_single_run_refuses_sweeps():
    assert len(plan(["run.seed=0,1", "technique=choice([],[bf16])"], multirun=True)) == 4
    with pytest.raises(ConfigError, match="run.seed=0,1: a sweep needs -m"):
        plan(["run.seed=0,1"], multirun=False)


BAD = [
    (["workload=nope"], "workload=nope: unknown; allowed: "),
    (["technique=[nope]"], "technique=nope: unknown; allowed: "),
    (["run.batch_size=abc"], "run.batch_size"),
    (["run.batch_size=0"], "run.batch_size=0: must be > 0"),
    (["run.measure_steps=-1"], "run.measure_steps=-1: must be > 0"),
    (["run.warmup_steps=0"], "run.warmup_steps=0: must be >= 1"),
    (["workload.n_layer=0"], "workload.n_layer=0: must be > 0"),
    (["workload.n_layer=two"], "workload.n_layer"),
    (["technique=[bf16,fp16]"], "technique=[bf16,fp16]: incompatible"),
    (["technique=[activation_checkpointing]", "technique.activation_checkpointing.mode=some"], "mode='some'"),
    (["run.device=tpu"], "run.device='tpu': allowed values are auto, cpu, cuda"),
    (["+run.nope=1"], "run.nope: unknown key"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_is_one_line_naming_the_key(overrides, message, capsys, tmp_path):
    assert main(["run", *overrides, f"run.results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("membench: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_bad_input_from_the_real_cli_exits_nonzero_and_keeps_earlier_records(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    earlier = runs / "earlier.json"
    earlier.write_text(json.dumps({"status": "ok"}))
    before = earlier.read_bytes()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "membench.cli",
            "run",
            "workload=gpt_tiny",
            "run.batch_size=-3",
            f"run.results_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "membench: error: run.batch_size=-3: must be > 0"
    assert sorted(p.name for p in runs.iterdir()) == ["earlier.json"]
    assert earlier.read_bytes() == before


@pytest.mark.parametrize("study", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_a_fresh_run_of_a_committed_study_has_its_records_cell_identities(study):
    """`membench compare results/STUDY fresh/` matches cells by config hash: a knob added to a workload or a
    technique after a study was recorded must not change the hash of its cells at the default (`identity_added`),
    or every cell of the fresh run is 'missing'/'new'."""
    from membench.readme import ROOT
    from membench.records import config_hash, latest_by_cell, load_records

    root = ROOT / "results" / study
    recs = (
        [r for r in latest_by_cell(load_records(root)).values() if r.get("experiment") == study]
        if root.is_dir()
        else []
    )
    if not recs:
        pytest.skip(f"no committed records of {study}")
    fresh = {config_hash(c) for c in plan([f"+experiment={study}"], False)}
    assert {r["config_hash"] for r in recs} <= fresh  # the stored hash: what compare and a re-run's skip read


def test_every_committed_record_carries_the_hash_of_its_config():
    """A change of the identity rule (a knob added, `identity_added`) that moves committed records' cells is caught
    here: their stored hash, which compare and the sweep's skip read, must be what their config hashes to now."""
    import glob

    from membench.readme import ROOT
    from membench.records import config_hash

    stale = []
    for f in glob.glob(str(ROOT / "results" / "*" / "runs" / "*.json")):
        r = json.loads(Path(f).read_text())
        if r["config_hash"] != config_hash(r["config"]):
            stale.append(f)
    assert stale == []


def test_a_study_with_seeds_runs_each_cell_once_per_seed():
    cells = plan(["+experiment=llama"], multirun=False)
    by_seed: dict[int, list] = {}
    for c in cells:
        by_seed.setdefault(c["run"]["seed"], []).append(c)
    assert sorted(by_seed) == list(range(10))

    def strip(c):  # everything but the seed
        return json.dumps({**c, "run": {k: v for k, v in c["run"].items() if k != "seed"}}, sort_keys=True)

    assert len({strip(c) for c in by_seed[0]}) == 9
    assert all(sorted(map(strip, group)) == sorted(map(strip, by_seed[0])) for group in by_seed.values())
    # the user's run.seed wins over the study's list: one seed, the study's nine cells
    assert [c["run"]["seed"] for c in plan(["+experiment=llama", "run.seed=7"], multirun=False)] == [7] * 9


def test_seeds_leave_a_cell_that_sets_its_own_seed_alone():
    from membench.cells import _seeded

    cells = [["technique=[bf16]"], ["technique=[bf16_pure]", "run.seed=4"]]
    assert _seeded(cells, [0, 1], []) == [
        ["technique=[bf16]", "run.seed=0"],
        ["technique=[bf16]", "run.seed=1"],
        ["technique=[bf16_pure]", "run.seed=4"],
    ]
    assert _seeded(cells, None, []) == cells


@pytest.mark.parametrize(
    "seeds, message",
    [([], "must be a non-empty list"), ([0, -1], "must be a non-empty list"), ("0,1", "must be a non-empty list"),
     ([0, 0], "a seed is listed twice"), ([0.5], "must be a non-empty list")],
)
def test_bad_study_seeds_are_refused_in_one_line(seeds, message):
    from membench.cells import _seeded

    with pytest.raises(ConfigError, match=f"experiment.seeds=.*{message}"):
        _seeded([[]], seeds, [])
