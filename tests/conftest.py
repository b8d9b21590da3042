"""Shared test helpers: compose configs through the real CLI planner; run a config in-process."""

from __future__ import annotations

import functools
import gc

import pytest
import torch

from membench.cells import configs as plan

torch.set_num_threads(2)


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


def run_inprocess(*overrides: str) -> dict:
    """Execute one run in this process (no child): the measured sections of a record."""
    from membench.execute import execute

    return execute(compose(*overrides))


def live_tensor_bytes() -> int:
    """Bytes of every distinct storage behind a tensor Python can still reach (gc-tracked), after a full collection:
    an independent count of what a step left alive."""
    gc.collect()
    storages = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type != "meta":
            st = o.untyped_storage()
            storages[(str(o.device), st.data_ptr())] = st.nbytes()
    return sum(storages.values())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Each in-process run calls gc.collect() (membench/execute.py). In this process a full collection walks every object
# of the libraries imported so far (torch, transformers, DeepSpeed, mlflow, torch._dynamo, ...: ~600k objects,
# ~0.4 s), so a run late in the session paid seconds for it. What is still reachable after the collection phase, and
# after each test module, lives for the session: it is frozen (left out of every later collection, refcounting
# frees it as before), and each collection only walks what the current module's tests created. gc.get_objects() leaves
# frozen objects out too: live_tensor_bytes() counts the tensors made since, and its tests compare two counts taken
# within one test.
def pytest_collection_finish(session):
    gc.freeze()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # the module's fixtures are finalised first
    if nextitem is None or nextitem.module is not item.module:
        gc.collect()
        gc.freeze()
