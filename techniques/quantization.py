"""Shared pieces of the quantization techniques (quantized_base, weight_quant, optimizer_8bit): which linear
layers are swapped, bitsandbytes layer construction, and the bytes a quantized tensor truly stores.

Bytes come from the tensors themselves: packed weights plus the block scales (absmax), nested scales, offsets
and code tables that bitsandbytes keeps as attributes (quant_state, SCB), and the inner tensors of torchao's
tensor subclasses. Next to them, the literature's bits per parameter: NF4/FP4 4 + 32/blocksize, with double
quantization 4 + 8/blocksize + 32/(256 blocksize); LLM.int8 rows 8 + 32/in_features. Per-tensor code tables
(64 B, and 1 KiB with double quantization) are in the measured and layout bytes, not in those formulas.
The study table of docs/quantization.md is rendered by membench.studies.quantization_table.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

FORMATS = ("int8", "nf4", "fp4")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NESTED_BLOCK = 256  # bitsandbytes quantizes the absmax values of double quantization in blocks of 256
# On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight on its first eval-mode, no-grad forward:
# codes re-laid out in tiles of 32 output rows, double quantization undone, absmax stored as bf16.
CPU_PACK_BLOCK_N = 32
# Linear8bitLt on CPU casts fp32 inputs to fp16 for its int8 matmul and warns on every call.
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


def linear_targets(model: nn.Module, blocks: nn.ModuleList, outside_blocks: bool) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every plain nn.Linear inside the declared blocks, and outside them if asked.
    Selection is by module identity and type, never by name; attributes are only used to set the swap."""
    inside = {id(m) for m in blocks.modules()}
    scopes = [m for m in model.modules() if outside_blocks or id(m) in inside]
    return [(p, n) for p in scopes for n, c in p.named_children() if type(c) is nn.Linear]


def _linear_flops(a_shape, n: int, k: int) -> int:
    """2*M*N*K for y[..., N] = x[..., K] @ W[N, K]^T: the same count torch's mm/addmm formulas give a dense
    linear (bias adds are not counted there either)."""
    return 2 * math.prod(a_shape[:-1]) * n * k


def register_bnb_flop_formulas() -> list[str]:
    """FlopCounterMode counts what it sees at the dispatcher; bitsandbytes' matmuls are custom ops
    (torch.ops.bitsandbytes.*) whose kernels run below it, so a 4-bit forward (gemm_4bit, also on CPU) and the
    int8 CUDA matmuls (int8_scaled_mm, int8_mixed_scaled_mm, int8_linear_matmul) count 0 FLOPs. Register their
    formulas from the shapes (the packed weight's logical [N, K] is the op's shapeB argument). Backward's input
    gradient already runs as aten.mm on the dequantized weight and is counted. Returns the ops that carry our
    formula (for the record); idempotent."""
    import bitsandbytes  # noqa: F401  (defines torch.ops.bitsandbytes)
    from torch.utils import flop_counter

    ops = torch.ops.bitsandbytes

    def four_bit(a_shape, b_shape, shape_b, *args, out_shape=None, **kwargs) -> int:
        return _linear_flops(a_shape, shape_b[0], shape_b[1])

    def int8(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:  # A [..., K] int8, B [N, K] int8
        return _linear_flops(a_shape, b_shape[0], b_shape[1])

    def int8_mixed(a_shape, ca_shape, cb_shape, *args, out_shape=None, **kwargs) -> int:
        return _linear_flops(ca_shape, cb_shape[0], cb_shape[1])

    table = {
        ops.gemm_4bit: four_bit,
        ops.gemv_4bit: four_bit,
        ops.int8_scaled_mm: int8,
        ops.int8_linear_matmul: int8,
        ops.int8_mixed_scaled_mm: int8_mixed,
    }
    for op, formula in table.items():
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)
    return [f"bitsandbytes::{op._qualified_op_name.split('::')[-1]}" for op in table]


