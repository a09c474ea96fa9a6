"""The `torch.ops.fp4kv` operators: schemas, fake kernels, and dispatch to a backend.

Each op is a `torch.library.custom_op`: opaque to torch.compile (one call in the graph, no graph
break), with a fake kernel that gives output metadata during tracing. The real kernel checks the
arguments (and, in debug mode, the index values: debug.py), then runs the backend the selection
table picks (see backends.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks, debug
from .backends import kernels_for
from .formats import FP4Format
from .paged_kv import PagedKV


def _packed_like(x: Tensor, fmt: FP4Format) -> tuple[Tensor, Tensor]:
    d = x.shape[-1]
    data = x.new_empty((*x.shape[:-1], fmt.data_width(d)), dtype=torch.uint8)
    scales = x.new_empty((*x.shape[:-1], fmt.scales_width(d)), dtype=torch.uint8)
    return data, scales


@torch.library.custom_op("fp4kv::quantize", mutates_args=())
def quantize(x: Tensor, recipe: str, global_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """x [..., D] (bf16/fp16/fp32) -> (data uint8 [..., D/2], scales uint8 [..., D/block]); for
    recipe "fp8_e4m3": data [..., D], scales [..., 0]."""
    fmt = checks.check_quantize_args(x, recipe, global_scale)
    if x.numel() == 0:
        return _packed_like(x, fmt)
    return kernels_for("quantize", fmt, x.device, x.dtype).quantize(x, fmt, global_scale)


@quantize.register_fake
def _(x, recipe, global_scale=None):
    return _packed_like(x, checks.check_quantize_args(x, recipe, global_scale))


def _unpacked_like(data: Tensor, fmt: FP4Format, dtype: torch.dtype) -> Tensor:
    return data.new_empty((*data.shape[:-1], fmt.head_dim_of(data.shape[-1])), dtype=dtype)


@torch.library.custom_op("fp4kv::dequantize", mutates_args=())
def dequantize(
    data: Tensor,
    scales: Tensor,
    recipe: str,
    global_scale: Optional[Tensor] = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """(data [..., D/2], scales [..., D/block]) -> [..., D] in dtype (bf16/fp16/fp32/float8_e4m3fn)."""
    fmt = checks.check_dequantize_args(data, scales, recipe, global_scale, dtype)
    if data.numel() == 0:
        return _unpacked_like(data, fmt, dtype)
    return kernels_for("dequantize", fmt, data.device, dtype).dequantize(data, scales, fmt, global_scale, dtype)


@dequantize.register_fake
def _(data, scales, recipe, global_scale=None, dtype=torch.bfloat16):
    return _unpacked_like(data, checks.check_dequantize_args(data, scales, recipe, global_scale, dtype), dtype)


@torch.library.custom_op(
    "fp4kv::quantize_and_store", mutates_args=("k_data", "v_data", "k_scales", "v_scales")
)
def quantize_and_store(
    k_data: Tensor,
    v_data: Tensor,
    k_scales: Tensor,
    v_scales: Tensor,
    loc: Tensor,
    k: Tensor,
    v: Tensor,
    recipe: str,
    k_global_scale: Optional[Tensor] = None,
    v_global_scale: Optional[Tensor] = None,
) -> None:
    """Quantize k, v [T, H, D] and write them at cache slots loc [T] (out-of-range slots skipped).

    `recipe` names K's and V's formats at once (formats.KV_RECIPES: "nvfp4", or "nvfp4+k8" for K
    in FP8 E4M3, k_data [slots, H, D] and k_scales [slots, H, 0]): one string keeps the schema of
    every caller, compiled graph and expect file as it was."""
    fmt = checks.check_quantize_and_store_args(
        k_data, v_data, k_scales, v_scales, loc, k, v, recipe, k_global_scale, v_global_scale
    )
    if debug.enabled(k_data.device):
        debug.loc_values(loc, k_data.shape[0])
    if k.shape[0] == 0:
        return
    kernels_for("quantize_and_store", fmt, k.device, k.dtype).quantize_and_store(
        k_data, v_data, k_scales, v_scales, loc, k, v, fmt, k_global_scale, v_global_scale
    )


@quantize_and_store.register_fake
def _(k_data, v_data, k_scales, v_scales, loc, k, v, recipe, k_global_scale=None, v_global_scale=None):
    checks.check_quantize_and_store_args(k_data, v_data, k_scales, v_scales, loc, k, v, recipe, k_global_scale, v_global_scale)


def _gathered_like(data: Tensor, loc: Tensor, fmt: FP4Format, dtype: torch.dtype) -> Tensor:
    return data.new_empty((loc.shape[0], data.shape[1], fmt.head_dim_of(data.shape[2])), dtype=dtype)


@torch.library.custom_op("fp4kv::gather_dequantize", mutates_args=())
def gather_dequantize(
    data: Tensor,
    scales: Tensor,
    loc: Tensor,
    recipe: str,
    global_scale: Optional[Tensor] = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Dequantize cache slots loc [T] -> [T, H, D]; out-of-range slots read as zeros."""
    fmt = checks.check_gather_dequantize_args(data, scales, loc, recipe, global_scale, dtype)
    if debug.enabled(data.device):
        debug.loc_values(loc, data.shape[0])
    if loc.shape[0] == 0 or data.shape[1] == 0:
        return _gathered_like(data, loc, fmt, dtype)
    return kernels_for("gather_dequantize", fmt, data.device, dtype).gather_dequantize(
        data, scales, loc, fmt, global_scale, dtype
    )


