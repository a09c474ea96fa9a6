"""extend_attention for chunks and prefills on Hopper (SM90), written in Gluon: FA3's layout over the paged FP4 cache.

The same contract and rules as triton_prefill (which serves every other shape): a program takes
BLOCK_M = 128 query rows of one KV head (token-major: row r is token r // GROUP, head r % GROUP),
one split of the context, and the segment from cu_seqlens_q (triton_attention_tiles'
segment_tile, segment_sequence, diagonal_start; attention_shared's split-K and merge). Its warps
are specialised, as FA3's, so the decode never waits on the tensor cores nor they on it:

- a decode partition (8 warps, few registers) copies each tile's packed K/V bytes and scales with
  cp.async a tile ahead (gluon_tiles.stage_rows), decodes them ONCE into 16-bit NVMMA-swizzled
  shared memory (the B operand of S = q K^T and of out += P V) and signals the tile ready on an
  mbarrier, STAGES decoded tiles in flight;
- the attend partition (two warpgroups of 64 rows, most registers) waits for a tile, issues S_j and
  the previous tile's P V asynchronously, runs the online softmax (one fma and one exp2 a score)
  while P V runs, and hands the previous tile's buffers back on another mbarrier. It is the
  default partition: ptxas overlaps the softmax with P V only there (in a worker partition it
  waits for P V first; docs/performance.md);
- the causal mask and the NaN rule run on the diagonal tiles only.

The NaN rule (eager.masked_attention, drop_unseen_values for the Triton kernels): V blocks whose
scale is NaN are decoded as zeros, and a bit per block records which NaN blocks each row saw: the
decode partition gathers the bits of the tiles before the diagonal (every row sees them) and hands
each diagonal tile's bits per position to the attend partition, which keeps the visible ones per
row; the stored output is NaN in those blocks' columns. A NaN key reaches the scores, as in every
kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, mbarrier,
                                                           warpgroup_mma, warpgroup_mma_wait)

from .attention_shared import (global_scales, merge_splits, positions_per_split, sm_count, split_count,
                               split_kernel_arguments, split_lse, split_outputs, split_range)
from .formats import KVRecipe
from .gluon_tiles import barrier, caches_aligned, decode_blocks, row_bytes_layout, stage_rows, staged_rows
from .paged_kv import PagedKV
from .triton_attention_tiles import diagonal_start, segment_sequence, segment_tile
from .triton_codes import block_scales, tile_dtype

HEAD_DIMS = (64, 128)
BLOCK_M = 128  # query rows per program: two warpgroups of wgmma's 64
_ATTEND_WARPS = 8


class GluonPrefillLaunch(NamedTuple):
    block_n: int  # context positions per tile
    stages: int  # decoded K/V tiles in shared memory: the decode runs up to stages - 1 tiles ahead
    decode_warps: int
    decode_registers: int  # per thread of the decode partition; the attend partition gets the rest
    waves: int  # programs per SM to aim for when splitting the context


# 64-position tiles, three decoded stages (32 KB of q, 96 KB of K/V tiles, 18 KB of packed copies)
# and 8 decode warps: with 4 the decode partition is what the attend warpgroups wait for.
PREFILL_LAUNCH = GluonPrefillLaunch(block_n=64, stages=3, decode_warps=8, decode_registers=80, waves=1)


def supported(q: torch.Tensor, kv: PagedKV, fmt: KVRecipe) -> bool:
    """Whether this kernel serves the call on a Hopper GPU (the caller checks the GPU): head_dim 64
    or 128, K in the values' FP4 format (FP8 keys run the Triton kernel), a row's scale bytes one
    cp.async of at least 4 bytes (not MXFP4 at head_dim 64), and caches whose rows start aligned
    for those copies (packed bytes at 16 bytes, scale rows at their size), as torch allocates them."""
    d = q.shape[-1]
    nb = d // fmt.v.block_size
    return d in HEAD_DIMS and fmt.k is fmt.v and nb >= 4 and caches_aligned(kv, nb)


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
    rows at a time as the partition's threads hold once (16 packed bytes each), so the decode
    partition keeps few registers."""
    N: gl.constexpr = tile_smem.shape[0]
    ROWS: gl.constexpr = min(N, gl.num_warps() * 32 * 32 // D)
    layout: gl.constexpr = row_bytes_layout(ROWS, D, BS // 2, gl.num_warps())
    for r in gl.static_range(0, N, ROWS):
        even, odd = decode_blocks(data_smem.reshape([N, D // BS, BS // 2]).slice(r, ROWS), scales_smem.slice(r, ROWS),
                                  layout, E4M3_SCALES, ZERO_NAN_BLOCKS)
        tile_smem.slice(r, ROWS).store(gl.reshape(gl.join(gl.reshape(even, [ROWS, D // 2]),
                                                          gl.reshape(odd, [ROWS, D // 2])), [ROWS, D]))


@gluon.jit
def _decode_partition(start, end, first_diagonal, b_safe, kv_head, block_table_ptr, max_pages, num_pages,
                      k_data_ptr, k_scales_ptr, v_data_ptr, v_scales_ptr, k_tiles, v_tiles, nan_bits, seen_smem,
                      kd, ks, vd, vs, ready, empty, done,
                      HKV: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, PAGE: gl.constexpr,
                      E4M3_SCALES: gl.constexpr):
    """Every tile of the split: packed bytes copied a tile ahead into the two slots of kd/ks/vd/vs,
    then decoded into stage i % STAGES of k_tiles/v_tiles once the attend partition has handed that
    stage back (empty), and signalled ready. The NaN-block bits of the tiles before the diagonal are
    gathered here (seen_smem, with `done`); a diagonal tile's go to nan_bits with the tile."""
    STAGES: gl.constexpr = k_tiles.shape[0]
    BLOCK_N: gl.constexpr = k_tiles.shape[1]
    bits_layout: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, row_bytes_layout(BLOCK_N, D, BS // 2,
                                                                                      gl.num_warps())))
    seen = gl.zeros([BLOCK_N], gl.int32, layout=bits_layout)
    tiles = gl.cdiv(gl.maximum(end - start, 0), BLOCK_N)
    bytes_rows, scale_rows = staged_rows(start, end, b_safe, kv_head, block_table_ptr, max_pages, num_pages, HKV, D,
                                         BS, PAGE, BLOCK_N)
    stage_rows(bytes_rows, scale_rows, k_data_ptr, k_scales_ptr, kd.index(0), ks.index(0), D, BS)
    stage_rows(bytes_rows, scale_rows, v_data_ptr, v_scales_ptr, vd.index(0), vs.index(0), D, BS)
    async_copy.commit_group()
    for i in range(tiles):
        n0 = start + i * BLOCK_N
        slot = i % 2
        # The next tile's copies (a tile past the split reads nothing: its rows are -1) go into the
        # slot this partition finished decoding a step ago.
        bytes_rows, scale_rows = staged_rows(n0 + BLOCK_N, end, b_safe, kv_head, block_table_ptr, max_pages,
                                             num_pages, HKV, D, BS, PAGE, BLOCK_N)
        stage_rows(bytes_rows, scale_rows, k_data_ptr, k_scales_ptr, kd.index(1 - slot), ks.index(1 - slot), D, BS)
        stage_rows(bytes_rows, scale_rows, v_data_ptr, v_scales_ptr, vd.index(1 - slot), vs.index(1 - slot), D, BS)
        async_copy.commit_group()
        async_copy.wait_group(1)
        barrier()  # this tile's copies have landed, every thread's
        stage = i % STAGES
        mbarrier.wait(empty.index(stage), ((i // STAGES) & 1) ^ 1)
        _decode_into(k_tiles.index(stage), kd.index(slot), ks.index(slot), D, BS, E4M3_SCALES, False)
        _decode_into(v_tiles.index(stage), vd.index(slot), vs.index(slot), D, BS, E4M3_SCALES, True)
        bits = gl.convert_layout(_nan_block_bits(vs.index(slot), gl.SliceLayout(2, row_bytes_layout(
            BLOCK_N, D, BS // 2, gl.num_warps())), E4M3_SCALES), bits_layout)
        if n0 < first_diagonal:  # every row sees the whole tile, NaN values too
            seen |= bits
        else:
            nan_bits.index(stage).store(bits)
        fence_async_shared()  # the decoded tiles are read by wgmma (the async proxy)
        mbarrier.arrive(ready.index(stage), count=1)
    async_copy.wait_group(0)
    seen_smem.store(seen)
    mbarrier.arrive(done, count=1)


@gluon.jit
def _softmax(s, n0, end, first_diagonal, query_pos, score_scale, m, l, seen_rows, nan_bits_smem,
             s_layout: gl.constexpr, p_operand: gl.constexpr, dtype: gl.constexpr):
    """One tile's online softmax (base 2): (P in wgmma's A layout, the factor that rescales the
    accumulator, the new row max, denominators, the NaN blocks each row has seen)."""
    BLOCK_N: gl.constexpr = s.shape[1]
    # The scale (> 0, or NaN for an unusable global scale, which then reaches every weight) is
    # applied after the row maximum, so each score costs one fma and one exp2; a diagonal tile
    # scales before masking, so a hidden position's -inf stays -inf (weight 0) under a NaN scale.
    scale = score_scale
    if n0 >= first_diagonal:
        pos = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        visible = (gl.expand_dims(pos, 0) < end) & (gl.expand_dims(pos, 0) <= gl.expand_dims(query_pos, 1))
        s = gl.where(visible, s * score_scale, float("-inf"))
        scale = 1.0
        nan_bits = nan_bits_smem.load(gl.SliceLayout(0, s_layout))
        seen_rows |= gl.reduce(gl.where(visible, gl.expand_dims(nan_bits, 0), 0), 1, _bit_or)
    m_new = gl.maximum(m, gl.max(s, axis=1) * scale)
    m_safe = gl.where(m_new > float("-inf"), m_new, 0.0)  # a row that has seen nothing yet
    alpha = gl.exp2(m - m_safe)
    weights = gl.exp2(s * scale - gl.expand_dims(m_safe, 1))
    l = l * alpha + gl.sum(weights, axis=1)
    return gl.convert_layout(weights.to(dtype), p_operand), alpha, m_new, l, seen_rows


@gluon.jit
def _attend_partition(q_smem, k_tiles, v_tiles, nan_bits, seen_smem, ready, empty, done,
                      start, end, first_diagonal, query_pos, row, ok, first_row, end_row, kv_head, split,
                      score_scale, v_g, partial_out_ptr, partial_lse_ptr,
                      HQ: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, GROUP: gl.constexpr,
                      NUM_SPLITS: gl.constexpr):
    """S = q K^T, the online softmax and out += P V over the split's tiles as the decode partition
    hands them over, then this split's partial output (NaN in the blocks a row saw a NaN value in)
    and, with NUM_SPLITS > 1, its log-sum-exp in base 2."""
    WARPS: gl.constexpr = gl.num_warps()
    STAGES: gl.constexpr = k_tiles.shape[0]
    BLOCK_N: gl.constexpr = k_tiles.shape[1]
    BLOCK_M: gl.constexpr = q_smem.shape[0]
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, D, 16])
    p_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    m = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows_s)
    l = gl.zeros([BLOCK_M], gl.float32, layout=rows_s)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    p = gl.zeros([BLOCK_M, BLOCK_N], dtype, layout=p_operand)
    seen_rows = gl.zeros([BLOCK_M], gl.int32, layout=rows_s)  # NaN blocks each row saw on the diagonal
    tiles = gl.cdiv(gl.maximum(end - start, 0), BLOCK_N)
    if tiles > 0:  # tile 0: no previous P V
        mbarrier.wait(ready.index(0), 0)
        s = warpgroup_mma(q_smem, k_tiles.index(0).permute((1, 0)),
                          gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout), use_acc=False)
        p, alpha, m, l, seen_rows = _softmax(s, start, end, first_diagonal, query_pos, score_scale, m, l, seen_rows,
                                             nan_bits.index(0), s_layout, p_operand, dtype)
    for i in range(1, tiles):
        stage = i % STAGES
        previous = (i - 1) % STAGES
        mbarrier.wait(ready.index(stage), (i // STAGES) & 1)
        s = warpgroup_mma(q_smem, k_tiles.index(stage).permute((1, 0)),
                          gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout), use_acc=False, is_async=True)
        acc = warpgroup_mma(p, v_tiles.index(previous), acc, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
        next_p, alpha, m, l, seen_rows = _softmax(s, start + i * BLOCK_N, end, first_diagonal, query_pos,
                                                  score_scale, m, l, seen_rows, nan_bits.index(stage), s_layout,
                                                  p_operand, dtype)
        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p))
        mbarrier.arrive(empty.index(previous), count=1)  # K and V of tile i - 1 are read
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
        p = next_p
    if tiles > 0:
        acc = warpgroup_mma(p, v_tiles.index((tiles - 1) % STAGES), acc)

    mbarrier.wait(done, 0)
    seen_before = gl.reduce(seen_smem.load(gl.BlockedLayout([1], [32], [WARPS], [0])), 0, _bit_or)
    seen = gl.convert_layout(seen_rows | seen_before, rows_o)
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


@gluon.jit
def _prefill_kernel(
    q_ptr, k_data_ptr, k_scales_ptr, v_data_ptr, v_scales_ptr, k_g_ptr, v_g_ptr,
    block_table_ptr, seq_lens_ptr, partial_out_ptr, partial_lse_ptr,
    sm_scale, max_pages, num_pages, positions_per_split, cu_ptr, batch, tokens,
    HQ: gl.constexpr, HKV: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, PAGE: gl.constexpr,
    E4M3_SCALES: gl.constexpr, HAS_G: gl.constexpr, GROUP: gl.constexpr, BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SEGMENTS_PAD: gl.constexpr, NUM_SPLITS: gl.constexpr,
    DECODE_WARPS: gl.constexpr, DECODE_REGISTERS: gl.constexpr, dtype: gl.constexpr,
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

    rows_s: gl.constexpr = gl.SliceLayout(1, gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                                       instr_shape=[16, BLOCK_N, 16]))
    row = first_row + gl.arange(0, BLOCK_M, layout=rows_s)
    ok = row < end_row
    query_pos = gl.where(ok & is_sequence, diagonal + row // GROUP, -1)
    kv_end = gl.minimum(kv_len, gl.max(query_pos, axis=0) + 1)
    start, end = split_range(split, positions_per_split, kv_end)
    first_diagonal = diagonal_start(start, end, query_pos, ok & is_sequence, BLOCK_N)

    # q [BLOCK_M, D] in the tiles' type, staged once: wgmma's A operand of every S tile.
    q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [256 // D, D // 8], [WARPS, 1], [1, 0])
    q_row = first_row + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_layout))
    q_offsets = (q_row // GROUP).to(gl.int64) * HQ + kv_head * GROUP + q_row % GROUP
    dims = gl.arange(0, D, layout=gl.SliceLayout(0, q_layout))
    q = gl.load(q_ptr + gl.expand_dims(q_offsets * D, 1) + gl.expand_dims(dims, 0),
                mask=gl.expand_dims(q_row < end_row, 1), other=0.0)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dtype),
                                       q.to(dtype))
    tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], dtype)
    k_tiles = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], tile_layout)
    v_tiles = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], tile_layout)
    # Buffers indexed by stage or slot: the layout is an element's (one rank less than the buffer).
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    nan_bits = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N], flat)
    seen_smem = gl.allocate_shared_memory(gl.int32, [BLOCK_N], flat)
    raw: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    kd = gl.allocate_shared_memory(gl.uint8, [2, BLOCK_N, D // 2], raw)
    ks = gl.allocate_shared_memory(gl.uint8, [2, BLOCK_N, NB], raw)
    vd = gl.allocate_shared_memory(gl.uint8, [2, BLOCK_N, D // 2], raw)
    vs = gl.allocate_shared_memory(gl.uint8, [2, BLOCK_N, NB], raw)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for stage in gl.static_range(STAGES):
        mbarrier.init(ready.index(stage), count=1)
        mbarrier.init(empty.index(stage), count=1)
    mbarrier.init(done, count=1)
    fence_async_shared()  # q and the barriers, before wgmma and the other partition use them

    score_scale, v_g = global_scales(sm_scale, k_g_ptr, v_g_ptr, HAS_G)
    gl.warp_specialize([
        (_attend_partition, (q_smem, k_tiles, v_tiles, nan_bits, seen_smem, ready, empty, done, start, end,
                             first_diagonal, query_pos, row, ok, first_row, end_row, kv_head, split, score_scale,
                             v_g, partial_out_ptr, partial_lse_ptr, HQ, D, BS, GROUP, NUM_SPLITS)),
        (_decode_partition, (start, end, first_diagonal, b_safe, kv_head, block_table_ptr, max_pages, num_pages,
                             k_data_ptr, k_scales_ptr, v_data_ptr, v_scales_ptr, k_tiles, v_tiles, nan_bits,
                             seen_smem, kd, ks, vd, vs, ready, empty, done, HKV, D, BS, PAGE, E4M3_SCALES)),
    ], [DECODE_WARPS], [DECODE_REGISTERS])


def extend_attention(out, q, cu_seqlens_q, kv: PagedKV, fmt: KVRecipe, sm_scale: float,
                     launch: GluonPrefillLaunch = PREFILL_LAUNCH) -> None:
    """Every row of extend_attention's result into out; call it only where supported(q, kv,
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
        STAGES=launch.stages, SEGMENTS_PAD=triton.next_power_of_2(segments), NUM_SPLITS=splits,
        DECODE_WARPS=launch.decode_warps, DECODE_REGISTERS=launch.decode_registers,
        dtype=tile_dtype(False, fmt.v.e4m3_scales), num_warps=_ATTEND_WARPS,
    )
    merge_splits(partial_out, partial_lse, out, splits)
