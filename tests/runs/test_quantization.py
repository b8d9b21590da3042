"""Quantization techniques: swaps only where intended, exact stored bytes per format, 8-bit AdamW state bytes,
adapters train on a frozen base, config errors, and every technique x workload composes."""

from __future__ import annotations

import math

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from membench.errors import ConfigError
from membench.techniques import quantization as q
from membench.techniques.base import Context
from membench.techniques.optim8bit import Optimizer8bit
from membench.techniques.quantized_base import QuantizedBase
from membench.techniques.weight_quant import WeightQuant
from membench.workloads.digits import DigitsConfig
from membench.workloads.gpt import GPTConfig
from tests.helpers import compose

CPU = torch.device("cpu")
TINY_GPT = dict(n_layer=2, n_head=2, d_model=64, seq_len=32, max_corpus_bytes=200_000)


def _gpt(seed: int = 0):
    return GPTConfig(**TINY_GPT).build(seed)


def _ctx(wl) -> Context:
    return Context(workload=wl, device=CPU, run=None)


def _linears_in_blocks(wl) -> int:
    return sum(type(m) is nn.Linear for m in wl.blocks().modules())


@pytest.mark.parametrize("quant_type", ["int8", "nf4", "fp4"])
def test_swaps_exactly_the_block_linears(quant_type):
    from peft.tuners.lora import bnb as peft_bnb

    wl = _gpt()
    n_block_linears, head = _linears_in_blocks(wl), wl.model.head
    t = QuantizedBase(quant_type=quant_type)
    patch = t.apply(wl.model, _ctx(wl))
    # PEFT's own bitsandbytes LoRA layers (QLoRA), dispatched from the model's is_loaded_in_4bit/8bit flag
    peft_type = peft_bnb.Linear8bitLt if quant_type == "int8" else peft_bnb.Linear4bit
    wrapped = [m for m in wl.model.modules() if isinstance(m, peft_type)]
    assert len(wrapped) == n_block_linears == patch.info["quantized_layers"] == 12
    assert wl.model.head is head  # the head stays a full-precision nn.Linear by default
    assert type(wl.model.tok) is nn.Embedding and head.weight.dtype == torch.float32
    bnb_type = bnb.nn.Linear8bitLt if quant_type == "int8" else bnb.nn.Linear4bit
    assert all(type(m.get_base_layer()) is bnb_type and not m.get_base_layer().weight.requires_grad for m in wrapped)
    assert _linears_in_blocks(wl) == 2 * n_block_linears  # the only plain linears left: adapters A and B


# Bytes of one 512x256 weight (n = 131072) as bitsandbytes lays it out, worked by hand:
#   int8: n int8 codes + 512 fp32 row scales                                  = 131072 + 2048          = 133120
#   nf4/fp4, blocks of 64: n/2 packed codes + 2048 fp32 absmax + 16-entry fp32 code table
#                                                                              = 65536 + 8192 + 64      = 73792
#   nf4 double quant: codes + 2048 uint8 absmax + 8 fp32 nested absmax (blocks of 256) + 256-entry fp32 nested
#                     code table + fp32 offset + 16-entry code table          = 65536+2048+32+1024+4+64 = 68708
#   nf4, blocks of 128: codes + 1024 fp32 absmax + code table                  = 65536 + 4096 + 64      = 69696
# Bits per weight from the papers (no code tables): LLM.int8 8 + 32/256 = 8.125; NF4 4 + 32/64 = 4.5;
# double quantization 4 + 8/64 + 32/(64*256) = 4.127; blocks of 128: 4 + 32/128 = 4.25.
@pytest.mark.parametrize(
    ("quant_type", "double_quant", "blocksize", "stored_bytes", "paper_bits"),
    [
        ("int8", False, 64, 133120, 8.125),
        ("nf4", False, 64, 73792, 4.5),
        ("fp4", False, 64, 73792, 4.5),
        ("nf4", True, 64, 68708, 4 + 8 / 64 + 32 / (64 * 256)),
        ("nf4", False, 128, 69696, 4.25),
    ],
)
def test_stored_bytes_match_the_hand_worked_layout_and_the_paper_bits(
    quant_type, double_quant, blocksize, stored_bytes, paper_bits
):
    torch.manual_seed(0)
    layer = q.to_bnb(nn.Linear(256, 512), quant_type, blocksize, double_quant, torch.float32, CPU)
    assert q.storage_bytes([layer.weight, *q.side_tensors(layer)]) == stored_bytes
    assert q.layout_bytes(512, 256, quant_type, blocksize, double_quant) == stored_bytes
    assert q.formula_bits(quant_type, blocksize, double_quant, 256) == pytest.approx(paper_bits, abs=1e-12)


