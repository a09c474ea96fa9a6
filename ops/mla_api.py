"""The Python entry points of the latent-cache (MLA) ops: check the arguments (errors naming them),
then call `torch.ops.fp4kv.*` (mla_library.py). They trace under torch.compile like any Python code.

One argument order for a latent cache everywhere: (latent_data, latent_scales, rope_data), each
[slots, 1, ...] (mla_checks), then the per-layer global scales (latent's, then rope's).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .api import gather_dequantize
from .formats import get_latent_recipe
from .mla_checks import check_latent_cache, check_mla_decode_args, check_mla_store_args
from .paged_latent import PagedLatent


def mla_store(latent_data: Tensor, latent_scales: Tensor, rope_data: Tensor, loc: Tensor, c_kv: Tensor, k_pe: Tensor,
              recipe: str, latent_global_scale: Optional[Tensor] = None,
              rope_global_scale: Optional[Tensor] = None) -> None:
    """Quantize c_kv [T, R] and k_pe [T, P] into cache slots loc [T] in place: slots outside the
    cache are skipped (-1 padding), the last of duplicate slots wins."""
    fmt = check_mla_store_args(latent_data, latent_scales, rope_data, loc, c_kv, k_pe, recipe, latent_global_scale,
                               rope_global_scale)
    torch.ops.fp4kv.mla_store(latent_data, latent_scales, rope_data, loc, c_kv, k_pe, fmt.name, latent_global_scale,
                              rope_global_scale)


def mla_gather_dequantize(latent_data: Tensor, latent_scales: Tensor, rope_data: Tensor, loc: Tensor, recipe: str,
                          latent_global_scale: Optional[Tensor] = None, rope_global_scale: Optional[Tensor] = None,
                          dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor]:
    """Slots loc [T] -> (c_kv [T, R], k_pe [T, P]) in dtype, for a prefill that wants 16-bit
    latents; slots outside the cache read as zeros. Two fp4kv::gather_dequantize calls: each half
    of the cache is a one-head cache of its format."""
    fmt = get_latent_recipe(recipe)
    check_latent_cache(latent_data, latent_scales, rope_data, fmt)  # one head each, the same slots
    rope_scales = rope_data.new_empty((*rope_data.shape[:2], 0)) if isinstance(rope_data, Tensor) else rope_data
    c_kv = gather_dequantize(latent_data, latent_scales, loc, fmt.latent.name, latent_global_scale, dtype)
    k_pe = gather_dequantize(rope_data, rope_scales, loc, fmt.rope.name, rope_global_scale, dtype)
    return c_kv.squeeze(1), k_pe.squeeze(1)


def mla_decode_attention(q: Tensor, latent_data: Tensor, latent_scales: Tensor, rope_data: Tensor,
                         block_table: Tensor, seq_lens: Tensor, page_size: int, recipe: str,
                         latent_global_scale: Optional[Tensor] = None, rope_global_scale: Optional[Tensor] = None,
                         sm_scale: Optional[float] = None, out: Optional[Tensor] = None,
                         lse: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Decode attention of q [B, Hq, R + P] (bf16/fp16: q_nope absorbed through W_UK into the
    latent space, then q_pe) over the paged latent cache, read directly -> (out [B, Hq, R] in the
    latent space, lse [B, Hq] float32, natural log, -inf for an empty sequence).

    block_table [B, max_pages] and seq_lens [B] int32 as decode_attention's (page ids outside the
    cache read as zeros). sm_scale is required in spirit: DeepSeek-V3 uses 1/sqrt(qk_nope + qk_rope
    head dim) = 1/sqrt(192) (times its YaRN factor), not 1/sqrt(R + P); None gives 1/sqrt(R + P).
    Writes into `out` and `lse` when given (CUDA graphs keep their addresses)."""
    if isinstance(q, Tensor):
        sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
        if out is None and isinstance(latent_data, Tensor):
            rank = q.shape[-1] - (rope_data.shape[-1] if isinstance(rope_data, Tensor) else 0)
            out = q.new_empty((*q.shape[:-1], rank))
        lse = q.new_empty(q.shape[:2], dtype=torch.float32) if lse is None else lse
    cache = PagedLatent(latent_data, latent_scales, rope_data, block_table, seq_lens, page_size, latent_global_scale,
                        rope_global_scale)
    fmt = check_mla_decode_args(out, lse, q, cache, recipe, sm_scale)
    torch.ops.fp4kv.mla_decode_attention(out, lse, q, *cache.op_args(fmt.name, sm_scale))
    return out, lse
