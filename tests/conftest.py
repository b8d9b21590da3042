"""pytest hooks and fixtures for the whole suite; shared helpers live in tests/helpers.py."""

from __future__ import annotations

import gc
import os
import signal

import pytest
import torch

# two torch threads, or one where the process is pinned to one core (scripts/test_all.sh runs two groups, one per core)
torch.set_num_threads(min(2, len(os.sched_getaffinity(0))))

# A shell without job control that starts pytest as a background job (`make test &`, `nohup make test &`, some CI
# wrappers) starts it with SIGINT ignored (POSIX, for asynchronous lists), nohup with SIGHUP ignored, and an ignored
# signal stays ignored in every child: the CLI processes the e2e tests start and then signal as a terminal would
# never saw the signal (the Slurm detach test waited forever after its SIGINT, on a fresh clone's `make test` run in
# the background). The tests signal their children as a user's terminal does, so the suite restores the defaults.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


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