def test_4bit_forward_flops_are_counted_like_the_same_dense_matmuls(monkeypatch):
    """FlopCounterMode cannot see bitsandbytes' gemm_4bit; the registered formula must make a QLoRA step count
    exactly what the same step counts with a frozen fp32 nn.Linear in place of each 4-bit base (an independent
    count: torch's own mm/addmm formulas on the dense ops)."""
    from tests.helpers import run_inprocess

    cell = ("workload=gpt_tiny", "technique=[quantized_base]", "run.warmup_steps=1", "run.measure_steps=1",
            "run.train_steps=4")  # fmt: skip
    rec = run_inprocess(*cell)
    assert rec["technique_info"]["quantized_base.flop_formulas_added"][0] == "bitsandbytes::gemm_4bit"
    assert rec["flops"]["counted_by_op"]["bitsandbytes.gemm_4bit"] > 0

    def frozen_dense(lin, *args, **kwargs):
        return lin.requires_grad_(False)

    monkeypatch.setattr(q, "to_bnb", frozen_dense)
    dense = run_inprocess(*cell)
    assert "bitsandbytes.gemm_4bit" not in dense["flops"]["counted_by_op"]
    assert rec["flops"]["counted_per_step"] == dense["flops"]["counted_per_step"]


def test_quantized_base_prediction_equals_measured_state_bytes():
    from membench.execute import state_bytes
    from membench.technique import model_states

    wl = _gpt()
    t = QuantizedBase(quant_type="nf4", double_quant=True)
    fresh = _gpt()
    predicted = model_states(fresh.model, fresh.blocks(), [t], 1)["device"]  # the record's and the planner's rule
    patch = t.apply(wl.model, _ctx(wl))
    extra = patch.extra_state()
    opt = wl.make_optimizer([p for p in wl.model.parameters() if p.requires_grad])
    wl.loss(wl.model, wl.batch(0, 2, CPU)).backward()
    opt.step()
    states = state_bytes(wl.model, opt, extra)["cpu"]
    assert states == predicted


def test_adapters_train_and_the_quantized_base_stays_bit_identical():
    torch.manual_seed(0)
    wl = _gpt()
    t = QuantizedBase(quant_type="nf4", freeze_rest=True)
    info = t.apply(wl.model, _ctx(wl)).info
    frozen = {n: p.detach().clone() for n, p in wl.model.named_parameters() if not p.requires_grad}
    trainable = [p for p in wl.model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == info["adapter_params"]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = _fit_one_batch(wl, opt, CPU, steps=8)
    assert losses[-1] < losses[0]
    assert all(torch.equal(frozen[n], p) for n, p in wl.model.named_parameters() if n in frozen)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in trainable)


def test_int8_base_steps_leave_no_input_alive_after_the_instrumented_steps():
    """bitsandbytes' int8 matmul keeps its input as a ctx attribute; the memory step (MemTracker) used to leave its
    whole autograd graph alive, so every later step carried all int8 layers' fp32 inputs (gpt2 b=8 on an H200:
    the FLOP and timed steps peaked 2016 MiB above the memory step). Counted from the tensors themselves, the
    memory and FLOP steps must leave exactly what a plain step leaves (the leak here: the distinct int8-layer
    inputs, q/k/v sharing one: 8 x 64 tokens x (3 x 64 + 256) x 2 blocks x 4 bytes = 1,835,008)."""
    import functools

    from membench import measure
    from membench.execute import Trainer, build_all
    from tests.helpers import live_tensor_bytes

    cfg = compose("workload=gpt_tiny", "technique=[quantized_base]", "technique.quantized_base.quant_type=int8",
                  "run.device=cpu", "run.warmup_steps=1", "run.measure_steps=1", "run.train_steps=4")  # fmt: skip
    tr = Trainer(*build_all(cfg))
    tr.step(0)
    plain = live_tensor_bytes()
    tr.memory_step(1)
    after_memory = live_tensor_bytes()
    measure.count_flops(functools.partial(tr.step, 2))
    after_flop = live_tensor_bytes()
    tr.step(3)
    assert (after_memory - plain, after_flop - plain, live_tensor_bytes() - plain) == (0, 0, 0)


