"""README and docs tables are derived from the committed records, never hand-written."""

import pytest

from membench.readme import files, render


@pytest.mark.parametrize("path", files(), ids=lambda p: p.name)
def test_tables_match_the_records(path):
    text = path.read_text()
    assert render(text) == text, f"run `python -m membench.readme` to regenerate the tables in {path.name}"


def test_every_study_has_a_table_in_the_readme():
    text = files()[0].read_text()
    for marker in (
        "table:checkpointing",
        "table:zero_stages:zero",
        "table:quantization:quantization",
        "table:pruning:pruning",
    ):
        assert f"<!-- {marker}" in text, marker
