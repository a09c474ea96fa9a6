"""extend_attention on the Triton backend: several new tokens per sequence over the paged FP4 cache.

triton_decode's kernel with a query tile instead of one token: a program takes one tile of a
sequence's new tokens, one KV head and one slice of the context. The tile's tokens times the
group's query heads (padded to a power of two) are the M side of the tensor-core products, so
every key and value tile decoded in registers serves all of them (triton_attention_tiles: keys
in FP4, or FP8 E4M3 for "+k8" recipes, q read in key_pair order). Scores are K q^T [BLOCK_N, M]
and the output V^T p [D, M], as in decode; an online softmax runs per column, with the causal mask
applied to every tile (the tiles past a row's position are never loaded).

The grid depends on shapes only (T, B, KV heads, the page table's width), never on offsets or
lengths, so a verify step of a fixed token count is one CUDA graph: program i of axis 0 finds
its sequence and tile from cu_seqlens_q (the rows eager.extend_rows gives), and there are at most
cdiv(T, tile) + B + 2 tiles (two more segments: the rows before the first sequence and after the
last one, which get zeros). Split-K over the context and the merge are attention_shared's.

Chunks and prefills (a program's rows or more per sequence) go to triton_prefill, or on SM90 to
gluon_prefill where it serves them (hopper_prefill); verification (a few tokens per sequence) to
triton_verify where the Hopper decode kernel can serve it: that route writes every sequence's
first T // B rows, and this kernel skips them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import triton_prefill, triton_verify
from .attention_shared import (MMA_MIN_SIDE, global_scales, interpreter_fp32, merge_splits, positions_per_split,
                               sm_count, split_count, split_kernel_arguments, split_outputs, split_range)
from .formats import KVRecipe
from .paged_kv import PagedKV
from .triton_attention_tiles import (NAN_GROUPS, diagonal_start, drop_unseen_values, kernel_inputs, query_pairs,
                                     segment_sequence, segment_tile, store_split, tile_scores, value_tile)
from .triton_launch import hopper_gluon


class ExtendLaunch(NamedTuple):
    block_n: int  # context positions per tile
    num_warps: int
    num_stages: int  # software-pipeline stages
    waves: int  # programs per SM to aim for when splitting the context


# (head_dim, largest M: tokens x padded query heads per tile) -> launch shape. The first row of a
# head_dim serves narrow tiles (verification: a few tokens, M 16), the second the rest (chunks).
# D=128: the fastest of sweeps on the H200 (block_n 64/128 x warps 4/8 x stages 2/3 x waves 2/4, and
# M 64/128 for chunks: docs/performance.md); D=64 and 256: untimed starting points taken from the
# decode kernel's.
EXTEND_LAUNCH = {
    (64, 16): ExtendLaunch(block_n=128, num_warps=4, num_stages=3, waves=4),
    (64, 128): ExtendLaunch(block_n=64, num_warps=8, num_stages=3, waves=2),
    (128, 16): ExtendLaunch(block_n=128, num_warps=4, num_stages=3, waves=2),
    (128, 64): ExtendLaunch(block_n=128, num_warps=4, num_stages=2, waves=2),
    (256, 16): ExtendLaunch(block_n=128, num_warps=4, num_stages=3, waves=4),
    (256, 64): ExtendLaunch(block_n=64, num_warps=8, num_stages=2, waves=2),
}


@triton.jit
def _attend_tile(n0, end, query_pos, q_even, q_odd, score_scale, m, l, acc, seen, k_data_ptr, k_scales_ptr,
                 v_data_ptr, v_scales_ptr, block_table_ptr, b, max_pages, num_pages, kv_head, D: tl.constexpr,
                 BS: tl.constexpr, PAGE: tl.constexpr, HKV: tl.constexpr, E4M3_SCALES: tl.constexpr,
                 BLOCK_N: tl.constexpr, FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr, K_FP8: tl.constexpr,
                 dtype: tl.constexpr, DIAGONAL: tl.constexpr):
    """The online softmax's step over positions [n0, n0 + BLOCK_N) (below `end`): (m, l, acc, seen)
    updated. DIAGONAL: some columns do not see every position, so the values go through
    drop_unseen_values first and `seen` counts the NaN values seen; otherwise `seen` is passed
    through untouched."""
    pos = n0 + tl.arange(0, BLOCK_N)
    valid = pos < end
    scores, in_cache, rows = tile_scores(  # [BLOCK_N, M]
        k_data_ptr, k_scales_ptr, block_table_ptr, b, max_pages, num_pages, kv_head, pos, valid, query_pos,
        q_even, q_odd, score_scale, D, BS, PAGE, HKV, E4M3_SCALES, FP32_TILES, HW_FP8, K_FP8, dtype)
    m_new = tl.maximum(m, tl.max(scores, axis=0))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # a column that has seen nothing yet
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(scores - m_safe[None, :])
    l = l * alpha + tl.sum(p, axis=0)
    v = value_tile(v_data_ptr, v_scales_ptr, rows, in_cache, D, BS, E4M3_SCALES, FP32_TILES, HW_FP8)
    if DIAGONAL:
        v, seen_here = drop_unseen_values(v, pos, valid, query_pos, dtype)
        seen += seen_here
    acc = tl.dot(tl.trans(v), p.to(dtype), acc * alpha[None, :])
    return m_new, l, acc, seen


@triton.jit
def _extend_split_kernel(
    q_ptr, k_data_ptr, k_scales_ptr, v_data_ptr, v_scales_ptr, k_g_ptr, v_g_ptr,
    block_table_ptr, seq_lens_ptr, partial_out_ptr, partial_lse_ptr,
    sm_scale, max_pages, num_pages, positions_per_split, cu_ptr, batch, tokens, routed,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, PAGE: tl.constexpr,
    E4M3_SCALES: tl.constexpr, HAS_G: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, SEGMENTS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr, K_FP8: tl.constexpr, dtype: tl.constexpr,
):
    """One (tile of a segment's rows, KV head, split); dtype: the tiles' type (triton_codes.tile_dtype)."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    segment, segment_start, first_row, end_row = segment_tile(cu_ptr, batch, tokens, tile, 1, BLOCK_T,
                                                              tl.arange(0, SEGMENTS_PAD))
    is_sequence, b_safe, diagonal, kv_len = segment_sequence(segment, cu_ptr, seq_lens_ptr, batch, max_pages, PAGE)

    M: tl.constexpr = BLOCK_T * GROUP_PAD
    col = tl.arange(0, M)
    row = first_row + col // GROUP_PAD
    head = kv_head * GROUP + col % GROUP_PAD
    # A sequence's first `routed` rows are triton_verify's (already written): not computed here.
    not_routed = tl.where(is_sequence, row >= segment_start + routed, True)
    col_ok = (row < end_row) & (col % GROUP_PAD < GROUP) & not_routed
    query_pos = tl.where(col_ok & is_sequence, diagonal + row, -1)
    kv_end = tl.minimum(kv_len, tl.max(query_pos, axis=0) + 1)
    start, end = split_range(split, positions_per_split, kv_end)

    q_even, q_odd = query_pairs(q_ptr, (row.to(tl.int64) * HQ + head)[None, :] * D, col_ok, D, dtype)
    score_scale, v_g = global_scales(sm_scale, k_g_ptr, v_g_ptr, HAS_G)

    m = tl.full([M], float("-inf"), tl.float32)
    l = tl.zeros([M], tl.float32)
    acc = tl.zeros([D, M], tl.float32)
    # Tiles below every column's query position are seen whole by all of them; from the first tile
    # that reaches one, some column may not see a position another one does (the diagonal: one or
    # two tiles a program, run unpipelined so the main loop keeps its registers and stages).
    first_diagonal = diagonal_start(start, end, query_pos, col_ok & is_sequence, BLOCK_N)
    for n0 in range(start, first_diagonal, BLOCK_N):
        m, l, acc, _ = _attend_tile(
            n0, end, query_pos, q_even, q_odd, score_scale, m, l, acc, 0.0, k_data_ptr, k_scales_ptr, v_data_ptr,
            v_scales_ptr, block_table_ptr, b_safe, max_pages, num_pages, kv_head, D, BS, PAGE, HKV, E4M3_SCALES,
            BLOCK_N, FP32_TILES, HW_FP8, K_FP8, dtype, False)
    seen = tl.zeros([NAN_GROUPS, M], tl.float32)  # NaN values each column sees (drop_unseen_values)
    for n0 in tl.range(first_diagonal, end, BLOCK_N, num_stages=1):
        m, l, acc, seen = _attend_tile(
            n0, end, query_pos, q_even, q_odd, score_scale, m, l, acc, seen, k_data_ptr, k_scales_ptr, v_data_ptr,
            v_scales_ptr, block_table_ptr, b_safe, max_pages, num_pages, kv_head, D, BS, PAGE, HKV, E4M3_SCALES,
            BLOCK_N, FP32_TILES, HW_FP8, K_FP8, dtype, True)

    # This split's partial output (out itself with one split) and its log-sum-exp in base 2; rows
    # that saw nothing write zeros and -inf, which the merge weighs 0.
    safe_l = tl.where(l > 0, l / v_g, 1.0)
    store_split(partial_out_ptr, partial_lse_ptr, row.to(tl.int64) * HQ + head, split, acc, safe_l, seen, m, l,
                col_ok, NUM_SPLITS)


