"""The llama workload: published parameter counts, the analytic activation model against MemTracker, exactness
of checkpointing on it, and the hashed large-vocabulary token map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from membench.config import build
from membench.workloads.llama import Llama, tokens
from tests.helpers import compose, run_inprocess

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


KERNEL_CASES = [("expand", "none"), ("math", "none"), ("math", "selective"), ("math", "bf16")]


@pytest.fixture(scope="module")
def kernel_runs(runs):
    out = {("grouped", k): r for k, r in runs.items()}
    for kernel, case in KERNEL_CASES:
        ov = (*CASES[case], f"workload.attention_kernel={kernel}")
        out[kernel, case] = run_inprocess("workload=llama_tiny", "workload.n_layer=4", SMALL, *STEPS, *ov)
    return out


@pytest.mark.parametrize("kernel,case", KERNEL_CASES)
def test_activation_model_follows_the_attention_path(kernel_runs, kernel, case):
    """expand keeps k/v with n_head heads; math keeps fp32 q/k/v and the s^2 softmax (torch's silent fallback
    for grouped heads in fp32 on CUDA): forced here on CPU, the model must follow each path, and each path must
    train the same model (expand repeats k/v in SDPA's own head order)."""
    r, grouped = kernel_runs[kernel, case], kernel_runs["grouped", case]
    assert abs(r["memory"]["relative_error"]["activations"]) < 0.03
    held, held_grouped = (x["memory"]["held_after_forward"]["activations"] for x in (r, grouped))
    assert held > held_grouped * (1.1 if kernel == "math" else 1.02)  # the path changed what is saved
    rtol = 1e-2 if case == "bf16" else 1e-5
    torch.testing.assert_close(r["quality"]["loss_curve"], grouped["quality"]["loss_curve"], rtol=rtol, atol=0)


def test_attention_path_by_device_and_dtype():
    """Which path runs where: CUDA has no fused grouped-k/v kernel in fp32 (flash attention is 16-bit only)."""
    from membench.workloads.llama import attention_path

    cpu, cuda, f32, bf16 = torch.device("cpu"), torch.device("cuda", 0), torch.float32, torch.bfloat16
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("pre-sm80 GPU: no flash attention")
    assert [attention_path("auto", True, d, t) for d, t in ((cpu, f32), (cpu, bf16), (cuda, f32), (cuda, bf16))] == [
        "fused", "fused", "expand", "fused"
    ]  # fmt: skip
    assert attention_path("grouped", True, cuda, f32) == "math"  # what enable_gqa alone gets there
    assert attention_path("auto", False, cuda, f32) == "fused"  # equal heads: the memory-efficient kernel
    assert attention_path("math", False, cpu, f32) == "math"


def test_bad_attention_kernel_is_one_line_naming_the_key():
    from membench.errors import ConfigError

    with pytest.raises(ConfigError, match="workload.attention_kernel=flash: must be one of auto, grouped, expand"):
        compose("workload=llama_tiny", "workload.attention_kernel=flash")


def test_grouped_attention_flops_where_torch_rejects_grouped_shapes(monkeypatch):
    """torch 2.11's SDPA FLOP formulas assert equal heads (the FLOP step raised on the GPU); with such formulas the
    FLOP step counts a grouped call as torch 2.13 does: the same total as the call on k/v repeated by hand."""
    from torch.utils import flop_counter

    from membench import measure

    def strict(fn):
        def wrapped(*shapes):
            if len({s[1] for s in shapes}) != 1:
                raise AssertionError("sdpa_flop_count: query/key/value shapes are incompatible")
            return fn(*shapes)

        return wrapped

    monkeypatch.setattr(flop_counter, "sdpa_flop_count", strict(flop_counter.sdpa_flop_count))
    monkeypatch.setattr(flop_counter, "sdpa_backward_flop_count", strict(flop_counter.sdpa_backward_flop_count))
    formulas = measure._grouped_attention_formulas()
    assert torch.ops.aten._scaled_dot_product_flash_attention in formulas

    def step(repeat: bool):
        q = torch.randn(2, 4, 16, 8, requires_grad=True)
        k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(2))
        if repeat:
            k, v = (z.repeat_interleave(2, dim=1) for z in (k, v))
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not repeat).sum().backward()

    with flop_counter.FlopCounterMode(display=False, custom_mapping=formulas) as fc:
        step(repeat=False)
    with flop_counter.FlopCounterMode(display=False) as by_hand:
        step(repeat=True)
    assert fc.get_total_flops() == by_hand.get_total_flops() > 0
    with pytest.raises(AssertionError, match="incompatible"), flop_counter.FlopCounterMode(display=False):
        step(repeat=False)  # the patched formula does reject grouped shapes: the mapping above is what counts


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
    from membench.workloads.llama import LlamaConfig

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
@pytest.mark.parametrize("kernel", ["auto", "math"])
@pytest.mark.parametrize("case", ["none", "selective", "bf16"])
def test_analytic_activation_model_on_cuda(case, kernel):
    """CUDA's fused RMSNorm keeps its input and rstd only; fp32 grouped attention takes the expand path (auto) or
    torch's math kernel: the model's CUDA branches, checked on the device."""
    ov = (*CASES[case], f"workload.attention_kernel={kernel}")
    r = run_inprocess("workload=llama_tiny", "run.device=cuda", SMALL, *STEPS, *ov)
    err = r["memory"]["relative_error"]["activations"]
    assert abs(err) < 0.05, (case, err)
