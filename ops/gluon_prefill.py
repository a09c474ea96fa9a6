"""extend_attention for chunks and prefills on Hopper (SM90), written in Gluon: FA3's loop over the paged FP4 cache.

The same contract and rules as triton_prefill (which serves every other shape): a program takes
BLOCK_M = 128 query rows of one KV head (token-major: row r is token r // GROUP, head r % GROUP),
one split of the context, and the segment from cu_seqlens_q (triton_attention_tiles'
segment_tile, segment_sequence, diagonal_start; attention_shared's split-K and merge). What
differs is how the work overlaps, each step placed by hand:

- two warpgroups (8 warps) of 64 rows each; q is staged once in shared memory (wgmma's A);
- packed K/V bytes and scales are copied with cp.async (gluon_tiles.stage_rows) about a tile
  step ahead, K one tile before V, their block-table rows looked up a step before the copy;
- every K and V tile is decoded ONCE into 16-bit NVMMA-swizzled shared memory, the B operand of
  S = q K^T and of out += P V (wgmma), so one decode serves the 128 rows;
- the tile loop is software-pipelined as FA3's intra-warpgroup overlap: step j issues S_j and
  the previous tile's P V asynchronously, decodes the next K tile and this tile's V tile while
  they run, then waits for S_j and runs the online softmax (one fma and one exp2 a score);
- every buffer a step touches has two slots, each its own allocation, and the loop runs two steps
  with the slots named statically: one barrier a step (Triton 3.6 inserts none of its own; 3.9
  adds one after each wgmma wait, as in any 8-warp kernel);
- the causal mask and the NaN rule run on the diagonal tiles only.

The NaN rule (eager.masked_attention, drop_unseen_values for the Triton kernels): V blocks whose
scale is NaN are decoded as zeros, and a bit per block records which NaN blocks each row saw
(every row for the tiles before the diagonal, the visible positions on it); the stored output is
NaN in those blocks' columns. A NaN key reaches the scores, as in every kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, warpgroup_mma,
                                                           warpgroup_mma_wait)

from .attention_shared import (global_scales, merge_splits, positions_per_split, sm_count, split_count,
                               split_kernel_arguments, split_lse, split_outputs, split_range)
from .formats import KVRecipe
from .gluon_tiles import barrier, decode_blocks, row_bytes_layout, stage_rows, staged_rows
from .paged_kv import PagedKV
from .triton_attention_tiles import diagonal_start, segment_sequence, segment_tile
from .triton_codes import block_scales, tile_dtype

HEAD_DIMS = (64, 128)
BLOCK_M = 128  # query rows per program: two warpgroups of wgmma's 64
_NUM_WARPS = 8


class GluonPrefillLaunch(NamedTuple):
    block_n: int  # context positions per tile
    waves: int  # programs per SM to aim for when splitting the context


# 64-position tiles: at 128 the scores, P and the accumulator leave the step too few registers (it spills).
PREFILL_LAUNCH = GluonPrefillLaunch(block_n=64, waves=1)


def supported(q: torch.Tensor, kv_heads: int, fmt: KVRecipe) -> bool:
    """Whether this kernel serves the call on a Hopper GPU (the caller checks the GPU): head_dim 64
    or 128, K in the values' FP4 format (FP8 keys run the Triton kernel), and a row's scale bytes
    one cp.async of at least 4 bytes (not MXFP4 at head_dim 64)."""
    d = q.shape[-1]
    return d in HEAD_DIMS and fmt.k is fmt.v and d // fmt.v.block_size >= 4


@gluon.jit
def _bit_or(a, b):
    return a | b


@gluon.jit
def _nan_block_bits(scales_smem, layout: gl.constexpr, E4M3_SCALES: gl.constexpr):
    """A staged tile's scale bytes [N, NB] -> per position, bit k set where block k's scale is NaN
    ([N] in SliceLayout(1, layout))."""
    NB: gl.constexpr = scales_smem.shape[1]
    scale = block_scales(scales_smem.load(layout), E4M3_SCALES, False, True)
    block = gl.arange(0, NB, layout=gl.SliceLayout(0, layout))
    return gl.sum(gl.where(scale != scale, gl.expand_dims(1 << block, 0), 0), axis=1)


@gluon.jit
def _decode_into(tile_smem, data_smem, scales_smem, D: gl.constexpr, BS: gl.constexpr, E4M3_SCALES: gl.constexpr,
                 ZERO_NAN_BLOCKS: gl.constexpr):
    """Decode a staged packed tile into tile_smem [N, D] (element order, the tiles' type), as many
    rows at a time as the CTA's threads hold once (16 packed bytes each): the decoded values are
    the step's largest temporaries, beside S, P and the accumulator."""
    N: gl.constexpr = tile_smem.shape[0]
    ROWS: gl.constexpr = min(N, gl.num_warps() * 32 * 32 // D)
    layout: gl.constexpr = row_bytes_layout(ROWS, D, BS // 2, gl.num_warps())
    for r in gl.static_range(0, N, ROWS):
        even, odd = decode_blocks(data_smem.reshape([N, D // BS, BS // 2]).slice(r, ROWS), scales_smem.slice(r, ROWS),
                                  layout, E4M3_SCALES, ZERO_NAN_BLOCKS)
        tile_smem.slice(r, ROWS).store(gl.reshape(gl.join(gl.reshape(even, [ROWS, D // 2]),
                                                          gl.reshape(odd, [ROWS, D // 2])), [ROWS, D]))


@gluon.jit
def _tile_step(n0, end, first_diagonal, query_pos, score_scale, q_smem,
               k_tile, k_other, v_tile, v_other, kd_tile, ks_tile, kd_other, ks_other, vd_tile, vs_tile, vd_other,
               vs_other, k_bytes_rows, k_scale_rows, v_bytes_rows, v_scale_rows, acc, p, m, l, seen_rows, seen_before,
               b_safe, kv_head, block_table_ptr, max_pages, num_pages, k_data_ptr, k_scales_ptr, v_data_ptr,
               v_scales_ptr,
               s_layout: gl.constexpr, o_layout: gl.constexpr, p_operand: gl.constexpr, bytes_layout: gl.constexpr,
               HKV: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, PAGE: gl.constexpr, E4M3_SCALES: gl.constexpr):
    """Tile j at n0, its buffers named from its side of the two-slot rings (k_tile, v_tile, kd_tile ...
    j's slot; k_other, kd_other ... the other one): on entry K_j is decoded in k_tile, V_(j-1) in
    v_other, packed K_(j+1) in kd_other and V_j in vd_tile have landed, kd_tile and vd_other are
    free, and the rows are K_(j+2)'s and V_(j+1)'s. On return the same holds for tile j + 1 (its
    slots the other way round), with the rows of V_(j+2) and K_(j+3)."""
    BLOCK_M: gl.constexpr = q_smem.shape[0]
    BLOCK_N: gl.constexpr = k_tile.shape[0]
    s = warpgroup_mma(q_smem, k_tile.permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout),
                      use_acc=False, is_async=True)
    acc = warpgroup_mma(p, v_other, acc, is_async=True)  # the previous tile's P V
    # While the tensor cores work: start K_(j+2)'s and V_(j+1)'s copies (rows looked up a step ago, so
    # no block-table load stalls them), look up K_(j+3)'s rows, and decode K_(j+1) and V_j once for
    # all rows.
    stage_rows(k_bytes_rows, k_scale_rows, k_data_ptr, k_scales_ptr, kd_tile, ks_tile, D, BS)
    stage_rows(v_bytes_rows, v_scale_rows, v_data_ptr, v_scales_ptr, vd_other, vs_other, D, BS)
    async_copy.commit_group()
    next_bytes_rows, next_scale_rows = staged_rows(n0 + 3 * BLOCK_N, end, b_safe, kv_head, block_table_ptr,
                                                   max_pages, num_pages, HKV, D, BS, PAGE, BLOCK_N)
    _decode_into(k_other, kd_other, ks_other, D, BS, E4M3_SCALES, False)
    _decode_into(v_tile, vd_tile, vs_tile, D, BS, E4M3_SCALES, True)
    if n0 < first_diagonal:  # every row sees the whole tile, NaN values too
        seen_before |= _nan_block_bits(vs_tile, gl.SliceLayout(2, bytes_layout), E4M3_SCALES)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
    # The scale (> 0, or NaN for an unusable global scale, which then reaches every weight) is
    # applied after the row maximum, so each score costs one fma and one exp2; a diagonal tile
    # scales before masking, so a hidden position's -inf stays -inf (weight 0) under a NaN scale.
    scale = score_scale
    if n0 >= first_diagonal:
        pos = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        visible = (gl.expand_dims(pos, 0) < end) & (gl.expand_dims(pos, 0) <= gl.expand_dims(query_pos, 1))
        s = gl.where(visible, s * score_scale, float("-inf"))
        scale = 1.0
        nan_bits = gl.convert_layout(_nan_block_bits(vs_tile, gl.SliceLayout(2, bytes_layout), E4M3_SCALES),
                                     gl.SliceLayout(0, s_layout))
        seen_rows |= gl.reduce(gl.where(visible, gl.expand_dims(nan_bits, 0), 0), 1, _bit_or)
    m_new = gl.maximum(m, gl.max(s, axis=1) * scale)
    m_safe = gl.where(m_new > float("-inf"), m_new, 0.0)  # a row that has seen nothing yet
    alpha = gl.exp2(m - m_safe)
    weights = gl.exp2(s * scale - gl.expand_dims(m_safe, 1))
    l = l * alpha + gl.sum(weights, axis=1)
    next_p = gl.convert_layout(weights.to(p.dtype), p_operand)
    acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p))
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    fence_async_shared()
    async_copy.wait_group(0)  # K_(j+2) and V_(j+1) have landed
    barrier()  # decoded tiles written, this step's packed buffers read, by every thread
    return acc, next_p, m_new, l, seen_rows, seen_before, k_bytes_rows, k_scale_rows, next_bytes_rows, next_scale_rows


@gluon.jit
def _prefill_kernel(
    q_ptr, k_data_ptr, k_scales_ptr, v_data_ptr, v_scales_ptr, k_g_ptr, v_g_ptr,
    block_table_ptr, seq_lens_ptr, partial_out_ptr, partial_lse_ptr,
    sm_scale, max_pages, num_pages, positions_per_split, cu_ptr, batch, tokens,
    HQ: gl.constexpr, HKV: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, PAGE: gl.constexpr,
    E4M3_SCALES: gl.constexpr, HAS_G: gl.constexpr, GROUP: gl.constexpr, BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr, SEGMENTS_PAD: gl.constexpr, NUM_SPLITS: gl.constexpr, dtype: gl.constexpr,
):
    """One (tile of a segment's rows, KV head, split), tiles last-first as triton_prefill's; dtype:
    the tiles' type (triton_codes.tile_dtype)."""
    WARPS: gl.constexpr = gl.num_warps()
    NB: gl.constexpr = D // BS
    tile = gl.num_programs(0) - 1 - gl.program_id(0)
    kv_head = gl.program_id(1)
    split = gl.program_id(2)
    lanes = gl.arange(0, SEGMENTS_PAD, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))
    tile_rows = segment_tile(cu_ptr, batch, tokens, tile, GROUP, BLOCK_M, lanes)
    segment, first_row, end_row = tile_rows[0], tile_rows[2], tile_rows[3]
    is_sequence, b_safe, diagonal, kv_len = segment_sequence(segment, cu_ptr, seq_lens_ptr, batch, max_pages, PAGE)

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, D, 16])
    p_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    bytes_layout: gl.constexpr = row_bytes_layout(BLOCK_N, D, BS // 2, WARPS)

    row = first_row + gl.arange(0, BLOCK_M, layout=rows_s)
    ok = row < end_row
    query_pos = gl.where(ok & is_sequence, diagonal + row // GROUP, -1)
    kv_end = gl.minimum(kv_len, gl.max(query_pos, axis=0) + 1)
    start, end = split_range(split, positions_per_split, kv_end)
    first_diagonal = diagonal_start(start, end, query_pos, ok & is_sequence, BLOCK_N)

    # Two slots of everything a tile step writes or reads, each its own allocation and named
    # statically (the loop runs two steps per iteration), so the compiler sees that a step's
    # decoded stores and copies never touch what its tensor-core reads and decodes use, and puts no
    # barrier between them: the step's own barrier is the only one, where the next tile's
    # decoded K and V must be complete.
    raw: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    kd0 = gl.allocate_shared_memory(gl.uint8, [BLOCK_N, D // 2], raw)
    kd1 = gl.allocate_shared_memory(gl.uint8, [BLOCK_N, D // 2], raw)
    ks0 = gl.allocate_shared_memory(gl.uint8, [BLOCK_N, NB], raw)
    ks1 = gl.allocate_shared_memory(gl.uint8, [BLOCK_N, NB], raw)
    vd0 = gl.allocate_shared_memory(gl.uint8, [BLOCK_N, D // 2], raw)
    vd1 = gl.allocate_shared_memory(gl.uint8, [BLOCK_N, D // 2], raw)
    vs0 = gl.allocate_shared_memory(gl.uint8, [BLOCK_N, NB], raw)
    vs1 = gl.allocate_shared_memory(gl.uint8, [BLOCK_N, NB], raw)
    # Packed K_0, V_0 and K_1 (K runs a tile ahead: the step for tile j decodes K_(j+1) and V_j).
    bytes_rows, scale_rows = staged_rows(start, end, b_safe, kv_head, block_table_ptr, max_pages, num_pages, HKV, D,
                                         BS, PAGE, BLOCK_N)
    stage_rows(bytes_rows, scale_rows, k_data_ptr, k_scales_ptr, kd0, ks0, D, BS)
    stage_rows(bytes_rows, scale_rows, v_data_ptr, v_scales_ptr, vd0, vs0, D, BS)
    # Tile 1's rows serve K_1 now and V_1 in step 0.
    v_bytes_rows, v_scale_rows = staged_rows(start + BLOCK_N, end, b_safe, kv_head, block_table_ptr, max_pages,
                                             num_pages, HKV, D, BS, PAGE, BLOCK_N)
    stage_rows(v_bytes_rows, v_scale_rows, k_data_ptr, k_scales_ptr, kd1, ks1, D, BS)
    async_copy.commit_group()
    k_bytes_rows, k_scale_rows = staged_rows(start + 2 * BLOCK_N, end, b_safe, kv_head, block_table_ptr, max_pages,
                                             num_pages, HKV, D, BS, PAGE, BLOCK_N)

    # q [BLOCK_M, D] in the tiles' type, staged once: wgmma's A operand of every S tile.
    q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [256 // D, D // 8], [WARPS, 1], [1, 0])
    q_row = first_row + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_layout))
    q_offsets = (q_row // GROUP).to(gl.int64) * HQ + kv_head * GROUP + q_row % GROUP
    dims = gl.arange(0, D, layout=gl.SliceLayout(0, q_layout))
    q = gl.load(q_ptr + gl.expand_dims(q_offsets * D, 1) + gl.expand_dims(dims, 0),
                mask=gl.expand_dims(q_row < end_row, 1), other=0.0)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dtype),
                                       q.to(dtype))
    # Decoded tiles: tile j's K and V - 1's are read by the tensor cores while K_(j+1) and V_j are written.
    tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], dtype)
    k0 = gl.allocate_shared_memory(dtype, [BLOCK_N, D], tile_layout)
    k1 = gl.allocate_shared_memory(dtype, [BLOCK_N, D], tile_layout)
    v0 = gl.allocate_shared_memory(dtype, [BLOCK_N, D], tile_layout)
    v1 = gl.allocate_shared_memory(dtype, [BLOCK_N, D], tile_layout)

    async_copy.wait_group(0)
    barrier()
    _decode_into(k0, kd0, ks0, D, BS, E4M3_SCALES, False)
    # The first step's P V is zeros times this buffer: zeros, not whatever shared memory held.
    v1.store(gl.zeros([BLOCK_N, D], dtype, layout=q_layout))
    fence_async_shared()
    barrier()

    score_scale, v_g = global_scales(sm_scale, k_g_ptr, v_g_ptr, HAS_G)
    m = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows_s)
    l = gl.zeros([BLOCK_M], gl.float32, layout=rows_s)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    p = gl.zeros([BLOCK_M, BLOCK_N], dtype, layout=p_operand)
    seen_rows = gl.zeros([BLOCK_M], gl.int32, layout=rows_s)  # NaN blocks each row saw on the diagonal
    # ... and before it, per position of the tile
    seen_before = gl.zeros([BLOCK_N], gl.int32, layout=gl.SliceLayout(1, gl.SliceLayout(2, bytes_layout)))
    for n0 in range(start, end - BLOCK_N, 2 * BLOCK_N):  # two tiles a trip, the slots named statically
        acc, p, m, l, seen_rows, seen_before, v_bytes_rows, v_scale_rows, k_bytes_rows, k_scale_rows = _tile_step(
            n0, end, first_diagonal, query_pos, score_scale, q_smem, k0, k1, v0, v1, kd0, ks0, kd1, ks1, vd0, vs0,
            vd1, vs1, k_bytes_rows, k_scale_rows, v_bytes_rows, v_scale_rows, acc, p, m, l, seen_rows, seen_before,
            b_safe, kv_head, block_table_ptr, max_pages, num_pages, k_data_ptr, k_scales_ptr, v_data_ptr,
            v_scales_ptr, s_layout, o_layout, p_operand, bytes_layout, HKV, D, BS, PAGE, E4M3_SCALES)
        acc, p, m, l, seen_rows, seen_before, v_bytes_rows, v_scale_rows, k_bytes_rows, k_scale_rows = _tile_step(
            n0 + BLOCK_N, end, first_diagonal, query_pos, score_scale, q_smem, k1, k0, v1, v0, kd1, ks1, kd0, ks0,
            vd1, vs1, vd0, vs0, k_bytes_rows, k_scale_rows, v_bytes_rows, v_scale_rows, acc, p, m, l, seen_rows,
            seen_before, b_safe, kv_head, block_table_ptr, max_pages, num_pages, k_data_ptr, k_scales_ptr,
            v_data_ptr, v_scales_ptr, s_layout, o_layout, p_operand, bytes_layout, HKV, D, BS, PAGE, E4M3_SCALES)
    # An odd tile count leaves one tile, in the first slots; then the last tile's P V (its V in v0
    # after an odd count, in v1 after an even one: zeros when the split is empty).
    tiles = gl.cdiv(gl.maximum(end - start, 0), BLOCK_N)
    if tiles % 2 == 1:
        acc, p, m, l, seen_rows, seen_before, v_bytes_rows, v_scale_rows, k_bytes_rows, k_scale_rows = _tile_step(
            start + (tiles - 1) * BLOCK_N, end, first_diagonal, query_pos, score_scale, q_smem, k0, k1, v0, v1, kd0,
            ks0, kd1, ks1, vd0, vs0, vd1, vs1, k_bytes_rows, k_scale_rows, v_bytes_rows, v_scale_rows, acc, p, m, l,
            seen_rows, seen_before, b_safe, kv_head, block_table_ptr, max_pages, num_pages, k_data_ptr, k_scales_ptr,
            v_data_ptr, v_scales_ptr, s_layout, o_layout, p_operand, bytes_layout, HKV, D, BS, PAGE, E4M3_SCALES)
        acc = warpgroup_mma(p, v0, acc)
    else:
        acc = warpgroup_mma(p, v1, acc)

    # This split's partial output (out itself with one split), NaN in the blocks a row saw a NaN
    # value in, and with NUM_SPLITS > 1 its log-sum-exp in base 2.
    seen = gl.convert_layout(seen_rows | gl.reduce(seen_before, 0, _bit_or), rows_o)
    safe_l = gl.convert_layout(gl.where(l > 0, l / v_g, 1.0), rows_o)
    out = acc / gl.expand_dims(safe_l, 1)
    out_row = first_row + gl.arange(0, BLOCK_M, layout=rows_o)
    out_dims = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    hit = (gl.expand_dims(seen, 1) >> gl.expand_dims(out_dims // BS, 0)) & 1
    out = gl.where(hit != 0, float("nan"), out)
    base = ((out_row // GROUP).to(gl.int64) * HQ + kv_head * GROUP + out_row % GROUP) * NUM_SPLITS + split
    gl.store(partial_out_ptr + gl.expand_dims(base * D, 1) + gl.expand_dims(out_dims, 0),
             out.to(partial_out_ptr.dtype.element_ty), mask=gl.expand_dims(out_row < end_row, 1))
    if NUM_SPLITS > 1:
        lse_base = ((row // GROUP).to(gl.int64) * HQ + kv_head * GROUP + row % GROUP) * NUM_SPLITS + split
        gl.store(partial_lse_ptr + lse_base, split_lse(m, l), mask=ok)


def extend_attention(out, q, cu_seqlens_q, kv: PagedKV, fmt: KVRecipe, sm_scale: float,
                     launch: GluonPrefillLaunch = PREFILL_LAUNCH) -> None:
    """Every row of extend_attention's result into out; call it only where supported(q, kv.kv_heads,
    fmt) on an SM90 GPU (triton_extend does)."""
    tokens, hq, d = q.shape
    batch, hkv = kv.block_table.shape[0], kv.kv_heads
    group = hq // hkv
    busy_programs = triton.cdiv(tokens * group, BLOCK_M) * hkv
    splits = split_count(busy_programs, kv.max_len, sm_count(q.device), launch.waves)
    partial_out, partial_lse = split_outputs(out, splits)
    args, constants = split_kernel_arguments(q, kv, partial_out, partial_lse, fmt.v, sm_scale,
                                             positions_per_split(kv.max_len, splits, launch.block_n))
    segments = batch + 2
    _prefill_kernel[(triton.cdiv(tokens * group, BLOCK_M) + segments, hkv, splits)](
        *args, cu_seqlens_q.contiguous(), batch, tokens, **constants, BLOCK_M=BLOCK_M, BLOCK_N=launch.block_n,
        SEGMENTS_PAD=triton.next_power_of_2(segments), NUM_SPLITS=splits,
        dtype=tile_dtype(False, fmt.v.e4m3_scales), num_warps=_NUM_WARPS,
    )
    merge_splits(partial_out, partial_lse, out, splits)
