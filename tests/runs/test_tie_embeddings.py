"""workload.tie_embeddings on GPT: the head is the token embedding; adding the field left every recorded cell's
identity as it was."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from membench.config import build
from membench.records import config_hash
from tests.helpers import compose, run_inprocess

ROOT = Path(__file__).resolve().parents[2]


def _gpt(*over):
    return build(compose("workload=gpt_tiny", *over)["workload"], "workload").build(0)


def test_tied_head_is_the_embedding_and_stays_so():
    untied, tied = _gpt(), _gpt("workload.tie_embeddings=true")
    assert tied.model.head.weight is tied.model.tok.weight
    c = tied.c
    n = sum(p.numel() for p in tied.model.parameters())
    assert n == sum(p.numel() for p in untied.model.parameters()) - c.vocab_size * c.d_model
    opt = tied.make_optimizer(tied.model.parameters())
    for i in range(2):
        tied.loss(tied.model, tied.batch(i, 2, torch.device("cpu"))).backward()
        opt.step()
        opt.zero_grad()
    assert tied.model.head.weight is tied.model.tok.weight


def test_tied_run_records_the_smaller_model_states():
    steps = ("run.train_steps=4", "run.warmup_steps=1", "run.measure_steps=1")
    untied = run_inprocess("workload=gpt_tiny", *steps)["memory"]["model_states"]
    tied = run_inprocess("workload=gpt_tiny", "workload.tie_embeddings=true", *steps)["memory"]["model_states"]
    c = _gpt().c
    assert untied["params"] - tied["params"] == c.vocab_size * c.d_model * 4  # fp32 head matrix


def test_committed_records_keep_their_hash():
    records = sorted(ROOT.glob("results/*/runs/*.json"))
    assert records
    for path in records:
        r = json.loads(path.read_text())
        assert config_hash(r["config"]) == r["config_hash"], path


def test_added_fields_at_their_default_leave_the_identity_unchanged():
    for preset, field, other in (("gpt_tiny", "tie_embeddings", True), ("llama_tiny", "attention_kernel", "math")):
        cfg = compose(f"workload={preset}")
        before = json.loads(json.dumps(cfg))
        del before["workload"][field]  # a record written before the field existed
        assert config_hash(cfg) == config_hash(before)
        assert config_hash(compose(f"workload={preset}", f"workload.{field}={other}")) != config_hash(cfg)
