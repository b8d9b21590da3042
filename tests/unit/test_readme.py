"""README and docs tables are derived from the committed records, never hand-written."""

import re

import pytest

from membench.readme import ROOT, files, render


@pytest.mark.parametrize("path", files(), ids=lambda p: p.name)
def test_tables_match_the_records(path):
    text = path.read_text()
    assert render(text) == text, f"run `python -m membench.readme` to regenerate the tables in {path.name}"


def test_every_study_has_its_page_with_its_table():
    studies = ROOT / "docs" / "studies"
    for page, marker in (
        ("checkpointing", "table:checkpointing"),
        ("zero_stages", "table:zero_stages:zero"),
        ("quantization", "table:quantization:quantization"),
        ("pruning", "table:pruning:pruning"),
        ("llama", "table:llama"),
        ("plan", "table:plan:plan"),
        ("gpu", "table:gpu:device"),
    ):
        text = (studies / f"{page}.md").read_text()
        assert text.count(f"<!-- {marker} -->") == 1, (page, marker)
        assert f"(docs/studies/{page}.md)" in files()[0].read_text(), page


def test_study_tables_are_not_repeated_outside_their_page():
    for path in files():
        if path.parent.name != "studies":  # the one table across studies (tracking.md's gate table) is no study's
            found = re.findall(r"<!-- table:([\w:-]+) -->", path.read_text())
            assert found == (["studies:gate"] if path.name == "tracking.md" else []), path.name
