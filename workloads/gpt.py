"""GPT-2-style decoder-only byte-level LM in plain PyTorch, on Python standard-library source text.

q/k/v/output projections are separate nn.Linear layers so torch-pruning can trace them and selective
checkpointing sees each matmul. Attention uses F.scaled_dot_product_attention (flash kernel on CPU/CUDA),
so no s^2 score matrix is saved for backward. Quality: held-out loss (nats/byte) and bits per byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from membench.errors import ConfigError
from membench.workloads.base import LossFn, Quality, Workload, linear_cross_entropy, logits_bytes, schema
from membench.workloads.corpus import CorpusTraining, load_corpus


@schema("gpt", depth="n_layer")
@dataclass
class GPTConfig(CorpusTraining):
    preset: str = "gpt_tiny"
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    seq_len: int = 64
    vocab_size: int = 256  # byte-level
    dropout: float = 0.0
    tie_embeddings: bool = False  # true: the head reuses the token embedding (GPT-2 does; d_model x vocab fewer params)
    # Added after records were committed: left out of the cell identity at their default (records.config_hash).
    identity_added: ClassVar[tuple[str, ...]] = ("tie_embeddings",)

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "d_model", "seq_len", "vocab_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"workload.{key}={getattr(self, key)}: must be > 0")
        self.check_corpus()
        if self.d_model % self.n_head:
            raise ConfigError(f"workload.d_model={self.d_model}: must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"workload.dropout={self.dropout}: must be in [0, 1)")

    def build(self, seed: int) -> GPTWorkload:
        return GPTWorkload(self, seed)


class Attention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = c.n_head, c.dropout
        self.q = nn.Linear(c.d_model, c.d_model)
        self.k = nn.Linear(c.d_model, c.d_model)
        self.v = nn.Linear(c.d_model, c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # head count from the weight shape, so heads removed by structured pruning are honoured
        hd = self.q.out_features // self.n_head
        q, k, v = (m(x).view(b, t, self.n_head, hd).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.n_head * hd))


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.d_model)
        self.attn = Attention(c)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.fc = nn.Linear(c.d_model, 4 * c.d_model)
        self.fc_out = nn.Linear(4 * c.d_model, c.d_model)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.fc_out(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Embedding(c.seq_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.head.weight = self.tok.weight
        self.apply(self._init)
        for b in self.blocks:  # GPT-2 scaled init of residual projections
            for m in (b.attn.proj, b.fc_out):
                nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_fn: LossFn = linear_cross_entropy):
        """Logits, or with `targets` the loss `loss_fn(hidden, head, targets)` over the flattened tokens: the loss is
        taken inside forward, so wrappers (DDP, FSDP, DeepSpeed) see the head used where they expect it."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if targets is None:
            return self.head(x)
        return loss_fn(x.reshape(-1, x.shape[-1]), self.head, targets.reshape(-1))


