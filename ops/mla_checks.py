"""Argument checks of the latent-cache (MLA) ops, built from checks.py's: metadata only (they run
on fake tensors too), every error naming its argument, all before anything is written.

A latent cache is a one-head cache: latent_data [slots, 1, R/2], latent_scales [slots, 1, R/block]
(c_kv, kv_lora_rank R, in the recipe's FP4 format) and rope_data [slots, 1, P] (k_pe, rope_dim P,
FP8 E4M3), all contiguous. The decode kernels tile R and P as powers of two of at least 16 (the
tensor cores' smallest side), R in two halves of whole blocks (so R >= 32 and twice the block),
which DeepSeek-V3's 512 and 64 are.
"""

from __future__ import annotations

import torch

from .checks import (check_activation, check_batch_rows, check_cache, check_cache_data, check_dtype,
                     check_global_scale, check_loc, check_lse, check_page_table, check_rank, check_same_device,
                     check_sm_scale, check_tensor)
from .formats import LatentRecipe, get_latent_recipe
from .paged_latent import PagedLatent

MIN_WIDTH = 16


def _check_width(width: int, name: str, minimum: int = MIN_WIDTH) -> None:
    if width < minimum or width & (width - 1):
        raise ValueError(f"{name}: width {width} is not a power of two >= {minimum}")


def smallest_rank(fmt: LatentRecipe) -> int:
    """The smallest kv_lora_rank the decode kernels take for fmt: the Triton decode splits the
    latent's value columns in two halves of whole blocks, each at least the tensor cores' smallest
    side."""
    return max(2 * MIN_WIDTH, 2 * fmt.latent.block_size)


def check_latent_dims(kv_lora_rank, rope_dim, fmt: LatentRecipe, rank_name: str = "kv_lora_rank",
                      rope_name: str = "rope_dim") -> None:
    """A latent width R and RoPE width P the decode kernels tile: powers of two, R at least
    smallest_rank(fmt), P at least 16."""
    for value, name, minimum in ((kv_lora_rank, rank_name, smallest_rank(fmt)), (rope_dim, rope_name, MIN_WIDTH)):
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):  # SymInt: traced shapes
            raise TypeError(f"{name} must be an int, got {value!r}")
        _check_width(value, name, minimum)


def check_latent_cache(latent_data, latent_scales, rope_data, fmt: LatentRecipe) -> tuple[int, int]:
    """The three buffers of a latent cache, one head each, the same slots, one device ->
    (kv_lora_rank, rope_dim)."""
    check_cache(latent_data, latent_scales, fmt.latent, "latent_data", "latent_scales")
    check_tensor(rope_data, "rope_data")
    check_rank(rope_data, "rope_data", 3, "[slots, 1, P]")
    check_cache_data(rope_data, fmt.rope, "rope_data")
    if not rope_data.is_contiguous():
        raise ValueError("rope_data must be contiguous (cache buffers are written in place)")
    check_same_device(rope_data, "rope_data", latent_data, "latent_data")
    for x, name in ((latent_data, "latent_data"), (rope_data, "rope_data")):
        if x.shape[1] != 1:
            raise ValueError(f"{name} must hold one head ([slots, 1, ...]: the latent is shared by every query "
                             f"head); got shape {tuple(x.shape)}")
    if rope_data.shape[0] != latent_data.shape[0]:
        raise ValueError(f"rope_data has {rope_data.shape[0]} slots but latent_data has {latent_data.shape[0]}")
    rank, rope_dim = fmt.latent.head_dim_of(latent_data.shape[2]), fmt.rope.head_dim_of(rope_data.shape[2])
    check_latent_dims(rank, rope_dim, fmt, "latent_data", "rope_data")
    return rank, rope_dim


def check_latent_tokens(latent_data, latent_scales, rope_data, c_kv, k_pe, fmt: LatentRecipe) -> None:
    """Tokens c_kv [T, R] and k_pe [T, P] (bf16/fp16/fp32, one dtype, any strides) of the widths
    the latent cache holds, on its device."""
    for x, name, x_fmt, layout in ((c_kv, "c_kv", fmt.latent, "[T, R]"), (k_pe, "k_pe", fmt.rope, "[T, P]")):
        check_activation(x, name, x_fmt)
        check_rank(x, name, 2, layout)
    if k_pe.dtype != c_kv.dtype:
        raise TypeError(f"k_pe has dtype {k_pe.dtype} but c_kv has {c_kv.dtype}; pass both in one dtype")
    if k_pe.shape[0] != c_kv.shape[0]:
        raise ValueError(f"k_pe has {k_pe.shape[0]} tokens but c_kv has {c_kv.shape[0]}")
    rank, rope_dim = check_latent_cache(latent_data, latent_scales, rope_data, fmt)
    for x, name, width, data_name in ((c_kv, "c_kv", rank, "latent_data"), (k_pe, "k_pe", rope_dim, "rope_data")):
        if x.shape[1] != width:
            raise ValueError(f"{name} has width {x.shape[1]} but {data_name} holds {width}")
        check_same_device(x, name, latent_data, "latent_data")


def check_mla_store_args(latent_data, latent_scales, rope_data, loc, c_kv, k_pe, recipe, latent_g,
                         rope_g) -> LatentRecipe:
    """c_kv [T, R] and k_pe [T, P] (check_latent_tokens) into the latent cache at slots loc [T]."""
    fmt = get_latent_recipe(recipe)
    check_latent_tokens(latent_data, latent_scales, rope_data, c_kv, k_pe, fmt)
    check_loc(loc, latent_data, "latent_data", num_tokens=c_kv.shape[0])
    check_global_scale(latent_g, "latent_global_scale", fmt.latent, latent_data, "latent_data")
    check_global_scale(rope_g, "rope_global_scale", fmt.rope, latent_data, "latent_data")
    return fmt


def check_mla_decode_args(out, lse, q, cache: PagedLatent, recipe, sm_scale) -> LatentRecipe:
    """q [B, Hq, R + P] (bf16/fp16; the absorbed q_nope, then q_pe) against the latent cache; out
    [B, Hq, R] in q's dtype and lse [B, Hq] float32, contiguous, on q's device."""
    fmt = get_latent_recipe(recipe)
    check_tensor(q, "q")
    check_dtype(q, "q", (torch.bfloat16, torch.float16))
    check_rank(q, "q", 3, "[B, Hq, R + P]")
    rank, rope_dim = check_latent_cache(cache.latent_data, cache.latent_scales, cache.rope_data, fmt)
    check_same_device(cache.latent_data, "latent_data", q, "q")
    if q.shape[2] != rank + rope_dim:
        raise ValueError(f"q has width {q.shape[2]} but the cache holds kv_lora_rank {rank} + rope_dim {rope_dim}")
    check_page_table(cache.block_table, cache.seq_lens, cache.page_size, cache.latent_data, "latent_data", q)
    check_batch_rows(q, cache.block_table, cache.seq_lens)
    check_sm_scale(sm_scale)
    check_global_scale(cache.latent_global_scale, "latent_global_scale", fmt.latent, q, "q")
    check_global_scale(cache.rope_global_scale, "rope_global_scale", fmt.rope, q, "q")
    check_tensor(out, "out")
    expected = (*q.shape[:2], rank)
    if tuple(out.shape) != expected or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {expected} on {q.device} (the latent space); "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    check_lse(lse, q)
    return fmt