@gather_dequantize.register_fake
def _(data, scales, loc, recipe, global_scale=None, dtype=torch.bfloat16):
    return _gathered_like(data, loc, checks.check_gather_dequantize_args(data, scales, loc, recipe, global_scale, dtype), dtype)


# The paged ops' schemas spell the cache out argument by argument (a schema takes no bundle); their
# kernels pass that tail on as it came and PagedKV.from_op_args reads it, so its order is written
# in paged_kv.py alone. The fake kernels take the tail as *cache.


def _decode_attention_checked(out, lse, q, cache: tuple):
    kv, recipe, sm_scale = PagedKV.from_op_args(*cache)
    return kv, sm_scale, checks.check_decode_attention_args(out, q, kv, recipe, sm_scale, lse)


def _decode_attention(out, lse, q, cache: tuple) -> None:
    kv, sm_scale, fmt = _decode_attention_checked(out, lse, q, cache)
    if debug.enabled(q.device):
        debug.paged_kv_values(kv)
    if q.numel() == 0:
        return
    kernels_for("decode_attention", fmt, q.device, q.dtype).decode_attention(out, q, kv, fmt, sm_scale, lse)


@torch.library.custom_op("fp4kv::decode_attention", mutates_args=("out",))
def decode_attention(
    out: Tensor,
    q: Tensor,
    k_data: Tensor,
    k_scales: Tensor,
    v_data: Tensor,
    v_scales: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    page_size: int,
    recipe: str,
    sm_scale: float,
    k_global_scale: Optional[Tensor] = None,
    v_global_scale: Optional[Tensor] = None,
) -> None:
    """out [B, Hq, D] = attention of q [B, Hq, D] over each sequence's paged FP4 K/V, read directly
    (K in FP8 E4M3 with a "+k8" recipe, as quantize_and_store)."""
    _decode_attention(out, None, q, (k_data, k_scales, v_data, v_scales, block_table, seq_lens, page_size, recipe,
                                     sm_scale, k_global_scale, v_global_scale))


@decode_attention.register_fake
def _(out, q, *cache):
    _decode_attention_checked(out, None, q, cache)


# A separate op rather than an optional `lse` on decode_attention: before torch 2.13 a mutated
# argument left at its default breaks the op's version-counter kernel (it indexes the arguments
# given), so every mutated argument here is required.
@torch.library.custom_op("fp4kv::decode_attention_with_lse", mutates_args=("out", "lse"))
def decode_attention_with_lse(
    out: Tensor,
    lse: Tensor,
    q: Tensor,
    k_data: Tensor,
    k_scales: Tensor,
    v_data: Tensor,
    v_scales: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    page_size: int,
    recipe: str,
    sm_scale: float,
    k_global_scale: Optional[Tensor] = None,
    v_global_scale: Optional[Tensor] = None,
) -> None:
    """decode_attention, and lse [B, Hq] float32 = the natural log-sum-exp of the scaled scores
    (-inf for an empty sequence), so attentions over disjoint parts of a context can be merged."""
    _decode_attention(out, lse, q, (k_data, k_scales, v_data, v_scales, block_table, seq_lens, page_size, recipe,
                                    sm_scale, k_global_scale, v_global_scale))


@decode_attention_with_lse.register_fake
def _(out, lse, q, *cache):
    _decode_attention_checked(out, lse, q, cache)


def _extend_attention_checked(out, q, cu_seqlens_q, cache: tuple):
    kv, recipe, sm_scale = PagedKV.from_op_args(*cache)
    return kv, sm_scale, checks.check_extend_attention_args(out, q, cu_seqlens_q, kv, recipe, sm_scale)


@torch.library.custom_op("fp4kv::extend_attention", mutates_args=("out",))
def extend_attention(
    out: Tensor,
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
    sm_scale: float,
    k_global_scale: Optional[Tensor] = None,
    v_global_scale: Optional[Tensor] = None,
) -> None:
    """out [T, Hq, D] = causal attention of each sequence's new tokens q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]
    over its paged FP4 K/V (the new tokens' K/V stored there first), read directly."""
    kv, sm_scale, fmt = _extend_attention_checked(out, q, cu_seqlens_q, (
        k_data, k_scales, v_data, v_scales, block_table, seq_lens, page_size, recipe, sm_scale, k_global_scale,
        v_global_scale))
    if debug.enabled(q.device):
        debug.paged_kv_values(kv)
        debug.cu_seqlens_q_values(cu_seqlens_q, q.shape[0], seq_lens)
    if q.numel() == 0:
        return
    kernels_for("extend_attention", fmt, q.device, q.dtype).extend_attention(out, q, cu_seqlens_q, kv, fmt, sm_scale)


@extend_attention.register_fake
def _(out, q, cu_seqlens_q, *cache):
    _extend_attention_checked(out, q, cu_seqlens_q, cache)
