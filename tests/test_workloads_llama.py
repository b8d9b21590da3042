"""The llama workload: published parameter counts, the analytic activation model against MemTracker, exactness
of checkpointing on it, and the hashed large-vocabulary token map."""

from __future__ import annotations

import pytest
import torch

from membench.config import build
from tests.helpers import compose, run_inprocess
from workloads.llama import Llama, tokens

STEPS = (
    "run.train_steps=4",
    "run.warmup_steps=1",
    "run.measure_steps=1",
    "run.batch_size=4",
    "workload.eval_batches=1",
)
SMALL = "workload.max_corpus_bytes=100000"
CKPT = "technique=[activation_checkpointing]"
CASES = {
    "none": (),
    "full": (CKPT,),
    "every_k": (CKPT, "technique.activation_checkpointing.mode=every_k"),
    "selective": (CKPT, "technique.activation_checkpointing.mode=selective"),
    "bf16": ("technique=[bf16]",),
    "bf16_pure": ("technique=[bf16_pure]",),
}
# Published totals: the safetensors metadata of meta-llama/Llama-3.2-1B and Llama-3.1-8B (Hugging Face hub).
PUBLISHED = {"llama_1b": 1_235_814_400, "llama_8b": 8_030_261_248}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_gpu_geometries_match_the_published_parameter_counts(preset):
    c = build(compose(f"workload={preset}")["workload"], "workload")
    with torch.device("meta"):
        model = Llama(c)
    n = sum(p.numel() for p in model.parameters())  # tied weights count once, as in the published total
    assert abs(n - PUBLISHED[preset]) / PUBLISHED[preset] < 0.01, n
    assert c.vocab_size == 128_256


@pytest.fixture(scope="module")
def runs():
    return {
        k: run_inprocess("workload=llama_tiny", "workload.n_layer=4", SMALL, *STEPS, *ov) for k, ov in CASES.items()
    }


def test_analytic_activation_model_matches_memtracker(runs):
    for case, r in runs.items():
        err = r["memory"]["relative_error"]["activations"]
        assert abs(err) < 0.03, (case, err)


def test_checkpointing_is_exact_and_saves_activations(runs):
    base = runs["none"]["quality"]["loss_curve"]
    for mode in ("full", "every_k", "selective"):  # exact: bit-identical losses
        assert runs[mode]["quality"]["loss_curve"] == base, mode
    held = {k: r["memory"]["held_after_forward"]["activations"] for k, r in runs.items()}
    assert held["full"] < held["every_k"] < held["none"] and held["selective"] < held["none"]


def test_tied_embeddings_share_one_matrix():
    tied = build(compose("workload=llama_tiny", "workload.tie_embeddings=true")["workload"], "workload").build(0)
    untied = build(compose("workload=llama_tiny")["workload"], "workload").build(0)
    assert tied.model.head.weight is tied.model.tok.weight
    n_tied, n_untied = (sum(p.numel() for p in w.model.parameters()) for w in (tied, untied))
    assert n_untied - n_tied == 256 * 64


def test_large_vocabulary_is_a_deterministic_map_of_the_bytes():
    data = torch.tensor(list(b"def f(x):\n    return x\n" * 50), dtype=torch.uint8)
    ids = tokens(data, 128_256)
    assert torch.equal(ids, tokens(data, 128_256)) and ids.dtype == torch.int32
    assert int(ids.min()) >= 0 and int(ids.max()) < 128_256
    assert len(ids.unique()) == len({bytes(data[i - 2 : i + 1].tolist()) for i in range(2, len(data))}) + 2
    assert torch.equal(tokens(data, 256), data)  # byte vocabulary: the bytes themselves


def test_bad_geometry_is_one_line_naming_the_key():
    from membench.errors import ConfigError

    with pytest.raises(ConfigError, match="workload.n_kv_head=3: must divide n_head=4"):
        compose("workload=llama_tiny", "workload.n_kv_head=3")


def test_forward_matches_transformers_llama_with_the_same_weights():
    """An independent implementation: transformers' LlamaForCausalLM, given our weights, gives our logits."""
    transformers = pytest.importorskip("transformers")
    from workloads.llama import LlamaConfig

    c = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64, ffn_dim=176, seq_len=32, rope_theta=10_000.0)
    torch.manual_seed(0)
    ours = Llama(c)
    cfg = transformers.AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=32, rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
    )  # fmt: skip
    theirs = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    names = {"tok": "model.embed_tokens", "norm": "model.norm", "head": "lm_head"}
    per_block = {
        "norm1": "input_layernorm", "norm2": "post_attention_layernorm", "attn.q": "self_attn.q_proj",
        "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj", "attn.o": "self_attn.o_proj",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    }  # fmt: skip
    for i in range(c.n_layer):
        names.update({f"blocks.{i}.{a}": f"model.layers.{i}.{b}" for a, b in per_block.items()})
    state = {f"{names[k.rsplit('.', 1)[0]]}.weight": v for k, v in ours.state_dict().items()}
    assert theirs.load_state_dict(state, strict=True)
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["none", "selective", "bf16"])
def test_analytic_activation_model_on_cuda(case):
    """CUDA's fused RMSNorm keeps its input and rstd only: the model's CUDA branch, checked on the device."""
    r = run_inprocess("workload=llama_tiny", "run.device=cuda", SMALL, *STEPS, *CASES[case])
    err = r["memory"]["relative_error"]["activations"]
    assert abs(err) < 0.05, (case, err)
