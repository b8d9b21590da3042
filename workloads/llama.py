"""Llama-style decoder-only LM in plain PyTorch: RMSNorm, SwiGLU, rotary embeddings, grouped-query attention,
tied or untied embeddings (Touvron et al. 2023; the Llama 3 geometries of Meta's published configs).

q/k/v/o and gate/up/down are separate bias-free nn.Linear layers (torch-pruning traces them, selective
checkpointing sees each matmul); attention is F.scaled_dot_product_attention. Which SDPA kernel runs decides what
attention saves for backward, so it is a stated knob (`workload.attention_kernel`, see `attention_path`): with a
fused kernel that reads grouped k/v heads (CPU's flash kernel; CUDA flash attention, 16-bit on sm80+) k/v keep
n_kv_head heads and no s^2 score matrix is saved. CUDA has no fused grouped-query kernel for fp32: there
`enable_gqa` silently falls back to torch's math kernel, which saves the s^2 softmax (pytorch/pytorch#154363;
measured on an H200 as a 19-21% larger activation footprint than the fused path), so `auto` repeats k/v to
n_head heads first and the memory-efficient kernel runs instead (what transformers' repeat_kv does). RMSNorm is torch's nn.RMSNorm; RoPE is written here (torch
ships none; 10 lines of rotate-half). Data: the byte corpus of workloads/corpus.py. With vocab_size=256 a
token is a byte; with a larger vocabulary (the GPU presets use Llama 3's 128,256) each byte position becomes
the token hash(previous two bytes, this byte) mod vocab_size, a deterministic map of the bytes onto the whole
vocabulary (no tokenizer is downloaded): the embedding, head and logits then have their real sizes. Quality:
held-out loss in nats per token (and bits per byte with the byte vocabulary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from membench.errors import ConfigError
from membench.workloads.base import LossFn, Quality, Workload, linear_cross_entropy, logits_bytes, schema
from membench.workloads.corpus import CorpusTraining, load_corpus

BYTE_VOCAB = 256
ATTENTION_KERNELS = ("auto", "grouped", "expand", "math")
_HASH = 2_654_435_761  # Knuth's multiplicative hash constant


def tokens(data: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Byte corpus -> token ids: the bytes themselves (vocab 256) or hashed byte trigrams spread over the vocab."""
    if vocab_size == BYTE_VOCAB:
        return data
    b = data.long()
    prev1 = torch.cat([b.new_zeros(1), b[:-1]])
    prev2 = torch.cat([b.new_zeros(2), b[:-2]])
    code = (prev2 << 16) | (prev1 << 8) | b
    return ((code * _HASH) % vocab_size).to(torch.int32)


