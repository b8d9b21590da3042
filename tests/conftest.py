"""pytest hooks and fixtures for the whole suite; shared helpers live in tests/helpers.py."""

from __future__ import annotations

import gc

import pytest
import torch

torch.set_num_threads(2)


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
