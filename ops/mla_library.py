"""The latent-cache (Multi-head Latent Attention) operators of `torch.ops.fp4kv`: schemas, fake
kernels, dispatch (library.py's pattern: check, debug-check the index values, run the backend the
selection table picks).

- `mla_store`: quantize c_kv [T, R] and k_pe [T, P] into a latent cache at slots loc [T]
  (quantize_and_store's slot rules: -1 and other out-of-range slots skipped, the last of duplicate
  slots wins).
- `mla_decode_attention`: q [B, Hq, R + P] (q_nope absorbed into the latent space, then q_pe)
  against the paged latent cache, read directly: out [B, Hq, R] in the latent space and lse
  [B, Hq], which is always written (an engine merges decode with prefix or chunk attention by it).

A prefill that wants BF16 latents gathers them with `fp4kv::gather_dequantize` (the latent cache
is a one-head cache of each format): mla_api.mla_gather_dequantize.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import debug
from .backends import kernels_for
from .mla_checks import check_mla_decode_args, check_mla_store_args
from .paged_latent import PagedLatent


@torch.library.custom_op("fp4kv::mla_store", mutates_args=("latent_data", "latent_scales", "rope_data"))
def mla_store(
    latent_data: Tensor,
    latent_scales: Tensor,
    rope_data: Tensor,
    loc: Tensor,
    c_kv: Tensor,
    k_pe: Tensor,
    recipe: str,
    latent_global_scale: Optional[Tensor] = None,
    rope_global_scale: Optional[Tensor] = None,
) -> None:
    """Quantize c_kv [T, R] (recipe's FP4) and k_pe [T, P] (FP8 E4M3) into cache slots loc [T]."""
    fmt = check_mla_store_args(latent_data, latent_scales, rope_data, loc, c_kv, k_pe, recipe, latent_global_scale,
                               rope_global_scale)
    if debug.enabled(latent_data.device):
        debug.loc_values(loc, latent_data.shape[0])
    if c_kv.shape[0] == 0:
        return
    kernels_for("mla_store", fmt, c_kv.device, c_kv.dtype).mla_store(
        latent_data, latent_scales, rope_data, loc, c_kv, k_pe, fmt, latent_global_scale, rope_global_scale)


@mla_store.register_fake
def _(latent_data, latent_scales, rope_data, loc, c_kv, k_pe, recipe, latent_global_scale=None,
      rope_global_scale=None):
    check_mla_store_args(latent_data, latent_scales, rope_data, loc, c_kv, k_pe, recipe, latent_global_scale,
                         rope_global_scale)


def _mla_decode_checked(out, lse, q, cache: tuple):
    latent, recipe, sm_scale = PagedLatent.from_op_args(*cache)
    return latent, sm_scale, check_mla_decode_args(out, lse, q, latent, recipe, sm_scale)


@torch.library.custom_op("fp4kv::mla_decode_attention", mutates_args=("out", "lse"))
def mla_decode_attention(
    out: Tensor,
    lse: Tensor,
    q: Tensor,
    latent_data: Tensor,
    latent_scales: Tensor,
    rope_data: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    page_size: int,
    recipe: str,
    sm_scale: float,
    latent_global_scale: Optional[Tensor] = None,
    rope_global_scale: Optional[Tensor] = None,
) -> None:
    """out [B, Hq, R], lse [B, Hq] float32 (natural log; -inf for an empty sequence) = attention
    of q [B, Hq, R + P] over keys [c_kv, k_pe] and values c_kv of each sequence's pages."""
    cache, sm_scale, fmt = _mla_decode_checked(out, lse, q, (
        latent_data, latent_scales, rope_data, block_table, seq_lens, page_size, recipe, sm_scale,
        latent_global_scale, rope_global_scale))
    if debug.enabled(q.device):
        debug.paged_kv_values(cache.as_paged_kv())
    if q.numel() == 0:
        return
    kernels_for("mla_decode_attention", fmt, q.device, q.dtype).mla_decode_attention(out, lse, q, cache, fmt,
                                                                                     sm_scale)


@mla_decode_attention.register_fake
def _(out, lse, q, *cache):
    _mla_decode_checked(out, lse, q, cache)