def test_adapter_count_is_rank_times_in_plus_out():
    wl = _gpt()
    info = QuantizedBase(rank=4, freeze_rest=True).apply(wl.model, _ctx(wl)).info
    # per block: q, k, v, proj (64 -> 64), fc (64 -> 256), fc_out (256 -> 64)
    per_block = 4 * 4 * (64 + 64) + 4 * (64 + 256) + 4 * (256 + 64)
    assert info["adapter_params"] == info["trainable_params"] == 2 * per_block


def _bnb_state_formula(params: list[torch.Tensor], min_size: int = 4096) -> int:
    total = 0
    for p in params:
        n = p.numel()
        total += 2 * n + 2 * 4 * math.ceil(n / 256) if n >= min_size else 8 * n
    return total + (2 * 256 * 4 if any(p.numel() >= min_size for p in params) else 0)


def test_adamw8bit_state_is_a_quarter_of_fp32_plus_block_scales():
    import bitsandbytes as bnb

    from membench.execute import state_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 16))
    params = list(model.parameters())
    opt32, opt8 = torch.optim.AdamW(params, lr=1e-3), bnb.optim.AdamW8bit(params, lr=1e-3)
    for opt in (opt32, opt8):
        model(torch.randn(4, 512)).sum().backward()
        opt.step()
        opt.zero_grad()
    b32 = state_bytes(model, opt32, {})["cpu"]["optimizer"] - 4 * len(params)  # minus torch's fp32 step scalars
    b8 = state_bytes(model, opt8, {})["cpu"]["optimizer"]
    assert b32 == 8 * sum(p.numel() for p in params)
    assert b8 == _bnb_state_formula(params)
    assert 0.25 < b8 / b32 < 0.26  # 1 byte per state instead of 4, plus one fp32 scale per 256 values


def _predicted_optimizer(t) -> float:
    from membench.technique import model_states

    fresh = _gpt()
    return model_states(fresh.model, fresh.blocks(), [t], 1)["device"]["optimizer"]


def test_optimizer_8bit_prediction_matches_measured():
    from membench.execute import state_bytes

    wl = _gpt()
    t = Optimizer8bit()
    opt = t.apply(wl.model, _ctx(wl)).optimizer_factory(wl.model)
    wl.loss(wl.model, wl.batch(0, 2, CPU)).backward()
    opt.step()
    assert state_bytes(wl.model, opt, {})["cpu"]["optimizer"] == _predicted_optimizer(t)


def test_torchao_optimizer_state_bytes_match_prediction_eagerly():
    from membench.execute import state_bytes

    wl = _gpt()
    t = Optimizer8bit(backend="torchao", bits=4)
    opt = t.apply(wl.model, _ctx(wl)).optimizer_factory(wl.model)
    wl.loss(wl.model, wl.batch(0, 2, CPU)).backward()
    with torch.compiler.set_stance("force_eager"):  # skip the tens-of-seconds compile in a unit test
        opt.step()
    assert state_bytes(wl.model, opt, {})["cpu"]["optimizer"] == _predicted_optimizer(t)


def test_weight_quant_reports_before_and_after_and_torchao_int4_is_eight_bits():
    cases = [
        ("bitsandbytes", 4, (4.5, 4.5)),
        ("torchao", 4, (8 + 40 / 64, 8 + 40 / 64)),
        ("torchao", 8, (8 + 40 / 256, 8 + 40 / 64)),
    ]
    for backend, bits, (lo, hi) in cases:
        wl = _gpt()
        hook = WeightQuant(backend=backend, bits=bits).apply(wl.model, _ctx(wl)).before_eval[0]
        before = wl.evaluate(wl.model, CPU).value  # an evaluation of our own, before and after the hook
        info = hook(wl.model)
        assert info["quantized_layers"] == 12
        assert info["quality_before"] == before
        assert info["quality_after"] == wl.evaluate(wl.model, CPU).value != before
        if backend == "bitsandbytes":  # + one 64-byte code table per layer
            assert info["weight_bytes_stored"] == sum(q.layout_bytes(o, i, "nf4", 64, False) for o, i in _shapes())
        else:
            assert info["bits_per_param_measured"] == pytest.approx(info["bits_per_param_formula"])
        assert lo <= info["bits_per_param_formula"] <= hi  # torchao int4 on CPU: one value per int8 byte


