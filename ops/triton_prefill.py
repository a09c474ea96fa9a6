"""extend_attention for chunks and prefills on the Triton backend: many new tokens per sequence.

The flash-attention layout: a program takes BLOCK_M query rows of one KV head (a sequence's new
tokens times the group's query heads, token-major: row r is token r // GROUP, head r % GROUP, so
no head is padded) and streams the sequence's keys and values in tiles of BLOCK_N positions. Each
tile is decoded once into the tiles' type (triton_attention_tiles.key_rows, value_tile) and
reaches the tensor cores through shared memory as the B operand of S = q K^T [BLOCK_M, BLOCK_N]
and out += P V, so one decode serves BLOCK_M rows (triton_extend's decode-shaped kernel, which
keeps keys in registers, serves at most 64). Tiles every row sees whole run without masks; the
diagonal tiles after them run unpipelined with the causal mask and drop_unseen_values' NaN rule.

Programs run the tiles of a segment last-first: in a causal chunk the last rows see the most
positions, and starting them first shortens the tail of the launch. Split-K over the context
(attention_shared) serves the launches with fewer programs than the GPU holds.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .attention_shared import (global_scales, merge_splits, paged_rows, positions_per_split, sm_count, split_count,
                               split_kernel_arguments, split_outputs, split_range)
from .formats import KVRecipe
from .paged_kv import PagedKV
from .triton_attention_tiles import (NAN_GROUPS, diagonal_start, drop_unseen_values, kernel_inputs, key_rows,
                                     segment_sequence, segment_tile, store_split, value_tile)


class PrefillLaunch(NamedTuple):
    block_m: int  # query rows per program (tokens x query heads)
    # Context positions per tile, at least 32: on an H100 (Triton 3.6) tiles of 16 under programs of
    # fewer than 64 rows (the mma.sync path) gave wrong outputs, 32 and more matched eager (cause not
    # established; docs/performance.md).
    block_n: int
    num_warps: int
    num_stages: int  # software-pipeline stages of the tile loads
    waves: int  # programs per SM to aim for when splitting the context


# head_dim -> launch shape. D=128: the fastest of a sweep on the H100 (docs/performance.md); 64 and
# 256: untimed starting points.
PREFILL_LAUNCH = {
    64: PrefillLaunch(block_m=128, block_n=128, num_warps=8, num_stages=3, waves=1),
    128: PrefillLaunch(block_m=128, block_n=128, num_warps=8, num_stages=3, waves=1),
    256: PrefillLaunch(block_m=64, block_n=64, num_warps=8, num_stages=2, waves=1),
}


def prefill_launch(tokens: int, batch: int, hq: int, hkv: int, d: int) -> PrefillLaunch | None:
    """The launch when this kernel serves q [tokens, hq, d] over `batch` sequences: when the
    average sequence brings at least a program's rows per KV head (a chunk or a prefill), else
    None (triton_extend's kernel). From static sizes only, so a CUDA graph keeps one path."""
    launch = PREFILL_LAUNCH.get(d)
    if launch is None or tokens * (hq // hkv) < max(batch, 1) * launch.block_m:
        return None
    return launch


@triton.jit
def _prefill_tile(n0, end, query_pos, q, score_scale, m, l, acc, seen, k_data_ptr, k_scales_ptr, v_data_ptr,
                  v_scales_ptr, block_table_ptr, b, max_pages, num_pages, kv_head, D: tl.constexpr, BS: tl.constexpr,
                  PAGE: tl.constexpr, HKV: tl.constexpr, E4M3_SCALES: tl.constexpr, BLOCK_N: tl.constexpr,
                  FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr, K_FP8: tl.constexpr, dtype: tl.constexpr,
                  DIAGONAL: tl.constexpr):
    """The online softmax's step over positions [n0, n0 + BLOCK_N): (m, l, acc, seen) updated.
    Off the diagonal every position is below `end` and seen by every row: no mask. DIAGONAL: the
    causal mask, and values through drop_unseen_values (`seen` counts the NaN each row sees)."""
    pos = n0 + tl.arange(0, BLOCK_N)
    valid = pos < end
    in_cache, rows = paged_rows(block_table_ptr, b, max_pages, num_pages, pos, valid, PAGE, HKV, kv_head)
    k = key_rows(k_data_ptr, k_scales_ptr, rows, in_cache, D, BS, E4M3_SCALES, FP32_TILES, HW_FP8, K_FP8, dtype)
    scores = tl.dot(q, tl.trans(k)) * score_scale  # [BLOCK_M, BLOCK_N]
    if DIAGONAL:
        scores = tl.where(valid[None, :] & (pos[None, :] <= query_pos[:, None]), scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # a row that has seen nothing yet
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    v = value_tile(v_data_ptr, v_scales_ptr, rows, in_cache, D, BS, E4M3_SCALES, FP32_TILES, HW_FP8)
    if DIAGONAL:
        v, seen_here = drop_unseen_values(v, pos, valid, query_pos, dtype)
        seen += seen_here
    acc = tl.dot(p.to(dtype), v, acc * alpha[:, None])
    return m_new, l, acc, seen


@triton.jit
def _prefill_kernel(
    q_ptr, k_data_ptr, k_scales_ptr, v_data_ptr, v_scales_ptr, k_g_ptr, v_g_ptr,
    block_table_ptr, seq_lens_ptr, partial_out_ptr, partial_lse_ptr,
    sm_scale, max_pages, num_pages, positions_per_split, cu_ptr, batch, tokens,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, PAGE: tl.constexpr,
    E4M3_SCALES: tl.constexpr, HAS_G: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SEGMENTS_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, FP32_TILES: tl.constexpr,
    HW_FP8: tl.constexpr, K_FP8: tl.constexpr, dtype: tl.constexpr,
):
    """One (tile of a segment's rows, KV head, split); dtype: the tiles' type (triton_codes.tile_dtype)."""
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    tile_rows = segment_tile(cu_ptr, batch, tokens, tile, GROUP, BLOCK_M, tl.arange(0, SEGMENTS_PAD))
    segment, first_row, end_row = tile_rows[0], tile_rows[2], tile_rows[3]
    is_sequence, b_safe, diagonal, kv_len = segment_sequence(segment, cu_ptr, seq_lens_ptr, batch, max_pages, PAGE)

    row = first_row + tl.arange(0, BLOCK_M)
    token = row // GROUP
    q_rows = token.to(tl.int64) * HQ + kv_head * GROUP + row % GROUP
    ok = row < end_row
    query_pos = tl.where(ok & is_sequence, diagonal + token, -1)
    kv_end = tl.minimum(kv_len, tl.max(query_pos, axis=0) + 1)
    start, end = split_range(split, positions_per_split, kv_end)

    q = tl.load(q_ptr + q_rows[:, None] * D + tl.arange(0, D)[None, :], mask=ok[:, None], other=0.0).to(dtype)
    score_scale, v_g = global_scales(sm_scale, k_g_ptr, v_g_ptr, HAS_G)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    first_diagonal = diagonal_start(start, end, query_pos, ok & is_sequence, BLOCK_N)
    for n0 in range(start, first_diagonal, BLOCK_N):
        m, l, acc, _ = _prefill_tile(
            n0, end, query_pos, q, score_scale, m, l, acc, 0.0, k_data_ptr, k_scales_ptr, v_data_ptr, v_scales_ptr,
            block_table_ptr, b_safe, max_pages, num_pages, kv_head, D, BS, PAGE, HKV, E4M3_SCALES, BLOCK_N,
            FP32_TILES, HW_FP8, K_FP8, dtype, False)
    seen = tl.zeros([NAN_GROUPS, BLOCK_M], tl.float32)
    for n0 in tl.range(first_diagonal, end, BLOCK_N, num_stages=1):
        m, l, acc, seen = _prefill_tile(
            n0, end, query_pos, q, score_scale, m, l, acc, seen, k_data_ptr, k_scales_ptr, v_data_ptr, v_scales_ptr,
            block_table_ptr, b_safe, max_pages, num_pages, kv_head, D, BS, PAGE, HKV, E4M3_SCALES, BLOCK_N,
            FP32_TILES, HW_FP8, K_FP8, dtype, True)

    safe_l = tl.where(l > 0, l / v_g, 1.0)
    store_split(partial_out_ptr, partial_lse_ptr, q_rows, split, tl.trans(acc), safe_l, seen, m, l, ok, NUM_SPLITS)


def extend_attention(out, q, cu_seqlens_q, kv: PagedKV, fmt: KVRecipe, sm_scale: float,
                     launch: PrefillLaunch) -> None:
    """Every row of extend_attention's result into out (prefill_launch gave `launch`)."""
    tokens, hq, d = q.shape
    batch, hkv = kv.block_table.shape[0], kv.kv_heads
    group = hq // hkv
    busy_programs = triton.cdiv(tokens * group, launch.block_m) * hkv
    splits = split_count(busy_programs, kv.max_len, sm_count(q.device), launch.waves)
    kernel_kv, tiles = kernel_inputs(kv, fmt, q.device)
    partial_out, partial_lse = split_outputs(out, splits)
    args, constants = split_kernel_arguments(q, kernel_kv, partial_out, partial_lse, fmt.v, sm_scale,
                                             positions_per_split(kv.max_len, splits, launch.block_n))
    segments = batch + 2
    _prefill_kernel[(triton.cdiv(tokens * group, launch.block_m) + segments, hkv, splits)](
        *args, cu_seqlens_q.contiguous(), batch, tokens, **constants, **tiles, BLOCK_M=launch.block_m,
        BLOCK_N=launch.block_n, SEGMENTS_PAD=triton.next_power_of_2(segments), NUM_SPLITS=splits,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    merge_splits(partial_out, partial_lse, out, splits)
