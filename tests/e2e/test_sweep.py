"""The sweep as a user scripts it: bad input caught before anything runs (exit 2, nothing written), exit codes,
labels naming each cell's knobs, run.jobs running cells side by side, `list`, `--version`, `run --help`."""

from __future__ import annotations

import pytest

from membench.cells import plan_cells
from membench.cli import main
from membench.launch import label
from membench.records import load_records

TINY = ["workload=gpt_tiny", "run.train_steps=6", "run.warmup_steps=1", "run.measure_steps=2"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["run.batchsize=4"], "run.batchsize=4: unknown key; allowed: batch_size, "),
        (["technique.activation_checkpointing.mode=full"], "technique activation_checkpointing is not selected"),
        (["run.batch_size=abc"], "run.batch_size=abc: expected an integer"),
        (["workload.data_path="], "workload.data_path='': empty"),
        (["workload.data_path=/nonexistent/corpus.txt"], "workload.data_path=/nonexistent/corpus.txt: no such file"),
        (
            ["workload=digits_cnn_tiny", "workload.n_layer=2"],
            "workload.n_layer=2: not a knob of workload digits_cnn_tiny",
        ),
        (["run.jobs=0"], "run.jobs=0: allowed: auto or a whole number >= 1"),
        (["run.launcher=pbs"], "run.launcher=pbs: allowed: local, slurm"),
        (["run.launcher=slurm", "slurm.time_min=0"], "slurm.time_min=0: must be >= 1"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_is_written(tmp_path, capsys, overrides, message):
    rc = main(["run", *overrides, f"run.results_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("membench: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_an_empty_data_file_is_bad_input(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["run", f"workload.data_path={empty}", f"run.results_dir={tmp_path / 'out'}"]) == 2
    assert "the file is empty" in capsys.readouterr().err


def test_labels_name_what_differs_between_cells():
    cells = plan_cells(
        [
            *TINY,
            "technique=[activation_checkpointing]",
            "technique.activation_checkpointing.mode=full,selective,every_k",
        ],
        True,
    )
    labels = [label(cfg, ov) for cfg, ov in cells]
    assert len(set(labels)) == 3 and all("mode=" in lab for lab in labels)
    resized = plan_cells(["workload=gpt_tiny", "workload.n_layer=4", "run.batch_size=2", "run.jobs=2"], False)
    assert label(*resized[0]) == "gpt_tiny n_layer=4 batch_size=2"  # sweep knobs are not part of a label


def test_exit_code_is_1_when_a_cell_fails_and_0_on_a_rerun_of_ok_cells(tmp_path, capsys):
    assert main(["run", "-m", *TINY, "run.memory_budget_mib=1", f"run.results_dir={tmp_path}"]) == 1
    assert [r["status"] for r in load_records(tmp_path)] == ["oom"]
    assert "1 failed" in capsys.readouterr().out


@pytest.mark.slow
def test_jobs_2_runs_two_cells_side_by_side_with_the_cores_split(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("membench.launch.local.cores", lambda: 4)
    rc = main(["run", "-m", *TINY, "run.seed=0,1,2", "run.jobs=2", f"run.results_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    first_done = next(i for i, line in enumerate(lines) if line.startswith("[1/3 done"))
    assert sum(line.startswith("  start ") for line in lines[:first_done]) == 2  # two cells running at once
    records = load_records(tmp_path)
    assert sorted(r["config"]["run"]["seed"] for r in records) == [0, 1, 2]
    assert all(r["launch"]["threads"] == 2 and r["env"]["torch_threads"] == 2 for r in records)  # 4 cores / 2 jobs
    assert all("jobs" not in r["config"]["run"] for r in records)


def test_list_version_and_run_help(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for needle in ("gpt_tiny (gpt): n_layer=2", "activation_checkpointing:", "    mode=full", "jobs=1", "partition="):
        assert needle in out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("membench ")
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "membench list" in help_text and "membench --version" in help_text
