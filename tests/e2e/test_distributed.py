"""The multi-rank launcher (torch.distributed.run with this process as agent): the env contract each rank sees,
exit codes, no rank left behind when the launcher is SIGKILLed, the spec for multi-node launches, and (GPU) one
GPU per rank over NCCL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from membench.distributed import run_ranks

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def test_each_rank_gets_torchruns_env_and_the_agent_as_parent(tmp_path):
    code = (
        "import json, os, sys; e = os.environ; "
        f"open(os.path.join({str(tmp_path)!r}, e['RANK']), 'w').write(json.dumps("
        "[e['RANK'], e['LOCAL_RANK'], e['WORLD_SIZE'], e['LOCAL_WORLD_SIZE'], e['MASTER_ADDR'], e['MASTER_PORT'], "
        "os.getppid()]))"
    )
    assert run_ranks(2, [sys.executable, "-c", code]) == 0
    seen = [json.loads((tmp_path / str(r)).read_text()) for r in range(2)]
    assert [s[:4] for s in seen] == [["0", "0", "2", "2"], ["1", "1", "2", "2"]]
    assert seen[0][4:6] == seen[1][4:6] and int(seen[0][5]) > 0  # one rendezvous address for both
    assert seen[0][6] == seen[1][6] == os.getpid()  # the agent is this process: ranks die with it


def test_a_rank_killed_by_a_signal_reports_128_plus_the_signal():
    code = (
        "import os, signal, time; os.kill(os.getpid(), signal.SIGKILL) if os.environ['RANK'] == '0' else time.sleep(60)"
    )
    t0 = time.monotonic()
    assert run_ranks(2, [sys.executable, "-c", code]) == 128 + signal.SIGKILL
    assert time.monotonic() - t0 < 30


def test_sigkilled_launcher_leaves_no_rank_behind(tmp_path):
    code = f"import os, time; open(os.path.join({str(tmp_path)!r}, os.environ['RANK']), 'w').write(str(os.getpid())); time.sleep(120)"
    argv = [sys.executable, "-m", "membench.distributed", "2", sys.executable, "-c", code]
    launcher = subprocess.Popen(argv, env=ENV, start_new_session=True, stderr=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = [int(p.read_text()) for p in tmp_path.iterdir() if p.read_text()]
        assert len(pids) == 2, "ranks did not start"
        assert all(_alive(p) for p in pids)
        os.killpg(launcher.pid, signal.SIGKILL)  # what the runner does on timeout, and what kill -9 of a sweep does
        launcher.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if _alive(p)]
    finally:
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_spec_for_a_multi_node_launch_is_the_runners_cell(tmp_path, capsys):
    from membench.child import worker_path
    from membench.distributed import main
    from membench.records import config_hash
    from membench.sweep import WORKER
    from tests.helpers import compose

    over = ["workload=gpt_tiny", "technique=[zero]", "run.world_size=2", f"run.results_dir={tmp_path}"]
    assert main(["spec", str(tmp_path / "spec.json"), *over]) == 0
    spec = json.loads((tmp_path / "spec.json").read_text())
    assert spec["config"] == compose(*over)
    assert spec["config_hash"] == config_hash(compose(*over)) and spec["run_id"].endswith(spec["config_hash"][:10])
    assert spec["results_dir"] == str(tmp_path)
    assert spec["worker"] == worker_path(WORKER)  # the ranks run what `membench run` runs
    assert main(["spec", str(tmp_path / "bad.json"), *over[:-1], "run.world_size=0"]) == 2
    assert capsys.readouterr().err.startswith("membench: error: run.world_size=0")
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.gpu
def test_two_ranks_on_two_gpus_over_nccl(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    over = ["workload=gpt_tiny", "run.device=cuda", "run.warmup_steps=1", "run.measure_steps=2", "run.train_steps=6"]
    over += ["technique=[zero]", "technique.zero.stage=3", "run.world_size=2", f"run.results_dir={tmp_path}"]
    subprocess.run([sys.executable, "-m", "membench.cli", "run", *over], env=ENV, check=True, timeout=300)
    (path,) = (tmp_path / "runs").glob("*.json")
    rec = json.loads(path.read_text())
    assert rec["status"] == "ok", rec.get("error")
    assert rec["distributed"]["backend"] == "nccl" and rec["distributed"]["world_size"] == 2
    assert [(r["rank"], r["torch_device"]) for r in rec["memory"]["per_rank"]] == [(0, "cuda:0"), (1, "cuda:1")]
    # each rank's CUDA allocator saw its own device: both ranks measured, stage 3 shards the params evenly
    assert all(r["device"]["cuda_max_allocated_bytes"] > 0 for r in rec["memory"]["per_rank"])
    psi = rec["technique_info"]["zero.psi"]
    assert [r["model_states"]["params"] for r in rec["memory"]["per_rank"]] == [4 * psi // 2] * 2
