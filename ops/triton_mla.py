"""The latent-cache (MLA) ops in Triton: the store, and a split-K paged decode that reads the FP4
latent directly.

Store: the latent is a one-head FP4 cache, stored by the MHA quantize kernel (triton_kernels.store_fp4,
slot rules in the kernel); k_pe is FP8 E4M3, one conversion per element, stored by eager's kernel
as the "+k8" keys are (triton_kernels' docstring).

Decode: one program per (sequence, block of BLOCK_H query heads, split of the context). Each
latent tile is decoded once into registers (triton_attention_tiles.value_tile) and feeds both
products: scores = latent q_nope^T (+ k_pe q_pe^T, FP8 keys) and out^T += latent^T p, kept
transposed [R, heads] as triton_decode keeps its output. attention_shared's rules do the rest:
the page table (paged_rows), the splits and their merge by log-sum-exp, the interpreter's float32
staging. The grid depends on shapes only, so one CUDA graph serves every step. A Hopper kernel
(wgmma, 64 or 128 heads as the M tile) can replace `mla_decode_attention` behind the same op: the
backend table picks the module, this one's signature is the contract.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import eager
from .attention_shared import (context_len, global_scales, interpreter_fp32, launch_splits, merge_splits, mma_side,
                               paged_rows, positions_per_split, sm_count, split_count, split_outputs, split_range)
from .formats import LatentRecipe
from .paged_latent import PagedLatent
from .slots import last_writer_slots
from .triton_attention_tiles import kernel_inputs, key_rows, softmax_step, store_split, value_tile
from .triton_kernels import store_fp4
from .triton_launch import global_scale_pair


class MLALaunch(NamedTuple):
    block_h: int  # query heads per program (at most; mma_side of Hq below it)
    block_n: int  # context positions per tile
    num_warps: int
    waves: int  # programs per SM to aim for when splitting the context


# Not tuned on a GPU yet: sized so a program's registers hold the [R, BLOCK_H] fp32 output and a
# decoded [BLOCK_N, R] latent tile at R = 512 without spilling.
MLA_LAUNCH = MLALaunch(block_h=32, block_n=32, num_warps=8, waves=2)


def mla_store(latent_data, latent_scales, rope_data, loc, c_kv, k_pe, fmt: LatentRecipe, latent_global_scale=None,
              rope_global_scale=None) -> None:
    store_fp4(latent_data, latent_scales, loc, c_kv[:, None], fmt.latent, latent_global_scale)
    eager.store(rope_data, rope_data.new_empty((*rope_data.shape[:2], 0)), last_writer_slots(loc, rope_data.shape[0]),
                k_pe[:, None], fmt.rope, rope_global_scale)


@triton.jit
def _mla_decode_split_kernel(
    q_ptr, latent_data_ptr, latent_scales_ptr, rope_data_ptr, rope_g_ptr, latent_g_ptr,
    block_table_ptr, seq_lens_ptr, partial_out_ptr, partial_lse_ptr,
    sm_scale, max_pages, num_pages, positions_per_split,
    HQ: tl.constexpr, R: tl.constexpr, P: tl.constexpr, BS: tl.constexpr, PAGE: tl.constexpr,
    E4M3_SCALES: tl.constexpr, HAS_G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr, K_FP8: tl.constexpr,
    dtype: tl.constexpr,
):
    """One (sequence, head block, split); rope_data_ptr holds k_pe as int16 words (kernel_inputs)."""
    b = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    seq_len = context_len(tl.load(seq_lens_ptr + b), max_pages, PAGE)
    start, end = split_range(split, positions_per_split, seq_len)

    head_ok = heads < HQ
    q_row = (b * HQ + heads).to(tl.int64)[None, :] * (R + P)
    q_nope = tl.load(q_ptr + q_row + tl.arange(0, R)[:, None], mask=head_ok[None, :], other=0.0).to(dtype)
    q_pe = tl.load(q_ptr + q_row + R + tl.arange(0, P)[:, None], mask=head_ok[None, :], other=0.0).to(dtype)
    # attention_shared.global_scales for each part of the keys: the latent (scores and values), k_pe.
    latent_score_scale, _ = global_scales(sm_scale, latent_g_ptr, rope_g_ptr, HAS_G)
    rope_score_scale, latent_g = global_scales(sm_scale, rope_g_ptr, latent_g_ptr, HAS_G)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_acc = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)  # softmax denominators, per position until the end
    acc = tl.zeros([R, BLOCK_H], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        in_cache, rows = paged_rows(block_table_ptr, b, max_pages, num_pages, pos, valid, PAGE, 1, 0)
        latent = value_tile(latent_data_ptr, latent_scales_ptr, rows, in_cache, R, BS, E4M3_SCALES, FP32_TILES,
                            HW_FP8)  # [BLOCK_N, R]: the keys' first R columns and the values
        rope = key_rows(rope_data_ptr, rope_data_ptr, rows, in_cache, P, BS, E4M3_SCALES, FP32_TILES, HW_FP8, K_FP8,
                        dtype)  # [BLOCK_N, P]
        scores = tl.dot(latent, q_nope) * latent_score_scale + tl.dot(rope, q_pe) * rope_score_scale
        scores = tl.where(valid[:, None], scores, float("-inf"))
        m_new, alpha, p, l_acc = softmax_step(m, l_acc, scores)
        acc = tl.dot(tl.trans(latent), p.to(dtype), acc * alpha[None, :])
        m = m_new

    l = tl.sum(l_acc, axis=0)
    safe_l = tl.where(l > 0, l, 1.0) / latent_g
    store_split(partial_out_ptr, partial_lse_ptr, (b * HQ + heads).to(tl.int64), split, acc, safe_l, None, m, l,
                head_ok, NUM_SPLITS)


def mla_num_splits(batch: int, head_blocks: int, max_len: int, device, waves: int) -> int:
    """attention_shared.split_count for the (sequence, head block) programs of a decode."""
    return split_count(max(1, batch * head_blocks), max_len, sm_count(device), waves)


def mla_decode_attention(out, lse, q, cache: PagedLatent, fmt: LatentRecipe, sm_scale: float) -> None:
    """The Triton kernel: every CUDA GPU from SM80, any head count, page size and recipe."""
    kv, tiles = kernel_inputs(cache.as_paged_kv(), fmt.as_kv_recipe(), q.device)
    batch, hq, _ = q.shape
    rank, rope_dim = out.shape[2], q.shape[2] - out.shape[2]
    block_h = min(MLA_LAUNCH.block_h, mma_side(hq))
    head_blocks = triton.cdiv(hq, block_h)
    splits = mla_num_splits(batch, head_blocks, kv.max_len, q.device, MLA_LAUNCH.waves)
    positions = positions_per_split(kv.max_len, splits, MLA_LAUNCH.block_n)
    splits = launch_splits(splits, lse)
    rope_g, latent_g = global_scale_pair(kv.k_global_scale, kv.v_global_scale, q.device)
    has_g = rope_g is not None
    with interpreter_fp32(out, q) as (out, q):
        partial_out, partial_lse = split_outputs(out, splits)
        _mla_decode_split_kernel[(batch, head_blocks, splits)](
            q.contiguous(), kv.v_data, kv.v_scales.view(torch.uint8), kv.k_data, rope_g if has_g else q,
            latent_g if has_g else q, kv.block_table.contiguous(), kv.seq_lens.contiguous(), partial_out, partial_lse,
            sm_scale, kv.max_pages, kv.num_pages, positions,
            HQ=hq, R=rank, P=rope_dim, BS=fmt.latent.block_size, PAGE=kv.page_size, E4M3_SCALES=fmt.latent.e4m3_scales,
            HAS_G=has_g, BLOCK_H=block_h, BLOCK_N=MLA_LAUNCH.block_n, NUM_SPLITS=splits, **tiles,
            num_warps=MLA_LAUNCH.num_warps,
        )
        merge_splits(partial_out, partial_lse, out, splits, lse)
