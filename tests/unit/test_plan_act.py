"""A plan you can act on (issue 17): every workload plans and fits; `technique=[...]` is in every candidate;
hybrid predictions replace model states phase by phase and never fall below them; the max batch a plan names
runs and a batch 30% larger does not."""

from __future__ import annotations

import json

import pytest

from membench import plan as pl
from membench.cli import main
from membench.errors import MemoryBudgetExceeded
from membench.predict import model_states
from tests.helpers import compose

ROW_KEYS = {"label", "kinds", "peak_bytes", "host_bytes", "fits", "max_batch", "predictions"}


def _plan(*overrides, **knobs):
    pc, user = pl.split_overrides(["run.device=cpu", "plan.records=[/nonexistent]", *overrides])
    for k, v in knobs.items():
        setattr(pc, k, v)
    return pl.plan(user, pc, progress=lambda m: None), user


@pytest.mark.parametrize(
    "workload,techniques",
    [
        ("llama_tiny", "bf16_pure"),  # crashed: q/k fp32 (RoPE tables) against v bf16 in SDPA
        ("hf_gpt2_tiny", ""),  # TypeError: no activation model
        ("custom", "activation_checkpointing"),
        ("digits_cnn_tiny", "bf16_pure"),
        ("gpt_tiny", "bf16_pure"),
    ],
)
def test_every_workload_plans_one_given_combination(workload, techniques):
    if workload.startswith("hf"):
        pytest.importorskip("transformers")
    r, _ = _plan(f"workload={workload}", f"technique=[{techniques}]", "run.memory_budget_mib=64", "plan.techniques=[]")
    (row,) = r["rows"]
    assert ROW_KEYS <= set(row) and row["kinds"] == [k for k in techniques.split(",") if k]
    assert row["best_predictor"] == "simulation" and row["fits"] is True and row["max_batch"] > r["batch_size"]
    assert row["peak_bytes"] == pytest.approx(sum(row["predictions"]["simulation"]["by_category"].values()))
    analytic = row["predictions"]["analytic"]
    if workload in ("hf_gpt2_tiny", "custom"):  # no analytic activation model: no analytic peak, not a guess
        assert analytic["by_category"]["activations"] is None and analytic["peak_bytes"] is None


def test_fit_works_without_an_activation_model():
    pytest.importorskip("transformers")
    cfg = compose("workload=hf_gpt2_tiny", "run.memory_budget_mib=8", "run.batch_size=2", "run.device=cpu")
    runs = []

    def runner(c):  # stands in for real runs: the batch search itself is tested in test_plan.py
        runs.append(c["run"]["batch_size"])
        return {"status": "ok" if c["run"]["batch_size"] <= 5 else "oom", "run_id": "-", "memory": {"peak_bytes": 1},
                "timing": {"median_step_s": 1.0, "samples_per_s": 1.0}}  # fmt: skip

    res = pl.fit(cfg, pl.PlanConfig(fit_max_runs=6), runner=runner, progress=lambda m: None)
    assert res["predictor"] == "simulation" and res["predicted_batch"] >= 2 and res["batch"] == 5


def test_given_techniques_are_in_every_candidate_with_their_knobs(tmp_path):
    r, user = _plan("workload=gpt_tiny", "run.memory_budget_mib=64", "technique=[activation_checkpointing]",
                    "technique.activation_checkpointing.mode=full", "plan.techniques=[precision]", simulate=0)  # fmt: skip
    assert r["fixed_techniques"] == ["activation_checkpointing"]
    assert sorted(x["label"] for x in r["rows"]) == [
        "activation_checkpointing:full" + s for s in ("", "+bf16", "+bf16_pure", "+fp16")
    ]
    # each row's overrides compose through Hydra (as --verify runs them) to the plan's own configuration
    cells = pl.compose_cells(pl.without_list(user), [x["overrides"] for x in r["rows"]])
    assert all(c["technique"]["activation_checkpointing"]["mode"] == "full" for c in cells)
    assert [len(c["technique"]) for c in cells] == [len(x["kinds"]) for x in r["rows"]]
    # plan.techniques=[]: exactly the given combination, through the CLI
    out = tmp_path / "p.json"
    argv = ["plan", "workload=gpt_tiny", "technique=[activation_checkpointing,bf16]", "run.memory_budget_mib=8",
            "technique.activation_checkpointing.mode=every_k", "plan.techniques=[]", "plan.simulate=0",
            f"plan.out={out}", f"run.results_dir={tmp_path}", "run.device=cpu"]  # fmt: skip
    assert main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["label"] == "activation_checkpointing:every_k+bf16" and ROW_KEYS <= set(row)


