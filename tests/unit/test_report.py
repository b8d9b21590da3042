"""`membench report`: seeds aggregate to mean ± 95% t-interval; a missing folder is an error."""

from __future__ import annotations

import json
from pathlib import Path

from membench.cli import main
from membench.records import config_hash
from membench.report import mean_ci, table

RECORDS = Path(__file__).resolve().parents[2] / "results" / "checkpointing" / "runs"
MiB = 2**20


def _baseline() -> dict:
    return next(
        r for r in map(json.loads, (p.read_text() for p in sorted(RECORDS.glob("*.json")))) if not r["techniques"]
    )


def _seeded(r: dict, seed: int, peak_mib: float, loss: float) -> dict:
    r = json.loads(json.dumps(r))
    r["config"]["run"]["seed"] = seed
    r["config_hash"] = config_hash(r["config"])
    r["memory"]["peak_bytes"] = int(peak_mib * MiB)
    r["quality"]["value"] = loss
    return r


def test_mean_ci_matches_the_closed_form():
    # mean 110, sd 10, n 3: half-width = t(0.975, 2) * 10 / sqrt(3) = 4.302653 * 5.773503 = 24.8414
    m, half = mean_ci([100.0, 110.0, 120.0])
    assert m == 110.0 and abs(half - 24.8414) < 1e-4
    assert mean_ci([5.0]) == (5.0, None)


def test_three_seeds_share_one_row_as_mean_and_interval():
    b = _baseline()
    rows = table([_seeded(b, s, peak, loss) for s, peak, loss in ((0, 100, 3.0), (1, 110, 3.1), (2, 120, 3.2))])
    body = rows.splitlines()[2:]
    assert len(body) == 1
    assert "(3 seeds)" in body[0] and "| 110.0 ± 24.8 |" in body[0] and "eval_loss=3.1000 ± 0.2484" in body[0]
    assert "| 1.00 |" in body[0]  # its own baseline: peak ratio 1


def test_single_seed_rows_are_unchanged():
    b = _baseline()
    row = table([b]).splitlines()[2]
    assert "±" not in row and "seeds" not in row and f"| {b['memory']['peak_bytes'] / MiB:.1f} |" in row


def test_report_on_a_missing_folder_is_an_error_and_writes_nothing(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["report", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("membench: error: report: ") and "has no runs/ folder" in err
    assert not missing.exists()


def test_host_bytes_get_their_own_column_only_where_a_device_run_has_them():
    """An offloaded state is a host byte: the table shows it beside the device's peak, never inside it."""
    b = _baseline()
    assert "host MiB" not in table([b])  # a CPU run: the host is the device
    r = json.loads(json.dumps(b))
    r["memory"]["device_name"] = "cuda:0"
    r["memory"]["by_device"] = {"cuda:0": r["memory"]["by_device"]["cpu"], "cpu": {"tracker_peak_bytes": 3 * MiB}}
    head, _, row = table([r]).splitlines()
    cols = dict(zip(head.split(" | "), row.split(" | "), strict=True))
    assert cols["host MiB"] == "3.0" and cols["peak MiB"] == f"{b['memory']['peak_bytes'] / MiB:.1f}"
