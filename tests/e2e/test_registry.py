"""One technique, one place: a technique defined outside the repository (tests/toy: one module, one YAML) runs,
lists and plans through the real CLI; and the harness names no technique."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from membench import technique
from membench.errors import ConfigError
from membench.records import validate_record

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "tests" / "toy"
# Harness modules allowed to name techniques: study definitions and the README generator.
EXEMPT = {"studies.py", "readme.py"}
# Known literals awaiting their module's owner, with their count (none left: one more literal anywhere fails).
PENDING: dict = {}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MEMBENCH_CONF_PATH=str(TOY), PYTHONPATH=os.pathsep.join([str(ROOT), str(TOY)]))
    return subprocess.run([sys.executable, "-m", "membench.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)  # fmt: skip


def test_toy_technique_from_outside_runs_lists_and_plans(tmp_path):
    listed = _cli("list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "  toy_freeze: Toy technique from outside the repository" in listed.stdout
    assert "    blocks=1" in listed.stdout

    run = _cli("run", "workload=gpt_tiny", "technique=[toy_freeze,activation_checkpointing]", "run.train_steps=5",
               "run.warmup_steps=1", "run.measure_steps=2", f"run.results_dir={tmp_path / 'r'}", cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    (path,) = (tmp_path / "r" / "runs").glob("*.json")
    r = json.loads(path.read_text())
    validate_record(r)
    assert r["status"] == "ok"
    # applied before checkpointing (order 0.5 < 6), and what it froze is what stopped training: an independent
    # count from the record's own exact state bytes (fp32 grads: 4 bytes per trainable parameter)
    assert r["technique_info"]["toy_freeze.frozen_params"] > 0
    trainable = r["workload"]["num_params"] - r["technique_info"]["toy_freeze.frozen_params"]
    assert r["memory"]["model_states"]["grads"] == 4 * trainable

    out = tmp_path / "plan.json"
    plan = _cli("plan", "workload=gpt_tiny", "run.memory_budget_mib=64", "run.device=cpu",
                "plan.techniques=[toy_freeze,activation_checkpointing]", "plan.simulate=1", f"plan.out={out}",
                cwd=tmp_path)  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    rows = json.loads(out.read_text())["rows"]
    labels = {row["label"] for row in rows}
    assert "toy_freeze" in labels and "activation_checkpointing:full+toy_freeze" in labels
    toy = next(row for row in rows if row["label"] == "toy_freeze")
    base = next(row for row in rows if row["label"] == "baseline")
    assert toy["time_ratio"] == pytest.approx(0.9) and not toy["quality"]["exact"]
    assert toy["predictions"]["analytic"]["by_category"]["grads"] == 4 * trainable
    assert base["predictions"]["analytic"]["by_category"]["grads"] == 4 * r["workload"]["num_params"]


def test_declared_incompatibility_and_order_come_from_the_registry():
    sys.path.insert(0, str(TOY))
    try:
        import toy_freeze
    finally:
        sys.path.remove(str(TOY))
    from membench.techniques.checkpointing import ActivationCheckpointing
    from membench.techniques.quantized_base import QuantizedBase

    toy, ac = toy_freeze.ToyFreeze(), ActivationCheckpointing()
    assert technique.REGISTRY["toy_freeze"] is toy_freeze.ToyFreeze
    assert technique.ordered([ac, toy]) == [toy, ac]
    with pytest.raises(ConfigError, match=r"technique=\[toy_freeze,quantized_base\]: incompatible: its adapters"):
        technique.validate([QuantizedBase(), toy], "cpu")
    with pytest.raises(ConfigError, match="registered twice"):
        type("Other", (technique.Technique,), {"kind": "toy_freeze", "__module__": "elsewhere"})
    technique.REGISTRY.pop("toy_freeze")


def _literals_and_imports(path: Path) -> tuple[list[str], list[str]]:
    tree = ast.parse(path.read_text())
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    imports = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imports += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    return strings, imports


def test_the_harness_names_no_technique():
    """No string literal equal to a registered technique's name and no import of a technique module in membench/
    (studies and the README generator excepted): adding a technique touches its module and YAML only."""
    kinds = set(technique.discover())
    assert len(kinds) >= 10
    found: dict[tuple[str, str], int] = {}
    bad_imports = []
    for path in sorted((ROOT / "membench").rglob("*.py")):
        if path.name in EXEMPT:
            continue
        strings, imports = _literals_and_imports(path)
        for s in strings:
            if s in kinds:
                found[(path.name, s)] = found.get((path.name, s), 0) + 1
        bad_imports += [f"{path.name}: {m}" for m in imports if m.startswith(("membench.techniques", "techniques"))]
    assert found == PENDING
    assert bad_imports == []


def test_the_name_check_can_fail(tmp_path):
    p = tmp_path / "x.py"
    p.write_text('from membench.techniques.zero import Zero\nKIND = "zero"\n')
    strings, imports = _literals_and_imports(p)
    assert "zero" in strings and "membench.techniques.zero" in imports


def test_workloads_declare_their_schema_depth_and_input_checks(tmp_path):
    from membench.config import register_schema
    from membench.simulate import layer_key
    from membench.workloads.base import SCHEMAS
    from membench.workloads.digits import DigitsConfig
    from membench.workloads.gpt import GPTConfig

    register_schema()
    assert {"gpt", "llama", "hf", "digits", "custom"} <= set(SCHEMAS)
    assert layer_key(GPTConfig()) == "n_layer" and layer_key(DigitsConfig()) is None
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="the file is empty"):
        GPTConfig.check_inputs({"data_path": str(empty)})
    assert not hasattr(DigitsConfig, "check_inputs")


def test_every_registered_technique_declares_a_place_and_a_frozen_config():
    import dataclasses

    classes = technique.discover()
    orders = [c.order for c in classes.values()]
    assert len(set(orders)) == len(orders) and all(o > 0 for o in orders)  # one total apply order
    for kind, cls in classes.items():
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, kind
        assert cls.exact or cls.loss_rtol >= 0, kind
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cls(), next(iter(f.name for f in dataclasses.fields(cls)), "x"), None)
    # declared by one side: no pair is declared twice with two reasons
    declared = [frozenset({k, o}) for k, c in classes.items() for o in c.incompatible]
    assert len(declared) == len(set(declared))
