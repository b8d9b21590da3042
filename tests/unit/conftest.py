"""Every test under tests/unit/ is marked `unit`: no training step: configs, records, reports, planning on fake tensors, CLI input errors."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    # conftest hooks see the whole session's items: mark only this folder's
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.unit)
