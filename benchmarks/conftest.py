"""pytest-benchmark suite: `make bench` saves a run with its raw rounds, `make bench-compare` judges the last two.

Not collected by the default `pytest` (testpaths = tests). Each benchmark times real training steps of one
cell in this process with `benchmark.pedantic` (one round = one optimizer step); the cell's measured memory
by category, FLOPs and quality come from membench's own run (`membench.execute.execute`) and go into
`extra_info`, so a saved benchmark JSON carries what a record carries.
"""

from __future__ import annotations

# GPU-marked benchmarks skip without CUDA, by the same hook as the tests
from tests.conftest import pytest_collection_modifyitems  # noqa: F401
