"""The optional MLflow logger against real mlflow with a local file store in tmp_path: a committed 2-rank ZeRO
record and an error record logged, then read back through MLflow's own client and compared with the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from membench.errors import ConfigError
from membench.mlflow_log import check_uri, log_if_configured
from membench.records import skeleton

mlflow = pytest.importorskip("mlflow")
STUDY = Path(__file__).resolve().parents[2] / "results" / "zero_stages" / "runs"


def _two_rank_record(uri: str) -> dict:
    recs = [json.loads(p.read_text()) for p in sorted(STUDY.glob("*.json"))]
    rec = next(r for r in recs if r["config"]["run"]["world_size"] == 2 and r["status"] == "ok")
    rec["config"]["run"]["mlflow_uri"] = uri
    return rec


def test_record_logged_with_params_metrics_histories_and_artifact(tmp_path):
    uri = f"file:{tmp_path / 'mlruns'}"
    rec = _two_rank_record(uri)
    rec["timing"].update(energy_j_per_step=12.5, energy_j_per_sample=1.5625)  # as a CUDA record (schema v2) has
    rid = log_if_configured(rec)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = client.get_run(rid)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == rec["experiment"] == "zero_stages"
    p, m = run.data.params, run.data.metrics
    assert p["run.world_size"] == "2" and p["technique.zero.stage"] == str(rec["config"]["technique"]["zero"]["stage"])
    assert p["workload.d_model"] == str(rec["config"]["workload"]["d_model"])
    assert not [k for k in p if k.startswith("experiment")]  # the study's cell list is not a knob of this run
    assert m["memory.peak_bytes"] == rec["memory"]["peak_bytes"]
    assert m["timing.median_step_s"] == pytest.approx(rec["timing"]["median_step_s"], rel=1e-12)
    assert (m["timing.energy_j_per_step"], m["timing.energy_j_per_sample"]) == (12.5, 1.5625)
    assert m["quality.value"] == pytest.approx(rec["quality"]["value"], rel=1e-12)
    loss = client.get_metric_history(rid, "loss")
    assert [h.step for h in loss] == list(range(len(rec["quality"]["loss_curve"])))
    assert [h.value for h in loss] == pytest.approx(rec["quality"]["loss_curve"], rel=1e-12)
    assert len(client.get_metric_history(rid, "step_time_s")) == len(rec["timing"]["step_times_s"])
    assert run.data.tags["membench.run_id"] == rec["run_id"] and run.data.tags["membench.status"] == "ok"
    art = Path(client.download_artifacts(rid, "record.json", str(tmp_path)))
    assert json.loads(art.read_text()) == json.loads(json.dumps(rec, default=str))


def test_failed_record_is_a_failed_mlflow_run_and_unset_uri_logs_nothing(tmp_path):
    uri = f"file:{tmp_path / 'mlruns'}"
    config = {"workload": {"preset": "gpt_tiny"}, "run": {"mlflow_uri": uri, "batch_size": 4}}
    rec = dict(skeleton("20261127T000000-000001-abcdefabcd", "a" * 16, config, "oom"), error="OutOfMemoryError: x")
    run = mlflow.tracking.MlflowClient(tracking_uri=uri).get_run(log_if_configured(rec))
    assert run.info.status == "FAILED" and run.data.tags["membench.error"] == "OutOfMemoryError: x"
    assert run.data.params["run.batch_size"] == "4" and run.data.metrics == {}
    assert log_if_configured(dict(rec, config={"run": {}})) is None


def test_unreachable_server_warns_and_the_sweep_goes_on(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    rec = dict(skeleton("r", "b" * 16, {"workload": {}, "run": {"mlflow_uri": "http://127.0.0.1:9"}}, "error"))
    assert log_if_configured(dict(rec, error="x")) is None
    assert capsys.readouterr().err.startswith("membench: warning: run.mlflow_uri=http://127.0.0.1:9: not logged:")


@pytest.mark.parametrize("uri", ["mlruns", "ftp://x", "sqlite:///m.db"])
def test_bad_uri_is_a_config_error(uri):
    import importlib.util

    if uri.startswith("sqlite") and importlib.util.find_spec("sqlalchemy"):
        pytest.skip("full mlflow installed: sqlite works")
    with pytest.raises(ConfigError, match=f"run.mlflow_uri={uri}: "):
        check_uri(uri)


def test_runner_logs_the_record_it_returns(tmp_path, monkeypatch):
    from membench import runner
    from membench.records import write_record

    uri = f"file:{tmp_path / 'mlruns'}"
    rec = _two_rank_record(uri)

    def child_wrote_its_record(cell):  # stands in for the child process: the record appears under runs/
        write_record(cell.results_dir, dict(rec, run_id=cell.run_id))

    monkeypatch.setattr(runner.Cell, "start", child_wrote_its_record)
    returned = runner.run_cell(rec["config"], str(tmp_path), 60.0)
    assert returned["config_hash"] == rec["config_hash"]
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("zero_stages").experiment_id])
    assert run.data.tags["membench.run_id"] == returned["run_id"]