def _check_rows(r: dict, user: list[str]) -> None:
    """No prediction negative, none below the candidate's device-resident model states, categories adding up."""
    from membench.config import build

    base = pl.compose_cells(user, [[]])[0]  # no device check: CUDA plans are made on this CPU
    wl = pl.fake_workload(build(base["workload"], "workload"), 0)
    cells = pl.compose_cells(pl.without_list(user), [row["overrides"] for row in r["rows"]])
    assert cells
    for row, c in zip(r["rows"], cells, strict=True):
        _, _, techs = pl.validated(c, r["device"])
        states = model_states(wl.model, wl.blocks(), techs, r["world_size"])["device"]
        floor = states["params"] + states["grads"] + states["optimizer"]
        for name, p in row["predictions"].items():
            if p.get("peak_bytes") is None:
                continue
            assert p["peak_bytes"] >= floor * (1 - 1e-9), (row["label"], name, p["peak_bytes"], floor)
            if "by_category" in p:
                assert all(v >= 0 for v in p["by_category"].values() if v is not None), (row["label"], name)
                assert p["peak_bytes"] == pytest.approx(sum(v or 0 for v in p["by_category"].values()))
            for phase in p.get("phases", {}).values():
                assert all(v >= 0 for v in phase.values()) and sum(phase.values()) <= p["peak_bytes"] * (1 + 1e-9)


def test_hybrid_never_below_model_states_gpt_tiny():
    r, user = _plan("workload=gpt_tiny", "run.memory_budget_mib=64",
                    "plan.techniques=[precision,quantized_base,optimizer_8bit]", simulate=99)  # fmt: skip
    assert {x["best_predictor"] for x in r["rows"]} == {"simulation", "hybrid"}
    _check_rows(r, user)


# The review's families (where the subtraction put rows below their own weights) over every candidate; the families
# added since (lora, fused_ce, the optimizers) take one row each in test_every_workload_plans_one_given_combination.
REVIEWED = "plan.techniques=[activation_checkpointing,precision,quantized_base,optimizer_8bit]"


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["gpt_tiny", "llama_tiny", "digits_cnn_tiny"])
def test_every_candidate_never_below_model_states(preset):
    r, user = _plan(f"workload={preset}", "run.memory_budget_mib=64", REVIEWED, simulate=99)
    assert all(x["best_predictor"] in ("simulation", "hybrid") for x in r["rows"])
    _check_rows(r, user)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["llama_8b", "gpt2_xl"])
def test_large_cuda_plans_never_below_model_states(preset):
    """The review's rows: llama_8b QLoRA-like at -2.16 GiB and checkpointing+bf16_pure+quantized_base below its
    own parameters, from subtracting the analytic state difference at the start of backward."""
    r, user = _plan(f"workload={preset}", "run.device=cuda", "run.memory_budget_mib=81920",
                    "plan.techniques=[precision,quantized_base,activation_checkpointing]", simulate=99)  # fmt: skip
    assert r["device"] == "cuda"
    assert {x["best_predictor"] for x in r["rows"]} == {"simulation", "hybrid"}
    _check_rows(r, user)


def test_max_batch_runs_and_a_third_more_does_not():
    """The review's case: full checkpointing + pure bf16 at 8 MiB said 55; batch 32 ran (7.81 MiB), 37 ended oom."""
    from membench.execute import execute

    tech = ("technique=[activation_checkpointing,bf16_pure]", "technique.activation_checkpointing.mode=full")
    r, _ = _plan("workload=gpt_tiny", *tech, "run.memory_budget_mib=8", "plan.techniques=[]")
    (row,) = r["rows"]
    assert "simulation at batch" in row["max_batch_source"]

    def status(b: int) -> str:
        cfg = compose("workload=gpt_tiny", *tech, "run.memory_budget_mib=8", "run.train_steps=4", "run.warmup_steps=1",
                      "run.measure_steps=1", "run.device=cpu", f"run.batch_size={b}")  # fmt: skip
        try:
            execute(cfg)
            return "ok"
        except MemoryBudgetExceeded:
            return "oom"

    b = row["max_batch"]
    assert status(b) == "ok" and status(round(1.3 * b)) == "oom"


def test_study_table_prints_the_measured_status():
    rec = {"run_id": "x", "config": {"workload": {"preset": "llama_tiny"}, "run": {"batch_size": 8}},
           "plan_check": {"label": "a", "techniques": "a", "budget_mib": 64, "predictor": "hybrid",
                          "predicted_peak_bytes": 2**20, "peak_error": None, "peak_error_by": {}, "predicted_fits": True,
                          "over_budget": False, "measured": {"status": "error", "peak_bytes": None}}}  # fmt: skip
    assert pl.study_table([rec]).splitlines()[-1].endswith("| yes/error |")


def test_fused_ce_lowers_the_analytic_activations_by_the_fp32_logits():
    """The analytic predictor passes fused cross-entropy's chunking to the activation model: the plan's analytic
    activations fall by the fp32 logits of the batch (b x s x V x 4 bytes) less the fp32 logsumexp kept per token."""
    common = ("workload=llama_tiny", "workload.vocab_size=8192", "run.batch_size=2", "run.memory_budget_mib=512",
              "plan.techniques=[]")  # fmt: skip
    (plain,) = _plan(*common, simulate=0)[0]["rows"]
    (fused,) = _plan(*common, "technique=[fused_ce]", simulate=0)[0]["rows"]
    act = [r["predictions"]["analytic"]["by_category"]["activations"] for r in (plain, fused)]
    tokens = 2 * 64  # batch x llama_tiny's sequence length
    assert act[0] - act[1] >= tokens * 8192 * 4 - tokens * 4, act
