"""LoRA through PEFT: trainable counts equal PEFT's own, roles select exactly the declared layers, optimizer state
is the adapters' only, the base does not move, the pure states step equals the real bytes, QLoRA dispatches PEFT's
bitsandbytes layers, and real short runs of [lora] and [quantized_base,lora] on gpt_tiny and llama_tiny finish."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from membench.errors import ConfigError
from membench.technique import model_states
from membench.techniques import lora
from membench.techniques.base import Context
from membench.techniques.lora import Lora
from membench.techniques.quantized_base import QuantizedBase
from membench.workloads.gpt import GPTConfig
from tests.helpers import compose

CPU = torch.device("cpu")
TINY_GPT = dict(n_layer=2, n_head=2, d_model=64, seq_len=32, max_corpus_bytes=200_000)


def _gpt(seed: int = 0):
    return GPTConfig(**TINY_GPT).build(seed)


def _llama():
    cfg = compose("workload=llama_tiny")["workload"]
    from membench.config import build

    return build(cfg, "workload").build(0)


def _apply(t, wl):
    ctx = Context(workload=wl, device=CPU, run=None)
    patch = t.apply(wl.model, ctx)
    ctx.applied[t.kind] = patch.applied
    return patch, ctx


def _peft_count(wl, t: Lora) -> tuple[int, int]:
    """PEFT's own (trainable, all) numbers: get_peft_model on an untouched copy with the same exact targets."""
    from peft import LoraConfig, get_peft_model

    paths = t.paths(wl.model, wl.blocks(), wl.linear_roles())
    config = LoraConfig(r=t.rank, lora_alpha=t.alpha, target_modules=paths)
    return get_peft_model(copy.deepcopy(wl.model), config).get_nb_trainable_parameters()


def _per_block_gpt(r: int, d: int = 64) -> int:
    return r * (4 * (d + d) + (d + 4 * d) + (4 * d + d))  # q, k, v, proj; fc; fc_out


@pytest.mark.parametrize(
    ("targets", "expected"),
    [(["blocks"], 12), (["attention"], 8), (["q", "v"], 4), (["mlp"], 4), (["head"], 1), (["attention", "head"], 9)],
)
def test_roles_select_exactly_the_declared_linears_and_trainable_equals_peft(targets, expected):
    wl = _gpt()
    t = Lora(rank=4, targets=targets)
    truth = _peft_count(wl, t)
    patch, _ = _apply(t, wl)
    assert patch.info["adapters"] == expected
    trainable = sum(p.numel() for p in wl.model.parameters() if p.requires_grad)
    assert (trainable, sum(p.numel() for p in wl.model.parameters())) == truth
    assert patch.info["trainable_params"] == patch.info["adapter_params"] == trainable


def test_llama_roles_and_counts():
    wl = _llama()
    roles = wl.linear_roles()
    assert sorted(set(roles.values())) == ["head", "k", "mlp", "o", "q", "v"]
    n_layer = len(wl.blocks())
    assert sum(r == "mlp" for r in roles.values()) == 3 * n_layer
    t = Lora(rank=2, targets=["attention"])
    truth = _peft_count(wl, t)
    patch, _ = _apply(t, wl)
    assert patch.info["adapters"] == 4 * n_layer
    assert patch.info["trainable_params"] == truth[0]


def test_default_targets_are_every_block_linear_and_count_rank_times_in_plus_out():
    wl = _gpt()
    patch, _ = _apply(Lora(rank=8), wl)
    assert patch.info["adapter_params"] == 2 * _per_block_gpt(8) == patch.info["trainable_params"]
    assert type(wl.model.head) is nn.Linear  # the head is only a target when asked for


