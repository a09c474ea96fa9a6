"""The Python entry points: check arguments, then call `torch.ops.fp4kv.*`.

The dispatcher parses arguments against the schema before any Python kernel runs, so a Python
float passed as a global scale would surface as a RuntimeError about casting. These wrappers run
the same checks as the kernels first, giving the TypeError/ValueError that names the argument, and
accept an `FP4KVCacheRecipe` where the schema takes a string. They trace under torch.compile like
any Python code (metadata checks only).

One argument order for a layer's cache everywhere in the Python API: (k_data, k_scales, v_data,
v_scales), each data buffer beside its own scales, as FlashInfer pairs a cache with its scale
factors. The registered schemas are not changed to match, since a schema change breaks compiled
graphs, saved expect files and every direct `torch.ops` caller; the wrappers map:

- `fp4kv::quantize_and_store(k_data, v_data, k_scales, v_scales, loc, k, v, recipe,
  k_global_scale, v_global_scale)`: both data buffers, then both scales.
- `fp4kv::decode_attention(out, q, k_data, k_scales, v_data, v_scales, block_table, seq_lens,
  page_size, recipe, sm_scale, k_global_scale, v_global_scale)`, `decode_attention_with_lse(out,
  lse, q, ...)` and `extend_attention(out, q, cu_seqlens_q, ...)`: the cache in the Python order,
  but `out` (and `lse`), which the op writes, first, and `sm_scale` required and before the global
  scales, because a schema takes its required arguments before the defaulted ones. The wrappers
  take q first and `sm_scale`, `out`, `lse` last, all three optional.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks
from .paged_kv import PagedKV


def quantize(x: Tensor, recipe: str, global_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """x [..., D] (bf16/fp16/fp32) -> (data uint8 [..., D/2], scales uint8 [..., D/block])."""
    fmt = checks.check_quantize_args(x, recipe, global_scale)
    return torch.ops.fp4kv.quantize(x, fmt.name, global_scale)


def dequantize(
    data: Tensor,
    scales: Tensor,
    recipe: str,
    global_scale: Optional[Tensor] = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """(data [..., D/2], scales [..., D/block]) -> [..., D] in dtype (bf16/fp16/fp32/float8_e4m3fn)."""
    fmt = checks.check_dequantize_args(data, scales, recipe, global_scale, dtype)
    return torch.ops.fp4kv.dequantize(data, scales, fmt.name, global_scale, dtype)


# Arguments passed in the raw op's order, (k_data, v_data, k_scales, v_scales), put scales where
# data is expected, which the buffer checks reject; their error then says what the order is.
ORDER_NOTE = ("the Python API takes (k_data, k_scales, v_data, v_scales, ...) since 0.2 (the raw "
              "torch.ops.fp4kv.quantize_and_store keeps (k_data, v_data, k_scales, v_scales, ...))")
_BUFFER_NAMES = ("k_data", "v_data", "k_scales", "v_scales")


def quantize_and_store_args(k_data, k_scales, v_data, v_scales, loc, k, v, recipe, k_global_scale=None,
                            v_global_scale=None):
    """quantize_and_store's checks, arguments in the Python API's order; an error about a cache
    buffer also says that the order changed (ORDER_NOTE)."""
    try:
        return checks.check_quantize_and_store_args(k_data, v_data, k_scales, v_scales, loc, k, v, recipe, k_global_scale,
                                              v_global_scale)
    except (TypeError, ValueError) as error:
        if not any(name in str(error) for name in _BUFFER_NAMES):
            raise
        raise type(error)(f"{error}; note: {ORDER_NOTE}") from None


def quantize_and_store(
    k_data: Tensor,
    k_scales: Tensor,
    v_data: Tensor,
    v_scales: Tensor,
    loc: Tensor,
    k: Tensor,
    v: Tensor,
    recipe: str,
    k_global_scale: Optional[Tensor] = None,
    v_global_scale: Optional[Tensor] = None,
) -> None:
    """Quantize k, v [T, H, D] into cache slots loc [T] in place; slots outside the cache are skipped.
    `recipe` names both tensors' formats: "nvfp4", or "nvfp4+k8" for K in FP8 E4M3 (k_data
    [slots, H, D], k_scales [slots, H, 0]; formats.KV_RECIPES)."""
    fmt = quantize_and_store_args(k_data, k_scales, v_data, v_scales, loc, k, v, recipe, k_global_scale,
                                  v_global_scale)
    torch.ops.fp4kv.quantize_and_store(
        k_data, v_data, k_scales, v_scales, loc, k, v, fmt.name, k_global_scale, v_global_scale
    )


def gather_dequantize(
    data: Tensor,
    scales: Tensor,
    loc: Tensor,
    recipe: str,
    global_scale: Optional[Tensor] = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Dequantize cache slots loc [T] -> [T, H, D]; slots outside the cache read as zeros."""
    fmt = checks.check_gather_dequantize_args(data, scales, loc, recipe, global_scale, dtype)
    return torch.ops.fp4kv.gather_dequantize(data, scales, loc, fmt.name, global_scale, dtype)