def _shapes():
    return 2 * ([(64, 64)] * 4 + [(256, 64), (64, 256)])


@pytest.mark.parametrize(
    "cls, kwargs, key",
    [
        (QuantizedBase, {"quant_type": "int4"}, "quant_type"),
        (QuantizedBase, {"quant_type": "int8", "double_quant": True}, "double_quant"),
        (QuantizedBase, {"blocksize": 48}, "blocksize"),
        (QuantizedBase, {"compute_dtype": "fp8"}, "compute_dtype"),
        (Optimizer8bit, {"backend": "apex"}, "backend"),
        (Optimizer8bit, {"bits": 4}, "bits"),
        (Optimizer8bit, {"backend": "torchao", "paged": "on"}, "paged"),
        (WeightQuant, {"bits": 2}, "bits"),
        (WeightQuant, {"backend": "torchao", "double_quant": True, "bits": 4}, "double_quant"),
    ],
)
def test_bad_values_raise_config_error_naming_the_key(cls, kwargs, key):
    with pytest.raises(ConfigError, match=f"technique.{cls.kind}.{key}="):
        cls(**kwargs)


def test_bad_quant_type_fails_at_compose_time():
    with pytest.raises(ConfigError, match="quant_type"):
        compose("technique=[quantized_base]", "technique.quantized_base.quant_type=int3")


def test_combinations_and_devices_are_checked():
    with pytest.raises(ConfigError, match="quantized_base,weight_quant"):
        compose("technique=[quantized_base,weight_quant]")
    with pytest.raises(ConfigError, match="paged=on: needs cuda"):
        compose("technique=[optimizer_8bit]", "technique.optimizer_8bit.paged=on", "run.device=cpu")


def test_digits_has_no_linear_in_blocks_and_says_so():
    wl = DigitsConfig().build(0)
    with pytest.raises(ConfigError, match="no nn.Linear in its blocks"):
        QuantizedBase().apply(wl.model, _ctx(wl))
    info = QuantizedBase(quantize_outside_blocks=True).apply(wl.model, _ctx(wl)).info
    assert info["quantized_layers"] == 1 and info["quantized_params"] == 64 * 10
    wl.model.eval()  # 10 output rows: the packed CPU kernel (out % 32) is switched off, eval still runs
    with torch.no_grad():
        assert wl.model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


TECHNIQUE_SETS = [
    ["technique=[quantized_base]"],
    ["technique=[optimizer_8bit]"],
    ["technique=[weight_quant]"],
    ["technique=[optimizer_8bit]", "technique.optimizer_8bit.backend=torchao", "technique.optimizer_8bit.bits=4"],
    ["technique=[quantized_base,activation_checkpointing,optimizer_8bit]"],
    ["technique=[weight_quant,bf16]"],
]


@pytest.mark.parametrize("workload", ["gpt_tiny", "gpt_small", "digits_cnn", "digits_cnn_tiny"])
@pytest.mark.parametrize("techs", TECHNIQUE_SETS)
def test_every_technique_composes_with_each_workload(workload, techs):
    """Composition (config checks, no model) on every preset; building and applying is tested on the tiny ones."""
    cfg = compose(f"workload={workload}", *techs)
    assert set(cfg["technique"]) >= {t.split("[")[1].split(",")[0].rstrip("]") for t in techs[:1]}


