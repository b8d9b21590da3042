"""A regular install, outside the checkout: the wheel holds conf/ and the technique/workload packages inside the
membench namespace (no generic top-level `techniques` or `workloads`), and its `membench` command runs a cell
from another folder with a custom model from that folder, recording the package version in place of a commit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from membench.records import validate_record

ROOT = Path(__file__).resolve().parents[2]

FACTORY = """
import torch, torch.nn.functional as F
from torch import nn
from membench.workloads.custom import CustomParts

class Block(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.fc = nn.Linear(w, w)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))

class Net(nn.Module):
    def __init__(self, w=16, depth=2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(w) for _ in range(depth))
        self.out = nn.Linear(w, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.out(x)

def build(seed, width=16):
    def batch(step, batch_size, device):
        g = torch.Generator().manual_seed(seed * 1000 + step)
        x = torch.randn(batch_size, width, generator=g)
        return x.to(device), x.sum(1, keepdim=True).to(device)
    return CustomParts(model=Net(width), batch=batch, loss=lambda m, b: F.mse_loss(m(b[0]), b[1]),
                       block_classes=(Block,))
"""


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_runs_a_custom_model_from_the_current_folder(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = wheels.glob("membench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"membench", "membench_entry.py"}, tops  # the package, and the console script's entry module
    for path in ("membench/conf/config.yaml", "membench/conf/technique/zero.yaml", "membench/conf/workload/gpt2.yaml",
                 "membench/techniques/zero.py", "membench/workloads/gpt.py"):  # fmt: skip
        assert path in names, path

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    user = tmp_path / "user"
    user.mkdir()
    (user / "my_model.py").write_text(FACTORY)
    # The installed package, then this environment's dependencies; nothing of the checkout, no PYTHONPATH entry
    # for the user's folder: the factory must import from the current folder by itself.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])}
    env.pop("MEMBENCH_CONF", None)
    argv = [sys.executable, str(site / "bin" / "membench"), "run", "workload=custom", "workload.factory=my_model:build",
            "technique=[activation_checkpointing]", "run.device=cpu", "run.train_steps=4", "run.warmup_steps=1",
            "run.measure_steps=1", "run.results_dir=out"]  # fmt: skip
    p = subprocess.run(argv, cwd=user, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (rec,) = (user / "out" / "runs").glob("*.json")
    r = json.loads(rec.read_text())
    validate_record(r)
    assert r["status"] == "ok" and r["techniques"] == ["activation_checkpointing"]
    assert r["env"]["git"]["commit"] is None and r["env"]["git"]["version"]
    assert str(ROOT) not in json.dumps(r["config"])


def test_a_technique_whose_optional_package_is_missing_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """A plain install has no optional extras: a technique module importing one is listed as unavailable, and
    selecting it ends in one line naming the package and the extra (exit 2, nothing written)."""
    from membench import confpath, technique
    from membench.cli import main

    (tmp_path / "needs_missing.py").write_text("import bitsandbytes_not_installed_here  # noqa\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(confpath.MissingDependency, match="needs the package bitsandbytes_not_installed_here"):
        confpath.locate("needs_missing.Thing")
    (tmp_path / "technique").mkdir()
    (tmp_path / "technique" / "needs_missing.yaml").write_text(
        "# @package technique.needs_missing\n# a technique whose module needs a missing package\n"
        "_target_: needs_missing.Thing\n"
    )
    technique.discover([tmp_path])
    assert "bitsandbytes_not_installed_here" in technique.UNAVAILABLE["needs_missing"]
    monkeypatch.setenv("MEMBENCH_CONF_PATH", str(tmp_path))
    out = tmp_path / "out"
    assert main(["run", "technique=[needs_missing]", f"run.results_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the package bitsandbytes_not_installed_here" in err[0], err
    assert not out.exists()
