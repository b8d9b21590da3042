"""Typed record sections (membench/sections.py) keep the JSON keys of schema 2: every committed record survives a
round trip unchanged, key order included, and passes validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from membench import SCHEMA_VERSION
from membench.records import validate_record
from membench.sections import OK_SECTIONS, Distributed, Memory, OomMemory

ROOT = Path(__file__).resolve().parents[2]
RECORDS = sorted((ROOT / "results").rglob("runs/*.json"))


def _ok_v2() -> list[dict]:
    out = [json.loads(p.read_text()) for p in RECORDS]
    return [r for r in out if r.get("schema_version") == SCHEMA_VERSION and r["status"] == "ok"]


def test_there_are_committed_records_to_check():
    assert len(_ok_v2()) >= 50


@pytest.mark.parametrize("cls", [*OK_SECTIONS, Distributed], ids=lambda c: c.KEY)
def test_every_committed_section_round_trips_unchanged(cls):
    for r in _ok_v2():
        if cls.KEY not in r:
            continue
        again = cls.from_dict(r[cls.KEY]).to_dict()
        assert list(again.items()) == list(r[cls.KEY].items()), (r["run_id"], cls.KEY)


def test_every_committed_ok_record_validates():
    for r in _ok_v2():
        validate_record(r)


def test_a_missing_key_is_named():
    r = _ok_v2()[0]
    memory = dict(r["memory"])
    del memory["peak_source"]
    with pytest.raises(ValueError, match=r"record: missing memory\.peak_source"):
        Memory.from_dict(memory)
    broken = dict(r, memory=dict(r["memory"], by_category={"params": 1}))
    with pytest.raises(ValueError, match="memory category grads missing"):
        validate_record(broken)


def test_an_oom_memory_section_has_its_three_keys_in_order():
    assert list(OomMemory(budget_mib=64.0).to_dict()) == ["budget_mib", "peak_bytes", "peak_source"]