class ExtendTiles(NamedTuple):
    block_t: int  # new tokens per tile
    group_pad: int  # query heads per KV head, padded to a power of two
    launch: ExtendLaunch


def extend_tiles(tokens: int, batch: int, hq: int, hkv: int, d: int) -> ExtendTiles:
    """Tokens per tile from static sizes: the average new tokens per sequence (a power of two),
    at least enough for an M side of 16, at most the head_dim's largest M."""
    group_pad = triton.next_power_of_2(hq // hkv)
    widest = max(m for head_dim, m in EXTEND_LAUNCH if head_dim == d)
    average = triton.next_power_of_2(max(1, triton.cdiv(tokens, max(batch, 1))))
    block_t = max(MMA_MIN_SIDE // group_pad, min(average, widest // group_pad), 1)
    m = block_t * group_pad
    launch = EXTEND_LAUNCH[min((key for key in EXTEND_LAUNCH if key[0] == d and key[1] >= m), default=(d, widest))]
    return ExtendTiles(block_t, group_pad, launch)


def extend_num_splits(busy_programs: int, max_len: int, device: torch.device, waves: int) -> int:
    """attention_shared.split_count for the programs with work."""
    return split_count(busy_programs, max_len, sm_count(device), waves)


def hopper_prefill(q: torch.Tensor, kv: PagedKV, fmt: KVRecipe):
    """gluon_prefill if it serves this prefill (an SM90 GPU; gluon_prefill.supported), else None.
    From shapes, the device and the caches' alignment only: one CUDA graph keeps one kernel."""
    kernel = hopper_gluon(q.device, "gluon_prefill")
    return kernel if kernel is not None and kernel.supported(q, kv, fmt) else None


def extend_attention(out, q, cu_seqlens_q, kv: PagedKV, fmt: KVRecipe, sm_scale: float) -> None:
    tokens, hq, d = q.shape
    batch, hkv = kv.block_table.shape[0], kv.kv_heads
    block_t, group_pad, launch = extend_tiles(tokens, batch, hq, hkv, d)
    prefill = triton_prefill.prefill_launch(tokens, batch, hq, hkv, d)
    with interpreter_fp32(out, q) as (out, q):
        if prefill is not None:
            hopper = hopper_prefill(q, kv, fmt)
            if hopper is not None:
                hopper.extend_attention(out, q, cu_seqlens_q, kv, fmt, sm_scale)
            else:
                triton_prefill.extend_attention(out, q, cu_seqlens_q, kv, fmt, sm_scale, prefill)
            return
        routed = triton_verify.routed_tokens(q, kv, fmt)
        if routed:  # every row, unless a sequence has more than `routed`: one split for those few
            triton_verify.extend_attention(out, q, cu_seqlens_q, kv, fmt, sm_scale, routed)
            splits = 1
        else:
            busy_tiles = batch * triton.cdiv(triton.cdiv(tokens, max(batch, 1)), block_t)
            splits = extend_num_splits(busy_tiles * hkv, kv.max_len, q.device, launch.waves)
        kernel_kv, tiles = kernel_inputs(kv, fmt, q.device)
        partial_out, partial_lse = split_outputs(out, splits)
        args, constants = split_kernel_arguments(q, kernel_kv, partial_out, partial_lse, fmt.v, sm_scale,
                                                 positions_per_split(kv.max_len, splits, launch.block_n))
        segments = batch + 2
        _extend_split_kernel[(triton.cdiv(tokens, block_t) + segments, hkv, splits)](
            *args, cu_seqlens_q.contiguous(), batch, tokens, routed, **constants, **tiles, GROUP_PAD=group_pad,
            BLOCK_T=block_t, SEGMENTS_PAD=triton.next_power_of_2(segments), BLOCK_N=launch.block_n,
            NUM_SPLITS=splits, num_warps=launch.num_warps, num_stages=launch.num_stages,
        )
        merge_splits(partial_out, partial_lse, out, splits)
