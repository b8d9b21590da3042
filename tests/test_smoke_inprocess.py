from tests.helpers import run_inprocess


def test_gpt_tiny_runs_and_reports_all_sections():
    out = run_inprocess("workload=gpt_tiny", "run.train_steps=6", "run.warmup_steps=1", "run.measure_steps=2")
    assert out["memory"]["peak_bytes"] > 0
    assert set(out["memory"]["by_category"]) == {"params", "grads", "optimizer", "activations", "other"}
    assert len(out["timing"]["step_times_s"]) == 2
    assert len(out["quality"]["loss_curve"]) == 6
