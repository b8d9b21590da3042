"""Shared test helpers (fixtures and pytest hooks live in conftest.py): compose configs through the real CLI planner,
run a config in-process, and count a real step's bytes without MemTracker (the independent reference the
tracker and the fake-tensor simulation are tested against).
Import target for tests: `from tests.helpers import compose, run_inprocess, ...`."""

from __future__ import annotations

import functools
import gc
import time
from pathlib import Path

import torch

from membench.cells import configs as plan

# A run long enough for every phase of the schedule (warm-up, memory step, FLOP step, one timed step).
SHORT_RUN = ("run.train_steps=4", "run.warmup_steps=1", "run.measure_steps=1")


def compose(*overrides: str) -> dict:
    """One resolved, validated config dict (raises membench.errors.ConfigError on bad input)."""
    cells = plan(list(overrides), multirun=False)
    assert len(cells) == 1
    return cells[0]


@functools.cache
def experiment_cells(name: str) -> tuple[dict, ...]:
    """The composed cells of one study, once per session (tests that read the same study share it; the pruning
    study alone is ~40 Hydra compositions). Read-only: a test must not change the dicts."""
    return tuple(plan([f"+experiment={name}"], multirun=False))


def config_parts(cfg: dict):
    """(workload config, technique configs) of a composed config, unbuilt (what membench.simulate takes)."""
    from membench.config import build

    techs = [build(n, f"technique.{k}") for k, n in (cfg.get("technique") or {}).items()]
    return build(cfg["workload"], "workload"), techs


def run_inprocess(*overrides: str) -> dict:
    """Execute one run in this process (no child): the measured sections of a record."""
    from membench.execute import execute

    return execute(compose(*overrides))


def held_activations(record: dict) -> int:
    """Activation bytes the tracker saw held between forward and backward."""
    return record["memory"]["held_after_forward"]["activations"]


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def _reachable_storages() -> dict[tuple[str, int], int]:
    gc.collect()
    return {
        _storage_key(o): o.untyped_storage().nbytes()
        for o in gc.get_objects()
        if isinstance(o, torch.Tensor) and o.device.type != "meta"
    }


def live_tensor_bytes() -> int:
    """Bytes of every distinct storage behind a tensor Python can still reach (gc-tracked), after a full collection:
    an independent count of what a step left alive."""
    return sum(_reachable_storages().values())


def exact_step_bytes(cfg: dict) -> dict[str, int]:
    """One warm-up step, then one real step of `cfg` on real tensors, counted without MemTracker: the exact
    storage bytes of parameters + buffers, of the gradients after backward, of the optimizer state after the
    step, and of the activations held between forward and backward. Activations = every storage autograd saved
    for backward (saved_tensors_hooks, unique storages, parameters left out) plus every tensor storage Python can
    newly reach after the forward (selective checkpointing keeps its saved outputs in its own cache, not through
    autograd's hooks; the loss). Left out: the CPU RNG states non-reentrant checkpointing saves per call
    (torch.get_rng_state(), made outside the dispatcher, so no tracker sees them)."""
    from membench.execute import Trainer, build_all

    run, wcfg, techs, device = build_all(cfg)
    tr = Trainer(run, wcfg, techs, device)
    tr.step(0)  # the warm-up step allocates the optimizer state
    model, opt = tr.model, tr.optimizer
    params = {_storage_key(t): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
    rng_state_bytes = torch.get_rng_state().numel()
    saved: dict = {}
    held: dict = {}
    grads: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta" and _storage_key(t) not in params:
            saved[_storage_key(t)] = t.untyped_storage().nbytes()
        return t

    def after_forward() -> None:
        held.update(saved)
        for k, n in _reachable_storages().items():
            if k not in before and k not in params and n != rng_state_bytes:
                held[k] = n

    def after_backward() -> None:
        grads.update({_storage_key(p.grad): p.grad.untyped_storage().nbytes() for p in model.parameters()
                      if p.grad is not None})  # fmt: skip

    before = _reachable_storages()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tr.step(1, after_forward=after_forward, after_backward=after_backward)
    states = {_storage_key(v): v.untyped_storage().nbytes()
              for s in opt.state.values() for v in s.values() if torch.is_tensor(v)}  # fmt: skip
    return {
        "params": sum(params.values()),
        "grads": sum(grads.values()),
        "optimizer": sum(states.values()),
        "activations": sum(held.values()),
    }


def tagged_pids(mark: str) -> list[int]:
    """Pids of live processes whose environment carries MEMBENCH_TEST_MARK=mark (a sweep, its forkserver, cells,
    ranks); zombies and dead ones left out."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if f"MEMBENCH_TEST_MARK={mark}".encode() in (p / "environ").read_bytes().split(b"\0"):
                if (p / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    pids.append(int(p.name))
        except OSError:
            continue
    return pids


def none_left(mark: str, within_s: float) -> list[int]:
    """The marked processes still alive after waiting up to `within_s` for them to go."""
    deadline = time.monotonic() + within_s
    while tagged_pids(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    return tagged_pids(mark)


def _two_rank_worker(rank: int, out_dir: str, cells: list[tuple[str, list[str]]]) -> None:
    """One rank of `two_rank_records`: runs every (name, overrides) cell through membench.execute, rank 0 writes
    each record as out_dir/NAME.json; each rank's stderr goes to out_dir/rankN.stderr."""
    import json
    import os
    import sys

    import torch.distributed as dist

    log = open(Path(out_dir, f"rank{rank}.stderr"), "w")  # noqa: SIM115 (open for the life of the process)
    os.dup2(log.fileno(), 2)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    sys.modules["mlflow"] = None  # `import deepspeed` (registry discovery) would import it: seconds per rank
    # a file rendezvous in the caller's tmp dir: no port another session could take (tests/e2e/test_zero.py)
    dist.init_process_group("gloo", init_method=f"file://{Path(out_dir, 'rendezvous')}", rank=rank, world_size=2)
    from membench.execute import execute

    for name, overrides in cells:
        out = execute(compose(*overrides))
        if rank == 0:
            Path(out_dir, f"{name}.json").write_text(json.dumps(out, default=str))
    dist.barrier()
    dist.destroy_process_group()


def two_rank_records(out_dir: Path, cells: list[tuple[str, list[str]]]) -> dict[str, dict]:
    """Real 2-rank gloo runs of `cells` ((name, overrides) pairs) in two spawned processes: {name: rank 0's record}.
    A rank that dies fails the test with both ranks' stderr tails."""
    import json

    import pytest

    try:
        torch.multiprocessing.spawn(_two_rank_worker, args=(str(out_dir), cells), nprocs=2)
    except torch.multiprocessing.ProcessExitedException as e:
        tails = {p.name: p.read_text()[-6000:] for p in sorted(out_dir.glob("rank*.stderr"))}
        pytest.fail(f"{e}\n" + "\n".join(f"--- {name} ---\n{text}" for name, text in tails.items()))
    return {name: json.loads((out_dir / f"{name}.json").read_text()) for name, _ in cells}
