"""`membench export RESULTS_DIR [--out FILE.csv|FILE.parquet]`: every record as one row of a flat table for
notebooks, through pandas (`json_normalize` makes the dotted column names: `config.run.batch_size`,
`memory.peak_bytes`, ...).

Per-step lists do not fit a row: a list of numbers becomes `<key>.n` and `<key>.last` (`quality.loss_curve.last`
is the final loss; the step-time median and IQR are columns already), a list of strings one comma-joined cell
(`techniques`), a list of objects only its length (`memory.per_rank.n`: the headline columns are the max over
ranks). Tracebacks and the child's output tail stay in the JSON records.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from membench.errors import ConfigError
from membench.records import load_records, runs_dir

FORMATS = (".csv", ".parquet")
_DROP = ("error_traceback", "child_output_tail")
_FIRST = ("run_id", "status", "experiment", "workload.preset", "techniques", "config_hash", "error")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _summarise(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if k in _DROP:
            continue
        if isinstance(v, dict):
            out[k] = _summarise(v)
        elif isinstance(v, list) and v and all(_number(x) for x in v):
            out[k] = {"n": len(v), "last": v[-1]}
        elif isinstance(v, list) and all(isinstance(x, str) for x in v):
            out[k] = ",".join(v)
        elif isinstance(v, list):
            out[k] = {"n": len(v)}
        else:
            out[k] = v
    return out


def flat(d: dict) -> dict:
    """One record (or any nested dict) as {dotted.key: value}, lists summarised as in the table."""
    return pd.json_normalize(_summarise(d), sep=".").to_dict("records")[0] if d else {}


def _arrow_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Parquet needs one type per column: a column holding several (a knob that is a number in one record and
    a string in another) is written as text."""
    for col in [c for c in df.columns if df[c].dtype.kind == "O"]:
        kinds = {type(x) for x in df[col] if x is not None and x == x}
        if len(kinds) > 1:
            df[col] = df[col].map(lambda x: x if x is None or x != x else str(x))
    return df


def table(results_dir: str | Path) -> pd.DataFrame:
    """One row per record (in run_id order), dotted column names, lists summarised."""
    if not runs_dir(results_dir).is_dir():
        raise ConfigError(f"export: {str(results_dir)!r} has no runs/ folder of records")
    records = sorted(load_records(results_dir), key=lambda r: r["run_id"])
    df = pd.json_normalize([_summarise(r) for r in records], sep=".")
    first = [c for c in _FIRST if c in df.columns]
    return df[first + sorted(c for c in df.columns if c not in first)]


def export(results_dir: str | Path, out: str | None) -> pd.DataFrame:
    """Write the table to `out` (.csv or .parquet, chosen by suffix) or, without `out`, CSV to stdout."""
    if out is not None and Path(out).suffix not in FORMATS:
        raise ConfigError(f"export --out={out}: unknown format; allowed: {', '.join(FORMATS)}")
    df = table(results_dir)
    if out is None:
        print(df.to_csv(index=False), end="")
    elif out.endswith(".csv"):
        df.to_csv(out, index=False)
    else:
        _arrow_safe(df).to_parquet(out, index=False)
    return df
