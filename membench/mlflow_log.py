"""Optional MLflow logging of each record (`run.mlflow_uri=...`), called once the record is written: params are
the flattened config (`run.batch_size`, `technique.zero.stage`, ...), metrics the headline numbers (peak bytes,
median step time, throughput, the quality metric, energy when the record has it) plus the loss curve and step
times as per-step histories, and the record JSON itself as the artifact `record.json`.

Uses mlflow's own client (mlflow-skinny is enough). Tracking URIs: an MLflow server (http://, https://,
databricks), a database (sqlite:///mlflow.db: needs full `mlflow`, which brings sqlalchemy), or a local file store
(file:PATH): MLflow 3 keeps the file store in maintenance mode behind MLFLOW_ALLOW_FILE_STORE=true, which is set
for this process when a file: URI is given.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from membench.errors import ConfigError

_HEADLINE = (
    "memory.peak_bytes",
    "timing.median_step_s",
    "timing.iqr_step_s",
    "timing.samples_per_s",
    "timing.tokens_per_s",
    "quality.value",
    "flops.counted_per_step",
    "wall_s",
)
_HISTORIES = (("quality", "loss_curve", "loss"), ("timing", "step_times_s", "step_time_s"))


def check_uri(uri: str | None) -> None:
    """Config-time check of run.mlflow_uri (cheap: nothing is imported or contacted)."""
    if uri is None:
        return
    allowed = "file:PATH, sqlite:///FILE.db, http(s)://HOST[:PORT], databricks"
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"run.mlflow_uri={uri}: mlflow is not installed (pip install mlflow-skinny)")
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    if scheme not in ("file", "sqlite", "http", "https", "databricks", "postgresql", "mysql", "mssql"):
        raise ConfigError(f"run.mlflow_uri={uri}: unknown scheme; allowed: {allowed}")
    if scheme in ("sqlite", "postgresql", "mysql", "mssql") and importlib.util.find_spec("sqlalchemy") is None:
        raise ConfigError(f"run.mlflow_uri={uri}: a database store needs full mlflow (sqlalchemy); allowed: {allowed}")


def _metrics(record: dict, flat: dict) -> dict[str, float]:
    keys = [*_HEADLINE, *(k for k in flat if "energy" in k)]  # timing.energy_j_per_step, ..._per_sample
    out = {}
    for k in keys:
        v = flat.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
            out[k] = float(v)
    return out


def log_record(record: dict, uri: str) -> str:
    """Log one record as one MLflow run in the experiment named like the record's (or `membench`); returns the
    MLflow run id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from membench.export import flat

    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    name = record.get("experiment") or "membench"
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    config = {k: v for k, v in record["config"].items() if k != "experiment"}
    params = [Param(k, str(v)[:6000]) for k, v in flat(config).items()]
    tags = {
        "membench.run_id": record["run_id"],
        "membench.config_hash": record["config_hash"],
        "membench.status": record["status"],
        "membench.techniques": ",".join(record.get("techniques") or []) or "baseline",
    }
    if record.get("error"):
        tags["membench.error"] = str(record["error"])[:5000]
    run = client.create_run(exp_id, run_name=f"{record['workload'].get('preset')}-{record['run_id']}", tags=tags)
    rid = run.info.run_id
    ts = run.info.start_time
    metrics = [Metric(k, v, ts, 0) for k, v in _metrics(record, flat(record)).items()]
    for section, key, metric in _HISTORIES:
        for step, v in enumerate((record.get(section) or {}).get(key) or []):
            metrics.append(Metric(metric, float(v), ts, step))
    client.log_batch(rid, metrics=metrics, params=params)
    client.log_text(rid, json.dumps(record, indent=1, default=str), "record.json")
    client.set_terminated(rid, "FINISHED" if record["status"] == "ok" else "FAILED")
    return rid


def log_if_configured(record: dict) -> str | None:
    """The runner's hook after a record is written: logs when run.mlflow_uri is set. The record is already safe
    on disk, so a tracking server that fails costs a warning line, not the sweep."""
    uri = ((record.get("config") or {}).get("run") or {}).get("mlflow_uri")
    if not uri:
        return None
    try:
        return log_record(record, uri)
    except Exception as e:  # noqa: BLE001 - MlflowException, connection errors: reported, the sweep goes on
        print(f"membench: warning: run.mlflow_uri={uri}: not logged: {type(e).__name__}: {e}", file=sys.stderr)
        return None
