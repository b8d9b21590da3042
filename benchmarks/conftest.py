"""pytest-benchmark suite: `make bench` saves a run, `make bench-compare` fails on a median slowdown.

Not collected by the default `pytest` (testpaths = tests). Each benchmark times real training steps of one
cell in this process with `benchmark.pedantic` (one round = one optimizer step); the cell's measured memory
by category, FLOPs and quality come from membench's own run (`membench.execute.execute`) and go into
`extra_info`, so a saved benchmark JSON carries what a record carries.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