@schema("llama", depth="n_layer")
@dataclass
class LlamaConfig(CorpusTraining):
    preset: str = "llama_tiny"
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2  # grouped-query attention: k/v heads shared by n_head // n_kv_head query heads
    d_model: int = 64
    ffn_dim: int = 176  # SwiGLU hidden width (gate/up out, down in)
    seq_len: int = 64
    vocab_size: int = 256  # 256: bytes; larger: hashed byte trigrams (see module docstring)
    tie_embeddings: bool = False  # true: the head reuses the embedding matrix (Llama 3.2 1B)
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-5
    # SDPA path for the k/v heads (see attention_path): auto | grouped (enable_gqa, torch picks the kernel) |
    # expand (k/v repeated to n_head heads, then a fused kernel) | math (torch's math kernel, s^2 scores saved)
    attention_kernel: str = "auto"
    # Added after records were committed: left out of the cell identity at their default (records.config_hash).
    identity_added: ClassVar[tuple[str, ...]] = ("attention_kernel",)

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_kv_head", "d_model", "ffn_dim", "seq_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"workload.{key}={getattr(self, key)}: must be > 0")
        self.check_corpus()
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ConfigError(f"workload.d_model={self.d_model}: must be n_head={self.n_head} x an even head size")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"workload.n_kv_head={self.n_kv_head}: must divide n_head={self.n_head}")
        if self.vocab_size < BYTE_VOCAB:
            raise ConfigError(f"workload.vocab_size={self.vocab_size}: must be >= 256 (the corpus is bytes)")
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ConfigError(
                f"workload.attention_kernel={self.attention_kernel}: must be one of {', '.join(ATTENTION_KERNELS)}"
            )

    def build(self, seed: int) -> LlamaWorkload:
        return LlamaWorkload(self, seed)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and a signed sin table: rotate_half(x) * sin == swap_halves(x) * [-sin, sin]."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)
    return torch.cat([ang, ang], dim=-1).cos().float(), torch.cat([-ang.sin(), ang.sin()], dim=-1).float()


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Llama/transformers convention) on (b, heads, t, head_dim). The halves are swapped
    with flip rather than torch.cat, which torch-pruning's dependency graph cannot follow; cos/sin are buffers,
    so nothing of x is saved here."""
    swapped = x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)
    return x * cos + swapped * signed_sin


def _grouped_kernel_on_cuda(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a fused CUDA SDPA kernel reads grouped k/v heads: only flash attention does (torch 2.5-2.13: the
    memory-efficient and cuDNN kernels require equal head counts), and flash needs 16 bits and sm80+."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    if not torch.cuda.is_available():  # fake CUDA tensors (the planner's simulation): assume a current GPU
        return True
    return torch.cuda.get_device_capability(device) >= (8, 0)


def attention_path(kernel: str, grouped: bool, device: torch.device, dtype: torch.dtype) -> str:
    """The attention path a layer takes, as the activation model needs it: "fused" (a fused kernel on the k/v
    heads as they are), "expand" (k/v repeated to the query heads, then a fused kernel), or "math" (torch's
    math kernel: scaled q, repeated k/v and the s^2 softmax saved, no logsumexp). `dtype` is the dtype SDPA sees.
    """
    if kernel == "math":
        return "math"
    if not grouped:
        return "fused"  # equal head counts: every fused kernel takes them (fp32 too, via memory-efficient)
    if kernel == "expand":
        return "expand"
    native = device.type != "cuda" or _grouped_kernel_on_cuda(device, dtype)
    if kernel == "grouped":
        return "fused" if native else "math"  # torch's silent fallback
    return "fused" if native else "expand"  # auto


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head = c.n_head, c.n_kv_head
        hd = c.d_model // c.n_head
        self.q = nn.Linear(c.d_model, c.n_head * hd, bias=False)
        self.k = nn.Linear(c.d_model, c.n_kv_head * hd, bias=False)
        self.v = nn.Linear(c.d_model, c.n_kv_head * hd, bias=False)
        self.o = nn.Linear(c.n_head * hd, c.d_model, bias=False)
        self.gqa, self.widths = c.n_kv_head != c.n_head, (self.q.out_features, self.k.out_features)
        self.kernel = c.attention_kernel

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        hd = self.q.out_features // self.n_head  # from the weight, so structurally pruned heads are honoured
        kv_heads = self.n_kv_head if self.gqa else self.n_head  # without GQA, pruning updates n_head only
        if self.gqa and (self.q.out_features, self.k.out_features) != self.widths:
            raise ConfigError(  # torch-pruning's head pruning knows no query groups: refuse to run a broken model
                f"workload.n_kv_head={self.n_kv_head}: structured pruning changed the attention widths of grouped-"
                f"query attention (n_head={self.n_head}); prune with workload.n_kv_head equal to n_head"
            )
        q = rope(self.q(x).view(b, t, self.n_head, hd).transpose(1, 2), cos, sin)
        k = rope(self.k(x).view(b, t, kv_heads, hd).transpose(1, 2), cos, sin)
        v = self.v(x).view(b, t, kv_heads, hd).transpose(1, 2)
        if self.kernel == "math":
            with sdpa_kernel(SDPBackend.MATH):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)
        else:
            expand = attention_path(self.kernel, self.gqa, q.device, q.dtype) == "expand"
            if expand:  # query head i reads k/v head i // group, as SDPA's enable_gqa does
                k, v = (z.repeat_interleave(self.n_head // kv_heads, dim=1) for z in (k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa and not expand)
        return self.o(y.transpose(1, 2).reshape(b, t, self.n_head * hd))


class Block(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.attn = Attention(c)
        self.norm2 = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.gate = nn.Linear(c.d_model, c.ffn_dim, bias=False)
        self.up = nn.Linear(c.d_model, c.ffn_dim, bias=False)
        self.down = nn.Linear(c.ffn_dim, c.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.head.weight = self.tok.weight
        cos, sin = rope_tables(c.seq_len, c.d_model // c.n_head, c.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        if self.tok.weight.device.type != "meta":
            self.apply(self._init)
            for b in self.blocks:  # scaled init of the residual projections (GPT-2 / Llama practice)
                for m in (b.attn.o, b.down):
                    nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_fn: LossFn = linear_cross_entropy):
        """Logits, or with `targets` the loss `loss_fn(hidden, head, targets)` over the flattened tokens (taken inside
        forward, so wrappers see the head used where they expect it)."""
        t = idx.shape[1]
        x = self.tok(idx)
        # the tables in the residual stream's dtype, as HF Llama's rotary embedding returns them (`.to(x.dtype)`):
        # with 16-bit parameters and fp32 buffers (DeepSpeed's bf16 mode) q and k stay 16-bit like v; fp32 and
        # autocast runs (fp32 stream) are unchanged
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.norm(x)
        if targets is None:
            return self.head(x)
        return loss_fn(x.reshape(-1, x.shape[-1]), self.head, targets.reshape(-1))


class TokenLMWorkload(Workload):
    """Next-token LM on the byte corpus mapped onto `vocab_size` (shared by the llama and hf workloads)."""

    def _load(self, c, vocab_size: int, seq_len: int) -> None:
        self.corpus = load_corpus(c.data_path, c.max_corpus_bytes, c.eval_fraction)
        if min(len(self.corpus.eval), len(self.corpus.train)) <= seq_len + 1:
            raise ConfigError(f"workload.seq_len={seq_len}: longer than the corpus split")
        self.vocab, self.seq = vocab_size, seq_len
        self.train_ids, self.eval_ids = tokens(self.corpus.train, vocab_size), tokens(self.corpus.eval, vocab_size)
        self.tokens_per_sample = seq_len

    def _windows(self, data: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = data[starts[:, None] + torch.arange(self.seq + 1)].long()
        return w[:, :-1], w[:, 1:]

    def batch(self, step: int, batch_size: int, device: torch.device):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(len(self.train_ids) - self.seq - 1, (batch_size,), generator=g)
        x, y = self._windows(self.train_ids, starts)
        return x.to(device), y.to(device)

    def lm_head(self) -> nn.Module:
        return self.model.head

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        if self.plain_loss():
            logits = self.logits(model, x)
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        return self.fused_loss(model, x, y)

    def fused_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, targets=y, loss_fn=self.loss_fn)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> Quality:
        was_training = model.training
        model.eval()
        n = len(self.eval_ids) - self.seq - 1
        per = 8
        starts = torch.linspace(0, n - 1, self.c.eval_batches * per).long()
        total = 0.0
        for chunk in starts.split(per):
            x, y = self._windows(self.eval_ids, chunk)
            total += self.loss(model, (x.to(device), y.to(device))).item() * len(chunk)
        model.train(was_training)
        nats = total / len(starts)
        unit = "bits_per_byte" if self.vocab == BYTE_VOCAB else "bits_per_token"
        return Quality("eval_loss", nats, False, {unit: nats / math.log(2)})

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.c.lr, weight_decay=self.c.weight_decay)

    def info(self):
        return {
            "corpus_id": self.corpus.corpus_id,
            "corpus_source": self.corpus.source,
            "train_bytes": len(self.corpus.train),
            "eval_bytes": len(self.corpus.eval),
            "vocab_size": self.vocab,
            "tokenization": "bytes" if self.vocab == BYTE_VOCAB else "hashed byte trigrams (see workloads/llama.py)",
        }


class LlamaWorkload(TokenLMWorkload):
    name = "llama"

    def __init__(self, c: LlamaConfig, seed: int):
        self.c, self.preset, self.seed = c, c.preset, seed
        self._load(c, c.vocab_size, c.seq_len)
        torch.manual_seed(seed)
        self.model = Llama(c)

    def activation_model(
        self, batch_size: int, elem_bytes: int, checkpoint=None, autocast: bool = False, loss_chunk_tokens=None
    ):
        """Bytes saved for backward, following the per-layer terms of Korthikanti et al. 2022 ("Reducing
        Activation Recomputation in Large Transformer Models", sec. 4.1) as workloads/gpt.py does, adapted:
        GQA gives k and v n_kv_head heads; flash attention keeps q, k, v, its output and an fp32 logsumexp (no
        5as^2b softmax/dropout terms); RoPE multiplies by buffers and saves nothing of its own; SwiGLU keeps
        gate out, silu out, up out and their product (4f instead of the GELU MLP's 2f); no dropout. RMSNorm
        on CPU (torch's composite) keeps fp32 copies of its input and of the normalised x even for 16-bit inputs;
        CUDA's fused kernel keeps only its input; both an fp32 rstd per token. The attention terms follow the
        path `attention_path` picks: fused keeps q, k, v as they are, the output and an fp32 logsumexp per query
        (CUDA's memory-efficient kernel pads it to 32 queries); expand keeps k and v with n_head heads; math keeps
        scaled q, repeated k and v, the s^2 softmax in the activation dtype and no logsumexp (under selective
        checkpointing: the q @ k^T product instead of the softmax). Under autocast the residual stream
        and norm outputs stay fp32, the matmuls each cast their input to 16 bits (q,k,v: 3 copies; gate, up:
        2) and 16-bit weight copies are held until backward. Widths are read from the modules (pruning).
        `loss_chunk_tokens` (not None): a fused linear-cross-entropy saves no logits (workloads/base.py).
        """
        c, b, s, h = self.c, batch_size, self.c.seq_len, self.c.d_model
        sb, e = s * b, elem_bytes
        r = 4 if autocast else e  # residual stream, RMSNorm in/out (fp32 under autocast)
        cuda = next(self.model.parameters()).device.type == "cuda"
        # RMSNorm: CPU composite keeps fp32 ("opmath") copies of its input and of x * rstd, whatever the dtype;
        # CUDA's fused kernel keeps its input as is. Both keep an fp32 rstd per token.
        norm = (r * sb * h if cuda else 8 * sb * h) + 4 * sb
        copies = (3, 2) if autocast else (1, 1)  # the norm1 / norm2 output as each matmul saves it
        mode, k = checkpoint if checkpoint else ("none", 1)
        blocks = [m for m in self.model.modules() if isinstance(m, Block)]
        device = next(self.model.parameters()).device
        sdpa_dtype = torch.bfloat16 if autocast or e == 2 else torch.float32  # fp16 and bf16 take the same path
        # torch's math kernel upcasts 16-bit q/k/v to fp32 unless told otherwise (a process-wide flag)
        m = e if torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed() else 4
        layers = 0.0
        for i, blk in enumerate(blocks):
            a = blk.attn
            hq, hkv, f, heads = a.q.out_features, a.k.out_features, blk.gate.out_features, a.n_head
            path = attention_path(a.kernel, a.gqa, device, sdpa_dtype)
            if path == "math":  # q, k, v (repeated) and the s^2 scores, in the math kernel's precision m
                scores = heads * b * s * s * m
                attn = (3 * hq * m + hq * e) * sb + scores  # + the output as the o projection saves it
                attn_selective = (hq + 2 * hkv) * e * sb + hq * m * sb + scores  # q@k^T and attn@v outputs
            else:
                efficient = cuda and sdpa_dtype == torch.float32  # CUDA's fp32 fused kernel pads its logsumexp
                lse = heads * b * (-(-s // 32) * 32 if efficient else s) * 4
                kv = hkv if path == "fused" else hq  # expand: SDPA saves k and v repeated to n_head heads
                attn = (2 * hq + 2 * kv) * e * sb + lse  # q, k, v as SDPA saves them, its output, logsumexp
                attn_selective = (2 * hq + 2 * hkv) * e * sb + lse  # q, k, v matmul outputs; SDPA output, lse
            if mode == "selective":  # block input + matmul outputs (o, gate, up, down) + the attention above
                layers += r * sb * h + (2 * h + 2 * f) * e * sb + attn_selective
            elif mode == "full" or (mode == "every_k" and i % k == 0):
                layers += r * sb * h  # a checkpointed block keeps only its input
            else:  # 2 norms | norm outs | attention | gate, silu, up, product
                layers += 2 * norm + (r if not autocast else 2) * sb * h * sum(copies) + attn + 4 * f * e * sb
                if autocast:  # 16-bit copies of the block's weights, cast once per step and kept for backward
                    layers += 2 * (h * (2 * hq + 2 * hkv) + 3 * h * f)
        head = (
            norm
            + (2 if autocast else r) * sb * h
            + logits_bytes(sb, c.vocab_size, h, autocast, loss_chunk_tokens is not None)
        )
        return {"layers": layers, "norm_and_head": head, "total": layers + head}

    def model_flops(self, batch_size: int) -> float:
        """6 N T over the matmul parameters plus causal-free attention 12 L s^2 h per sequence (Kaplan et al.)."""
        c = self.c
        hd = c.d_model // c.n_head
        per_layer = c.d_model * hd * (2 * c.n_head + 2 * c.n_kv_head) + 3 * c.d_model * c.ffn_dim
        n_matmul = c.n_layer * per_layer + c.d_model * c.vocab_size
        tokens_ = batch_size * c.seq_len
        return 6 * n_matmul * tokens_ + 12 * c.n_layer * c.seq_len * c.d_model * tokens_

    def linear_roles(self) -> dict[str, str]:
        """Attention q/k/v/o, the SwiGLU MLP's gate/up/down, the output head."""
        per_block = {f"attn.{r}": r for r in "qkvo"} | dict.fromkeys(("gate", "up", "down"), "mlp")
        roles = {f"blocks.{i}.{p}": r for i in range(len(self.model.blocks)) for p, r in per_block.items()}
        return roles | {"head": "head"}