def attention_defaults(q, sm_scale, out):
    """sm_scale 1/sqrt(D) and a fresh contiguous `out` of q's shape and dtype where not given (the
    kernels write contiguous outputs, whatever q's strides; a q that is no tensor is left to the
    argument checks, which name it)."""
    if isinstance(q, Tensor):
        sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
        out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    return sm_scale, out


def decode_attention(
    q: Tensor,
    k_data: Tensor,
    k_scales: Tensor,
    v_data: Tensor,
    v_scales: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    page_size: int,
    recipe: str,
    k_global_scale: Optional[Tensor] = None,
    v_global_scale: Optional[Tensor] = None,
    sm_scale: Optional[float] = None,
    out: Optional[Tensor] = None,
    lse: Optional[Tensor] = None,
) -> Tensor:
    """Decode attention reading the FP4 cache directly (no dequantized copy of the context); with a
    "+k8" recipe the keys are FP8 E4M3, read directly too.

    q [B, Hq, D] (bf16/fp16, one new token per sequence; Hq a multiple of the cache's KV heads);
    the layer's cache buffers [slots, Hkv, ...]; block_table [B, max_pages] int32 of page indices
    (slot = page * page_size + offset; page_size 1 is a token table); seq_lens [B] int32, each at
    most max_pages * page_size. sm_scale defaults to 1/sqrt(D). Writes into `out` when given
    (CUDA graphs keep its address) and returns it. `lse` [B, Hq] float32, when given, receives the
    natural log-sum-exp of the scaled scores sm_scale * q.k over the positions attended (-inf for
    an empty sequence), flash-attention's convention: two calls over disjoint parts of a context
    merge into one with weights exp(lse_i - logaddexp(lse_1, lse_2)).
    """
    kv = PagedKV(k_data, k_scales, v_data, v_scales, block_table, seq_lens, page_size, k_global_scale, v_global_scale)
    return decode_attention_paged(q, kv, recipe, sm_scale, out, lse)


def decode_attention_paged(q: Tensor, kv: PagedKV, recipe: str, sm_scale: Optional[float] = None,
                           out: Optional[Tensor] = None, lse: Optional[Tensor] = None) -> Tensor:
    """decode_attention with the cache as one PagedKV (what a module holding the buffers passes)."""
    sm_scale, out = attention_defaults(q, sm_scale, out)
    fmt = checks.check_decode_attention_args(out, q, kv, recipe, sm_scale, lse)
    if lse is None:
        torch.ops.fp4kv.decode_attention(out, q, *kv.op_args(fmt.name, sm_scale))
    else:
        torch.ops.fp4kv.decode_attention_with_lse(out, lse, q, *kv.op_args(fmt.name, sm_scale))
    return out


def extend_attention(
    q: Tensor,
    cu_seqlens_q: Tensor,
    k_data: Tensor,
    k_scales: Tensor,
    v_data: Tensor,
    v_scales: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    page_size: int,
    recipe: str,
    k_global_scale: Optional[Tensor] = None,
    v_global_scale: Optional[Tensor] = None,
    sm_scale: Optional[float] = None,
    out: Optional[Tensor] = None,
) -> Tensor:
    """Attention of several new tokens per sequence over the FP4 cache, read directly: chunked
    prefill, prefix-cache hits, speculative-decoding verification.

    The engines' convention (SGLang, vLLM): the new tokens' K/V are stored in the cache first
    (quantize_and_store), then this reads each whole sequence, prefix and new tokens, from the
    cache. One input instead of two, the same bytes that later decode steps read, and a verify
    step of a fixed token count per sequence is one CUDA graph whatever the lengths.

    q [T, Hq, D] (bf16/fp16): the new tokens of all sequences, sequence b's in rows
    cu_seqlens_q[b] to cu_seqlens_q[b + 1] (cu_seqlens_q [B+1] int32, any stride); seq_lens [B]
    int32 counts each sequence's tokens including its new ones; the cache arguments and `recipe`
    are decode_attention's (a "+k8" recipe: FP8 E4M3 keys). Causal: the new token i of n sits at
    position seq_lens[b] - n + i and sees positions 0 to that one. Offsets are device data and are
    not checked (no host sync; TORCH_FP4KV_DEBUG=1 checks them, debug.py); every value has a result
    (eager.extend_rows): rows that no sequence owns (past cu_seqlens_q[B]: padding) and rows that
    see no position get zeros. Writes into `out` when given and returns it.
    """
    kv = PagedKV(k_data, k_scales, v_data, v_scales, block_table, seq_lens, page_size, k_global_scale, v_global_scale)
    return extend_attention_paged(q, cu_seqlens_q, kv, recipe, sm_scale, out)


def extend_attention_paged(q: Tensor, cu_seqlens_q: Tensor, kv: PagedKV, recipe: str,
                           sm_scale: Optional[float] = None, out: Optional[Tensor] = None) -> Tensor:
    """extend_attention with the cache as one PagedKV (what a module holding the buffers passes)."""
    sm_scale, out = attention_defaults(q, sm_scale, out)
    fmt = checks.check_extend_attention_args(out, q, cu_seqlens_q, kv, recipe, sm_scale)
    torch.ops.fp4kv.extend_attention(out, q, cu_seqlens_q, *kv.op_args(fmt.name, sm_scale))
    return out
