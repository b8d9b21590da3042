"""Import target for tests: `from tests.helpers import compose, live_tensor_bytes, run_inprocess`."""

from tests.conftest import compose, experiment_cells, live_tensor_bytes, run_inprocess  # noqa: F401