@pytest.mark.parametrize("workload", ["gpt_tiny", "digits_cnn_tiny"])
@pytest.mark.parametrize("techs", TECHNIQUE_SETS)
def test_every_technique_applies_to_each_tiny_workload(workload, techs):
    """Built and applied as a run applies it (no training step): the quantized layers are in the model and store
    fewer bytes than the fp32 weights they replace, the optimizer is the 8-bit/4-bit one, and post-training
    quantization (the before-eval hook) shrinks the parameters; digits' blocks hold no Linear and say so."""
    from membench.execute import build_all, state_bytes
    from membench.techniques import compose as tcompose

    cfg = compose(f"workload={workload}", *techs)
    run, wcfg, techs_, device = build_all(cfg)
    kinds = {t.kind for t in techs_}
    torch.manual_seed(0)
    wl = wcfg.build(0)
    fp32_bytes = sum(t.numel() * t.element_size() for t in [*wl.model.parameters(), *wl.model.buffers()])
    ctx = Context(workload=wl, device=device, run=run)
    quantizes = kinds & {"quantized_base", "weight_quant"}

    def apply():
        model, patch = tcompose.apply_all(tcompose.ordered(techs_), wl.model, ctx)
        make = patch.optimizer_factory or (lambda m: wl.make_optimizer([p for p in m.parameters() if p.requires_grad]))
        opt = make(model)
        for hook in patch.before_eval:  # post-training quantization acts here
            hook(model)
        return model, patch, opt

    if quantizes and workload.startswith("digits"):
        with pytest.raises(ConfigError, match="has no nn.Linear in its blocks"):
            apply()
        return
    model, patch, opt = apply()
    params = state_bytes(model, opt, patch.extra_state() if patch.extra_state else {})["cpu"]["params"]
    if quantizes:
        assert params < 0.6 * fp32_bytes, (params, fp32_bytes)  # most of GPT's weights are block Linears
    else:
        assert params == fp32_bytes
    if "quantized_base" in kinds:
        from peft.tuners.lora import LoraLayer

        wrapped = [m for m in model.modules() if isinstance(m, LoraLayer)]  # PEFT's adapters over the low-bit bases
        bases = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
        assert len(wrapped) == len(bases) > 0
        assert all(isinstance(m.get_base_layer(), (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in wrapped)
    library = "torchao" if "torchao" in str(techs) else "bitsandbytes" if "optimizer_8bit" in kinds else "torch"
    assert type(opt).__module__.split(".")[0] == library


@pytest.mark.gpu
def test_cuda_quantized_base_and_paged_adamw8bit():
    """bitsandbytes CUDA kernels: a frozen nf4 base with adapters trains, and paged=auto picks PagedAdamW8bit."""
    import bitsandbytes as bnb

    cuda = torch.device("cuda")
    wl = _gpt()
    wl.model.to(cuda)
    ctx = Context(workload=wl, device=cuda, run=None)
    QuantizedBase(quant_type="nf4", double_quant=True, compute_dtype="bfloat16").apply(wl.model, ctx)
    opt = Optimizer8bit().apply(wl.model, ctx).optimizer_factory(wl.model)
    assert isinstance(opt, bnb.optim.PagedAdamW8bit)
    losses = _fit_one_batch(wl, opt, cuda, steps=5)
    assert losses[-1] < losses[0]


def _fit_one_batch(wl, opt, device, steps: int) -> list[float]:
    """Train repeatedly on one fixed batch; the losses (a trainable model must drive them down)."""
    batch = wl.batch(0, 4, device)
    losses = []
    for _ in range(steps):
        loss = wl.loss(wl.model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_bnb_matmul_flops_on_cuda_equal_the_frozen_dense_step(quant_type, monkeypatch):
    """On CUDA the 4-bit forward (gemm_4bit) and int8 matmuls (int8_scaled_mm / int8_mixed_scaled_mm) are custom
    kernels FlopCounterMode cannot see: with the registered formulas the step counts what a frozen dense base does."""
    from tests.helpers import run_inprocess

    cell = ("workload=gpt_tiny", "technique=[quantized_base]", f"technique.quantized_base.quant_type={quant_type}",
            "run.device=cuda", "run.warmup_steps=1", "run.measure_steps=1", "run.train_steps=4")  # fmt: skip
    rec = run_inprocess(*cell)
    monkeypatch.setattr(q, "to_bnb", lambda lin, *a, **k: lin.requires_grad_(False))
    dense = run_inprocess(*cell)
    assert rec["flops"]["counted_per_step"] == dense["flops"]["counted_per_step"]
