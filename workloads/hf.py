"""Any causal LM of Hugging Face `transformers`, built from a config with random weights (nothing downloaded).

The config is a model type plus attribute overrides (`AutoConfig.for_model`) or a local config.json; the model
is `AutoModelForCausalLM.from_config` in fp32. Its repeated blocks are the nn.ModuleList whose entries are the
classes the model lists in `_no_split_modules` (the unit `accelerate` never splits: LlamaDecoderLayer,
GPT2Block, ...). Data: the byte corpus mapped onto the config's vocab_size as workloads/llama.py does.
Needs the optional extra `membench[hf]`. Limits: no analytic activation model (the record's activation
prediction is empty); a model whose blocks use fused or Conv1D projections (GPT-2) gives bitsandbytes and
torch-pruning no nn.Linear to work on inside its blocks. A replaced `loss_fn` (fused_ce) gets the hidden states the
head reads from the model's base (`base_model`, the transformers convention) while the forward is asked for no
logits (`logits_to_keep` an empty index); models whose forward takes no `logits_to_keep` offer no `lm_head()`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import unittest.mock
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from membench.errors import ConfigError
from membench.workloads.base import schema
from membench.workloads.corpus import CorpusTraining
from membench.workloads.llama import TokenLMWorkload


def _some(names) -> str:
    common = [n for n in COMMON_TYPES if n in names]
    return (
        f"{', '.join(common)} (each runs with the hf preset); the other {len(names) - len(common)} transformers "
        "causal LM types compose, but may need overrides in their own attribute names and are not tested here"
    )


# Llama's name of a size -> what other causal LM configs call it, where transformers' attribute_map does not map it
SYNONYMS = {"intermediate_size": ("n_inner", "ffn_dim")}  # the MLP width: GPT-2, OPT
WITHOUT_GQA = {"num_key_value_heads"}  # types with one K/V per head (GPT-2, OPT, GPT-NeoX) have no such attribute
# the model types the one-line error names first (all of them run with the `hf` preset: tests/runs/test_workloads_hf.py)
COMMON_TYPES = ("gpt2", "llama", "mistral", "qwen2", "gemma", "phi3", "opt", "gpt_neox")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("workload=hf: needs transformers; allowed: pip install 'membench[hf]'") from None
    return transformers


def _for_model(tf, key: str, shown: str, model_type: str, attrs: dict):
    """transformers' config for `model_type`; its own validation errors (values out of range, strict-dataclass
    checks) as one line naming the key."""
    try:
        return tf.AutoConfig.for_model(model_type, **attrs)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError, TypeError or its own validation errors
        first = " ".join(line.strip() for line in str(e).splitlines() if line.strip())[:300]
        raise ConfigError(f"{key}={shown}: the {model_type} config refuses it ({type(e).__name__}: {first})") from None


@schema("hf", depth=None)
@dataclass
class HFConfig(CorpusTraining):
    preset: str = "hf"
    model_type: str = "llama"  # a transformers model type (CONFIG_MAPPING key), used when config_path is null
    config_path: str | None = None  # a local config.json (or a folder holding one) instead of model_type
    overrides: dict[str, Any] = field(default_factory=dict)  # config attributes, e.g. {num_hidden_layers: 2}
    seq_len: int = 64  # activations scale with seq_len * batch_size
    attn_implementation: str = "sdpa"  # sdpa | eager (eager saves the s^2 attention matrix)
    max_corpus_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        if self.seq_len <= 0:
            raise ConfigError(f"workload.seq_len={self.seq_len}: must be > 0")
        self.check_corpus()
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ConfigError(f"workload.attn_implementation={self.attn_implementation!r}: allowed sdpa, eager")
        self.hf_config()  # fail at composition on a bad type, path or override

    def hf_config(self):
        return self.adapted_config()[0]

    def adapted_config(self):
        """(the transformers config, what was adapted to its type: {"renamed": {...}, "ignored": [...]})."""
        tf = _transformers()
        if self.config_path is not None:
            path = Path(self.config_path).expanduser()
            path = path / "config.json" if path.is_dir() else path
            if not path.is_file():
                raise ConfigError(
                    f"workload.config_path={self.config_path}: no such file; allowed: a local config.json or its folder"
                )
            try:
                body = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"workload.config_path={self.config_path}: not JSON ({e.msg})") from None
            model_type, key = body.pop("model_type", None), "workload.config_path"
            shown = f"{self.config_path} (model_type={model_type})"
        else:
            body, model_type, key, shown = {}, self.model_type, "workload.model_type", self.model_type
        causal = tf.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        if model_type not in causal:
            raise ConfigError(f"{key}={shown}: not a transformers causal LM type; allowed: {_some(causal)}")
        cfg = _for_model(tf, key, shown, model_type, body)
        overrides, renamed, ignored = self.translated(cfg, model_type)
        if overrides:  # rebuilt, not set afterwards: __init__ derives attributes (head_dim from hidden_size)
            cfg = _for_model(tf, "workload.overrides", str(overrides), model_type, {**body, **overrides})
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            token = getattr(cfg, key, None)
            if isinstance(token, int) and not 0 <= token < cfg.vocab_size:
                if key in overrides:
                    raise ConfigError(
                        f"workload.overrides.{key}={token}: outside the vocabulary; allowed: 0..{cfg.vocab_size - 1}"
                    )
                # the type's default id (phi3: 32000) cannot index this small vocabulary (an embedding's padding_idx
                # must): no token is special in the byte corpus, so the id is dropped, and the record says so
                try:
                    setattr(cfg, key, None)
                except Exception:  # noqa: BLE001 - a strict config (huggingface_hub's validation) wants an int
                    raise ConfigError(
                        f"workload.overrides.{key}: the {model_type} default {token} is outside vocab_size="
                        f"{cfg.vocab_size}; allowed: +workload.overrides.{key}=ID with ID in 0..{cfg.vocab_size - 1}"
                    ) from None
                ignored.append(f"{key}={token} (outside vocab_size={cfg.vocab_size})")
        limit = getattr(cfg, "max_position_embeddings", None)
        if limit is not None and self.seq_len > limit:
            raise ConfigError(f"workload.seq_len={self.seq_len}: > the config's max_position_embeddings={limit}")
        return cfg, {"renamed": renamed, "ignored": ignored}

    def translated(self, cfg, model_type: str) -> tuple[dict, dict[str, str], list[str]]:
        """The overrides in this type's own attribute names: (overrides, renamed {ours: theirs}, ignored).

        The presets name Llama's attributes; transformers' `attribute_map` already maps most of them onto other
        types (GPT-2's hidden_size is n_embd). Two it does not map: the MLP width (`intermediate_size`), which
        GPT-2 calls n_inner and OPT ffn_dim, and `num_key_value_heads`, which a type without grouped-query
        attention does not have (each head has its own K/V): there it is ignored, and the record lists it."""
        known = set(cfg.to_dict()) | set(getattr(cfg, "attribute_map", {}))
        out, renamed, ignored = {}, {}, []
        for name, value in self.overrides.items():
            if name in known:
                out[name] = value
            elif name in SYNONYMS and any(s in known for s in SYNONYMS[name]):
                renamed[name] = next(s for s in SYNONYMS[name] if s in known)
                out[renamed[name]] = value
            elif name in WITHOUT_GQA:
                ignored.append(f"{name}={value} (no grouped-query attention in {model_type})")
            else:
                raise ConfigError(
                    f"workload.overrides.{name}={value}: not an attribute of the {model_type} config; allowed: "
                    f"{', '.join(k for k in sorted(cfg.to_dict()) if not k.startswith('_'))}"
                )
        return out, renamed, ignored

    def build(self, seed: int) -> HFWorkload:
        return HFWorkload(self, seed)


class HFWorkload(TokenLMWorkload):
    name = "hf"

    def __init__(self, c: HFConfig, seed: int):
        tf = _transformers()
        self.c, self.seed = c, seed
        cfg, self.adapted = c.adapted_config()
        self.preset = c.preset
        self.hf_cfg = cfg
        self._load(c, cfg.vocab_size, c.seq_len)
        torch.manual_seed(seed)
        self.model = tf.AutoModelForCausalLM.from_config(
            cfg, dtype=torch.float32, attn_implementation=c.attn_implementation
        )
        self._blocks = find_blocks(self.model, set(self.model._no_split_modules or ()))
        # kept as built: the model may be wrapped (DDP) later; the hidden-state path rejects replaced heads (fused_ce)
        self._base, self._head = self.model.base_model, self.model.get_output_embeddings()
        self._no_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def blocks(self) -> nn.Module:
        return self._blocks

    def lm_head(self) -> nn.Module | None:
        return self.model.get_output_embeddings() if self._no_logits else None

    def fake_tensor_context(self) -> contextlib.AbstractContextManager:
        """transformers counts a FakeTensor as tracing (`is_tracing`), so on fake tensors it cannot read the
        position ids to rule out packed sequences and builds an explicit causal mask per layer, which also makes its
        SDPA path repeat k and v to every query head; a real step finds no packing and runs SDPA with `is_causal`.
        This workload never packs sequences (every row's position ids are 0..seq_len-1), so the fake step is told
        what the real one reads: no packed sequences."""
        try:
            from transformers import masking_utils
        except ImportError:  # an older transformers without the masking module has no such branch
            return contextlib.nullcontext()
        if not hasattr(masking_utils, "find_packed_sequence_indices"):
            return contextlib.nullcontext()
        return unittest.mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(input_ids=x, use_cache=False).logits

    def fused_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen = []
        hook = self._base.register_forward_hook(lambda m, args, out: seen.append(out[0]))
        try:  # through the (possibly wrapped) model's own forward, which computes no logits here
            model(input_ids=x, use_cache=False, logits_to_keep=torch.zeros(0, dtype=torch.long, device=x.device))
        finally:
            hook.remove()
        hidden = seen[-1]
        return self.loss_fn(hidden.reshape(-1, hidden.shape[-1]), self._head, y.reshape(-1))

    def activation_model(
        self, batch_size: int, elem_bytes: int, checkpoint=None, autocast: bool = False, loss_chunk_tokens=None
    ):
        """No analytic model for arbitrary architectures: the prediction is left empty (None), not guessed."""
        return {"total": None}

    def model_flops(self, batch_size: int) -> float:
        """6 N T over the non-embedding parameters and the output head, plus 12 L s^2 h per sequence."""
        cfg, tokens_ = self.hf_cfg, batch_size * self.c.seq_len
        n = self.model.num_parameters(exclude_embeddings=True) + cfg.hidden_size * cfg.vocab_size
        return 6 * n * tokens_ + 12 * cfg.num_hidden_layers * self.c.seq_len * cfg.hidden_size * tokens_

    def info(self):
        return {
            **super().info(),
            "hf_model_type": self.hf_cfg.model_type,
            # the preset's Llama names -> this type's (intermediate_size -> n_inner), and overrides left out
            # (num_key_value_heads on a type without grouped-query attention, a special token id outside the vocab)
            "hf_overrides_adapted": self.adapted,
            "hf_model_class": type(self.model).__name__,
            "block_class": type(self._blocks[0]).__name__,
            "num_blocks": len(self._blocks),
        }

    def linear_roles(self) -> dict[str, str]:
        """transformers' own names of the Llama-family projections (q_proj .. down_proj) give the roles; any other
        linear inside the blocks is "block"; the output embedding is "head"."""
        names = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "mlp", "up_proj": "mlp",
                 "down_proj": "mlp", "fc1": "mlp", "fc2": "mlp"}  # fmt: skip
        roles = {p: names.get(p.rpartition(".")[2], r) for p, r in super().linear_roles().items()}
        head = self.model.get_output_embeddings()
        return roles | {n: "head" for n, m in self.model.named_modules() if m is head and isinstance(m, nn.Linear)}


def find_blocks(model: nn.Module, class_names: set[str]) -> nn.Module:
    """The nn.ModuleList (or nn.Sequential) whose children are all instances of the named block classes."""
    best = None
    for m in model.modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0:
            if all(type(child).__name__ in class_names for child in m):
                if best is None or len(m) > len(best):
                    best = m
    if best is None:
        raise ConfigError(
            f"workload: {type(model).__name__} has no ModuleList of its _no_split_modules {sorted(class_names)}"
        )
    return best