def to_bnb(lin: nn.Linear, fmt: str, blocksize: int, double_quant: bool, compute_dtype: torch.dtype, device):
    """A frozen bitsandbytes copy of `lin` (Linear8bitLt or Linear4bit); quantization happens on .to(device)."""
    import bitsandbytes as bnb

    register_bnb_flop_formulas()
    bias = lin.bias is not None
    if fmt == "int8":
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False, threshold=0.0)
    else:
        q = bnb.nn.Linear4bit(
            lin.in_features, lin.out_features, bias=bias, compute_dtype=compute_dtype,
            compress_statistics=double_quant, quant_type=fmt,
        )  # fmt: skip
        q.weight.blocksize = blocksize
    q.load_state_dict(lin.state_dict())
    q = q.to(device)
    if fmt != "int8" and (lin.out_features % CPU_PACK_BLOCK_N or lin.in_features % blocksize):
        # bnb's packed CPU inference kernel (eval mode, AVX512-BF16 hosts) asserts out_features % 32 == 0 and reshapes
        # absmax to (out, in // blocksize): llama's down projection (in 176, blocksize 64) failed in evaluate
        q.support_avx512bf16_for_cpu = False
    q.requires_grad_(False)
    return q


def leaves(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """Plain tensors that hold a (possibly subclassed) tensor's bytes: torchao subclasses flatten to them."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for n in names:
            yield from leaves(getattr(t, n))
    else:
        yield t


def _quant_state_tensors(qs) -> Iterator[torch.Tensor]:
    from bitsandbytes.functional import QuantState

    for v in vars(qs).values():
        if torch.is_tensor(v):
            yield v
        elif isinstance(v, QuantState):
            yield from _quant_state_tensors(v)


def side_tensors(layer: nn.Module) -> list[torch.Tensor]:
    """Quantization state a bitsandbytes layer keeps outside its parameters (absmax, code, SCB row scales)."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        return list(_quant_state_tensors(layer.weight.quant_state))
    if isinstance(layer, bnb.nn.Linear8bitLt):  # SCB moves from the weight to layer.state on first forward
        return [t for t in (getattr(layer.weight, "SCB", None), layer.state.SCB) if t is not None]
    return []


def storage_bytes(tensors: Iterable[torch.Tensor], exclude: set[int] = frozenset()) -> int:
    """Bytes of the unique storages behind `tensors` (subclasses flattened), skipping storages in `exclude`."""
    seen, total = set(exclude), 0
    for t in tensors:
        for leaf in leaves(t):
            key = leaf.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += leaf.untyped_storage().nbytes()
    return total


def extra_state_fn(model: nn.Module, layers: list[nn.Module]):
    """Patch.extra_state for bitsandbytes layers: their side tensors that are not parameters or buffers."""

    def extra() -> dict[str, list[torch.Tensor]]:
        owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        out, seen = [], set(owned)
        for t in (t for layer in layers for t in side_tensors(layer)):
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                out.append(t)
        return {"params": out}

    return extra


def formula_bits(fmt: str, blocksize: int, double_quant: bool, in_features: int) -> float:
    """The literature's stored bits per weight (code tables excluded)."""
    if fmt == "int8":
        return 8 + 32 / in_features
    return 4 + (8 / blocksize + 32 / (blocksize * NESTED_BLOCK) if double_quant else 32 / blocksize)


def layout_bytes(out_f: int, in_f: int, fmt: str, blocksize: int, double_quant: bool) -> int:
    """Exact bytes bitsandbytes stores for one weight, from its layout: packed codes, scales, code tables."""
    n = out_f * in_f
    if fmt == "int8":
        return n + 4 * out_f  # int8 codes + fp32 row scale (SCB)
    blocks = math.ceil(n / blocksize)
    scales = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * 256 + 4 if double_quant else 4 * blocks
    return math.ceil(n / 2) + scales + 4 * 16  # 2 codes/byte, scales, 16-entry fp32 code table
