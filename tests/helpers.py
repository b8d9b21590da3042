"""Import target for tests: `from tests.helpers import compose, run_inprocess`."""

from tests.conftest import compose, run_inprocess  # noqa: F401
