"""README tables are derived from the committed records, never hand-written."""

from membench.readme import ROOT, render


def test_readme_tables_match_the_records():
    text = (ROOT / "README.md").read_text()
    assert "<!-- table:checkpointing -->" in text
    assert render(text) == text, "run `python -m membench.readme` to regenerate the README tables"