def test_optimizer_state_is_the_adapters_only_and_the_base_does_not_move():
    from membench.execute import state_bytes

    torch.manual_seed(0)
    wl = _gpt()
    t = Lora(rank=4)
    patch, _ = _apply(t, wl)
    frozen = {n: p.detach().clone() for n, p in wl.model.named_parameters() if not p.requires_grad}
    adapters = [p for p in wl.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(adapters, lr=1e-2)
    batch, losses = wl.batch(0, 4, CPU), []
    for _ in range(6):
        loss = wl.loss(wl.model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(frozen[n], p) for n, p in wl.model.named_parameters() if n in frozen)
    n = patch.info["adapter_params"]
    measured = state_bytes(wl.model, opt, {})["cpu"]
    # AdamW: exp_avg + exp_avg_sq (8 B per adapter element) + one fp32 step per adapter tensor
    assert measured["optimizer"] == 8 * n + 4 * len(adapters) == 8 * 2 * _per_block_gpt(4) + 4 * 24
    assert measured["grads"] == 4 * n
    # the pure states step: the planner's and the record's one prediction
    fresh = _gpt()
    s = model_states(fresh.model, fresh.blocks(), [t], 1)
    assert {k: s["device"][k] for k in ("grads", "optimizer")} == {k: measured[k] for k in ("grads", "optimizer")}
    assert s["device"]["params"] == measured["params"]


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_qlora_is_peft_bitsandbytes_and_replaces_quantized_base_adapters(quant_type):
    from peft.tuners.lora import bnb as peft_bnb

    from membench.execute import state_bytes

    wl = _gpt()
    qb, t = QuantizedBase(quant_type=quant_type), Lora(rank=4)
    ctx = Context(workload=wl, device=CPU, run=None)
    qb_patch = qb.apply(wl.model, ctx)
    ctx.applied[qb.kind] = qb_patch.applied
    patch = t.apply(wl.model, ctx)
    layer = peft_bnb.Linear8bitLt if quant_type == "int8" else peft_bnb.Linear4bit
    assert sum(isinstance(m, layer) for m in wl.model.modules()) == 12
    assert patch.info["replaced_quantized_base_adapters"] == 12  # quantized_base's rank-8 ones, gone
    assert patch.info["trainable_params"] == patch.info["adapter_params"] == 2 * _per_block_gpt(4)
    opt = torch.optim.AdamW([p for p in wl.model.parameters() if p.requires_grad], lr=1e-2)
    wl.loss(wl.model, wl.batch(0, 2, CPU)).backward()
    opt.step()
    measured = state_bytes(wl.model, opt, qb_patch.extra_state())["cpu"]
    fresh = _gpt()
    s = model_states(fresh.model, fresh.blocks(), [qb, t], 1)["device"]
    assert s == measured
    assert s["optimizer"] == 8 * patch.info["adapter_params"] + 4 * 24


def test_quantized_base_alone_keeps_its_adapters_and_trainable_rest():
    """The spelling of the committed studies: quantized_base alone = nf4 base + rank-8 adapters (PEFT) on every
    swapped layer, everything not quantized still trains (freeze_rest=false)."""
    wl = _gpt()
    n_rest = sum(p.numel() for n, p in wl.model.named_parameters() if not n.startswith("blocks.") or ".ln" in n)
    info = QuantizedBase().apply(wl.model, Context(workload=wl, device=CPU, run=None)).info
    assert info["adapter_params"] == 2 * _per_block_gpt(8)
    assert info["trainable_params"] == info["adapter_params"] + n_rest


@pytest.mark.parametrize("workload", ["gpt_tiny", "llama_tiny"])
@pytest.mark.parametrize("techs", ["[lora]", "[quantized_base,lora]"])
def test_real_short_run(workload, techs):
    from tests.helpers import run_inprocess

    rec = run_inprocess(f"workload={workload}", f"technique={techs}", "run.warmup_steps=1", "run.measure_steps=1",
                        "run.train_steps=4")  # fmt: skip
    # run_inprocess raises where the child would record status error/oom; the measured sections are all there
    assert rec["quality"]["metric"] == "eval_loss" and rec["quality"]["value"] == rec["quality"]["value"]  # not NaN
    assert rec["technique_info"]["lora.adapters"] > 0
    states, pred = rec["memory"]["model_states"], rec["memory"]["predicted_by_category"]
    assert {k: pred[k] for k in states} == states  # the record's prediction equals the measured model states


def test_fake_tensor_stand_in_has_the_same_trainable_shapes():
    from membench import simulate

    wl_cfg = GPTConfig(**TINY_GPT)
    t = Lora(rank=4)
    sim, rest = simulate.split([t])
    assert rest == [] and type(sim[0]) is lora.SimLora
    out = simulate.simulate_once(wl_cfg, sim, batch_size=2)
    n = 2 * _per_block_gpt(4)
    assert out["by_category"]["optimizer"] == 8 * n + 4 * 24
    wl = wl_cfg.build(0)
    assert out["by_category"]["params"] == model_states(wl.model, wl.blocks(), [t], 1)["device"]["params"]


def test_bad_knobs_raise_naming_the_key():
    with pytest.raises(ConfigError, match="technique.lora.rank="):
        Lora(rank=0)
    with pytest.raises(ConfigError, match="technique.lora.targets="):
        Lora(targets=["qkv"])
    with pytest.raises(ConfigError, match="lora,weight_quant|weight_quant,lora"):
        compose("technique=[lora,weight_quant]")


def test_hf_llama_roles_and_qlora_on_a_transformers_model():
    """transformers' Llama: q_proj..down_proj give the roles, lm_head the head; PEFT's count on it, and QLoRA
    through the flags transformers itself would set."""
    from peft.tuners.lora import bnb as peft_bnb

    from membench.config import build

    wl = build(compose("workload=hf")["workload"], "workload").build(0)
    roles = wl.linear_roles()
    assert sorted(set(roles.values())) == ["head", "k", "mlp", "o", "q", "v"]
    assert [p for p, r in roles.items() if r == "head"] == ["lm_head"]
    t = Lora(rank=4, targets=["attention", "mlp"])
    truth = _peft_count(wl, t)
    ctx = Context(workload=wl, device=CPU, run=None)
    qb = QuantizedBase()
    ctx.applied[qb.kind] = qb.apply(wl.model, ctx).applied
    info = t.apply(wl.model, ctx).info
    assert (
        info["adapters"] == 7 * len(wl.blocks()) == sum(isinstance(m, peft_bnb.Linear4bit) for m in wl.model.modules())
    )
    assert info["trainable_params"] == truth[0]
    loss = wl.loss(wl.model, wl.batch(0, 2, CPU))
    loss.backward()
    assert all(p.grad is not None for p in wl.model.parameters() if p.requires_grad)


def test_digits_cnn_has_no_linear_in_its_blocks_and_says_so():
    from membench.workloads.digits import DigitsConfig

    wl = DigitsConfig().build(0)
    assert wl.linear_roles() == {}
    assert "no nn.Linear inside the blocks" in Lora().check_model(wl.model, wl.blocks())
    with pytest.raises(ConfigError, match="declares no linear with these roles"):
        _apply(Lora(), wl)


@pytest.mark.gpu
def test_cuda_qlora_bf16_trains_with_peft_bitsandbytes_layers():
    """Not run in this task (no GPU machine): PEFT's Linear4bit over a bf16-compute nf4 base on CUDA trains."""
    from peft.tuners.lora import bnb as peft_bnb

    cuda = torch.device("cuda")
    wl = _gpt()
    wl.model.to(cuda)
    ctx = Context(workload=wl, device=cuda, run=None)
    qb = QuantizedBase(double_quant=True, compute_dtype="bfloat16")
    ctx.applied[qb.kind] = qb.apply(wl.model, ctx).applied
    info = Lora(rank=4).apply(wl.model, ctx).info
    assert sum(isinstance(m, peft_bnb.Linear4bit) for m in wl.model.modules()) == info["adapters"] == 12
    opt = torch.optim.AdamW([p for p in wl.model.parameters() if p.requires_grad], lr=1e-2)
    batch, losses = wl.batch(0, 4, cuda), []
    for _ in range(5):
        loss = wl.loss(wl.model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "techs",
    [["bf16_pure", "lora"], ["quantized_base", "lora", "optimizer_8bit"], ["bf16_pure", "quantized_base", "lora"]],
    ids="+".join,
)
def test_pure_states_equal_a_real_run_in_combinations(techs):
    """bf16_pure: adapters are bf16 (inject_adapter_in_model does not upcast; over a bitsandbytes base, whose uint8
    codes PEFT cannot read a dtype from, we cast them), 2 + 2 + 4 B; 8-bit AdamW keeps fp32 states for the adapters
    (each under its 4096-element minimum); a bitsandbytes base keeps its bias in the layer's dtype (it was fp32:
    2,304 B above the rule on gpt_tiny). The planner's step says the same."""
    from membench.config import build
    from tests.helpers import run_inprocess

    overrides = ("workload=gpt_tiny", f"technique=[{','.join(techs)}]")
    rec = run_inprocess(*overrides, "run.warmup_steps=1", "run.measure_steps=1", "run.train_steps=4")
    cfg = compose(*overrides)
    wl = build(cfg["workload"], "workload").build(0)
    t = [build(node, name) for name, node in cfg["technique"].items()]
    pure, measured = model_states(wl.model, wl.blocks(), t, 1)["device"], rec["memory"]["model_states"]
    assert pure == measured