class GPTWorkload(Workload):
    name = "gpt"

    def __init__(self, c: GPTConfig, seed: int):
        self.c, self.preset, self.seed = c, c.preset, seed
        self.corpus = load_corpus(c.data_path, c.max_corpus_bytes, c.eval_fraction)
        if len(self.corpus.eval) <= c.seq_len + 1 or len(self.corpus.train) <= c.seq_len + 1:
            raise ConfigError(f"workload.seq_len={c.seq_len}: longer than the corpus split")
        torch.manual_seed(seed)
        self.model = GPT(c)
        self.tokens_per_sample = c.seq_len

    def _windows(self, data: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + torch.arange(self.c.seq_len + 1)
        w = data[idx].long()
        return w[:, :-1], w[:, 1:]

    def batch(self, step: int, batch_size: int, device: torch.device):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(len(self.corpus.train) - self.c.seq_len - 1, (batch_size,), generator=g)
        x, y = self._windows(self.corpus.train, starts)
        return x.to(device), y.to(device)

    def lm_head(self) -> nn.Module:
        return self.model.head

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        if self.plain_loss():
            logits = model(x)
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        return model(x, targets=y, loss_fn=self.loss_fn)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> Quality:
        was_training = model.training
        model.eval()
        n = len(self.corpus.eval) - self.c.seq_len - 1
        per = 8
        starts = torch.linspace(0, n - 1, self.c.eval_batches * per).long()
        total = 0.0
        for chunk in starts.split(per):
            x, y = self._windows(self.corpus.eval, chunk)
            total += self.loss(model, (x.to(device), y.to(device))).item() * len(chunk)
        model.train(was_training)
        nats = total / len(starts)
        return Quality("eval_loss", nats, False, {"bits_per_byte": nats / math.log(2)})

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.c.lr, weight_decay=self.c.weight_decay)

    def activation_model(
        self, batch_size: int, elem_bytes: int, checkpoint=None, autocast: bool = False, loss_chunk_tokens=None
    ):
        """Bytes saved for backward, following the per-layer terms of Korthikanti et al. 2022
        ("Reducing Activation Recomputation in Large Transformer Models", sec. 4.1), adapted to this model:
        flash attention keeps q, k, v and an fp32 logsumexp instead of the 5as^2b softmax and dropout terms
        (measured with saved_tensors_hooks: the kernel's output is not held apart from the projection input);
        dropout masks (1 byte/element) only when dropout > 0. `loss_chunk_tokens` (not None): a fused
        linear-cross-entropy (techniques/fused_ce.py) saves an fp32 logsumexp per token instead of all the logits
        (and no 16-bit head weight copy). Under autocast the residual stream (LayerNorm
        inputs) stays fp32, each of q/k/v casts the fp32 LayerNorm output to its own 16-bit copy, and the
        16-bit weight copies of non-checkpointed blocks are held until backward. Widths are read from each
        block's modules, so structurally pruned heads and MLP neurons are followed.
        """
        c, b, s, h = self.c, batch_size, self.c.seq_len, self.c.d_model
        sb, e = s * b, elem_bytes
        r = 4 if autocast else e  # residual stream / LayerNorm inputs
        in_copies = 3 if autocast else 1  # LayerNorm output as saved by the q, k, v matmuls
        mask = sb if c.dropout > 0 else 0  # per unit of width, 1 byte
        mode, k = checkpoint if checkpoint else ("none", 1)
        blocks = [m for m in self.model.modules() if isinstance(m, Block)]
        layers = 0.0
        for i, blk in enumerate(blocks):
            hq, heads, f = blk.attn.q.out_features, blk.attn.n_head, blk.fc.out_features
            lse = heads * sb * 4
            if mode == "selective":  # block input + q,k,v, attention out, proj out, fc out, fc_out out
                layers += r * sb * h + (4 * hq + 2 * h + f) * e * sb + lse
            elif mode == "full" or (mode == "every_k" and i % k == 0):
                layers += r * sb * h  # a checkpointed block keeps only its input
            else:  # ln1 in | ln1 out copies, q,k,v, proj in | ln2 in | ln2 out, fc out, gelu out
                layers += 2 * r * sb * h + ((in_copies + 1) * h + 4 * hq + 2 * f) * e * sb + lse
                layers += mask * (2 * h) + (2 * (4 * h * hq + 2 * h * f) if autocast else 0)  # 16-bit weights
        head = r * sb * h + e * sb * h + logits_bytes(sb, c.vocab_size, h, autocast, loss_chunk_tokens is not None)
        return {"layers": layers, "embedding_and_head": head, "total": layers + head}

    def model_flops(self, batch_size: int) -> float:
        """6 N T for the matmul parameters (Kaplan et al. 2020) plus attention, 12 L s^2 h per sequence (Narayanan et al.
        2021)."""
        c = self.c
        n_matmul = c.n_layer * 12 * c.d_model**2 + c.d_model * c.vocab_size
        tokens = batch_size * c.seq_len
        return 6 * n_matmul * tokens + 12 * c.n_layer * c.seq_len * c.d_model * tokens

    def info(self):
        return {
            "corpus_id": self.corpus.corpus_id,
            "corpus_source": self.corpus.source,
            "corpus_files": len(self.corpus.files),
            "train_bytes": len(self.corpus.train),
            "eval_bytes": len(self.corpus.eval),
        }

    def linear_roles(self) -> dict[str, str]:
        """Attention q/k/v and its output projection, the MLP's two linears, the output head."""
        per_block = {"attn.q": "q", "attn.k": "k", "attn.v": "v", "attn.proj": "o", "fc": "mlp", "fc_out": "mlp"}
        roles = {f"blocks.{i}.{p}": r for i in range(len(self.model.blocks)) for p, r in per_block.items()}
        return roles | {"head": "head"}
