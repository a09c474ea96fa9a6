"""Paged FP4 decode attention for Hopper (SM90), written in Gluon: Triton's language with explicit layouts.

The Triton kernel (triton_decode.py) cannot choose where values live, and its values reach the
tensor cores through a decoded round trip in shared memory (64 KB per 128-position tile) that it
stalls on. Here each layout is chosen by hand:

- packed K/V tiles and their scale bytes are copied into shared memory with cp.async, one tile
  ahead of the one being computed (double buffering), so the loads overlap the math;
- keys are read so that each thread holds the bytes of its own wgmma A fragment and are decoded
  straight into the registers the tensor cores read (scores = K q^T, positions on the long side);
- values are decoded once into shared memory, where wgmma reads V^T itself (out^T = V^T p),
  while the tensor cores compute the tile's scores.

The copies and the decode (NVFP4 through FP8 conversions, E8M0 through the Triton kernels' bf16
decode) are gluon_tiles'.

Tiles are 64 positions, so three to five programs share an SM. It serves head_dim 64 and 128 (not
MXFP4 at 64) with up to 32 query heads per KV head (padded to 8, 16 or 32, a wgmma tile's side);
other shapes and GPUs run the Triton kernel (decode.py chooses). The rules both kernels must agree
on (split sizes, the page table, key order, global scales, partial outputs and their merge) are
attention_shared's @triton.jit functions, which this kernel calls as they are. It runs with Triton
3.6 and 3.9.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, warpgroup_mma,
                                                           warpgroup_mma_wait)

from .attention_shared import (context_len, global_scales, key_columns, key_pair, launch_splits, merge_splits,
                               positions_per_split, sm_count, split_kernel_arguments, split_lse,
                               split_outputs, split_range)
from .formats import KVRecipe
from .gluon_tiles import barrier, byte_basis, caches_aligned, decode_tile, log2_int, row_bytes_layout, stage_tile
from .paged_kv import PagedKV
from .triton_codes import tile_dtype

HEAD_DIMS = (64, 128)
MAX_GROUP = 32  # query heads per KV head
# Context positions per tile. 64 (heads padded to 8) rather than 128 (to 16): an NVFP4 program needs
# 92 registers per thread and 38 KB of shared memory instead of about 190 and 78 KB, so five programs
# share an SM instead of two and hide each other's memory waits (docs/performance.md).
BLOCK_N = 64
# Shared-memory buffers of packed tiles: the copies run one tile ahead of the one computed. More
# buffers cost shared memory (fewer programs per SM) and were slower (docs/performance.md).
STAGES = 2
# Programs an SM holds, for sizing the splits to whole rounds of the GPU: at head_dim 128, 5 for NVFP4
# with heads padded to 8 (92 registers), 3 to 4 for E8M0 scales or 16 heads (127 to 142), 3 for 32
# heads (154 to 167).
# Four is the middle: the split rule is coarse, and a round more or less shows only at the tails.
PROGRAMS_PER_SM = 4
# At most this many splits: past it, more and shorter splits were slower on a long single sequence
# (more start-up and merging per position; docs/performance.md).
MAX_SPLITS = 32
_NUM_WARPS = gl.constexpr(4)  # one warpgroup: the wgmma unit
_MIN_GROUP_PAD = 8  # wgmma's N side: query heads are padded to a multiple of it


def supported(q: torch.Tensor, kv: PagedKV, fmt: KVRecipe) -> bool:
    """Whether this kernel serves the call on a Hopper GPU (wgmma is SM90-only; decode.hopper_kernel
    checks the GPU before importing this module): its shapes, and K in the values' FP4 format (FP8
    keys run the Triton kernel). A row's scale bytes must make one cp.async of at least 4 bytes (not
    MXFP4 at head_dim 64), and the caches must start 16-byte aligned: the copies' widths come from
    the alignment Triton sees in the pointers, and below 4 bytes a cp.async does not compile."""
    batch, hq, d = q.shape
    return (d in HEAD_DIMS and hq // kv.kv_heads <= MAX_GROUP and fmt.k is fmt.v and d // fmt.v.block_size >= 4
            and caches_aligned(kv, 16))


@functools.lru_cache(maxsize=None)
def gluon_num_splits(batch: int, kv_heads: int, max_len: int, programs: int) -> int:
    """Splits of the context (at most MAX_SPLITS) that finish soonest on a GPU running `programs` at once.

    Each program takes whole tiles plus about one tile's worth of start-up (its first copies, the
    query, the output); programs run in rounds of `programs`, so the time is rounds x (tiles per
    split + 1). Ties go to fewer splits (less to merge). With 528 programs at once (132 SMs x 4) and
    8 KV heads: 32 x 8k gets 2 splits, 8 x 8k 8, 1 x 1k 16 (a CPU test pins these). From static
    sizes only: one CUDA graph serves every sequence length."""
    pairs, tiles = max(1, batch * kv_heads), triton.cdiv(max(max_len, 1), BLOCK_N)

    def cost(splits: int) -> tuple[int, int]:
        return triton.cdiv(pairs * splits, programs) * (triton.cdiv(tiles, splits) + 1), splits

    return min(range(1, min(tiles, MAX_SPLITS) + 1), key=cost)


def group_pad(group: int) -> int:
    """Query heads per KV head padded to a wgmma tile side (8, 16 or 32)."""
    return max(_MIN_GROUP_PAD, triton.next_power_of_2(group))


def splits_for(batch: int, kv_heads: int, max_len: int, device: torch.device) -> int:
    """gluon_num_splits for this kernel on `device`."""
    return gluon_num_splits(batch, kv_heads, max_len, sm_count(device) * PROGRAMS_PER_SM)


@gluon.constexpr_function
def _key_bytes_layout(N, D, HB):
    """Packed keys [N, D/(2 HB), HB] as wgmma's A fragments need them: the thread that holds rows
    r and r + 8 of a 16-row slab (r = lane / 4, slab = warp, 64-row halves in registers) holds D/8
    adjacent bytes of each, starting at byte D/8 * (lane % 4). key_columns reorders them."""
    chunk = D // 8
    regs = [byte_basis(1 << b, HB) for b in range(log2_int(chunk))] + [[8, 0, 0]]
    regs += [[64 << r, 0, 0] for r in range(log2_int(N // 64))]
    lanes = [byte_basis(chunk, HB), byte_basis(2 * chunk, HB), [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    return gl.DistributedLinearLayout(regs, lanes, [[16, 0, 0], [32, 0, 0]], [], [N, D // (2 * HB), HB])


@gluon.jit
def _decode_split_kernel(
    q_ptr, k_data_ptr, k_scales_ptr, v_data_ptr, v_scales_ptr, k_g_ptr, v_g_ptr,
    block_table_ptr, seq_lens_ptr, partial_out_ptr, partial_lse_ptr,
    sm_scale, max_pages, num_pages, positions_per_split,
    HQ: gl.constexpr, HKV: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, PAGE: gl.constexpr,
    E4M3_SCALES: gl.constexpr, HAS_G: gl.constexpr, GROUP: gl.constexpr, GROUP_PAD: gl.constexpr,
    N: gl.constexpr, NUM_SPLITS: gl.constexpr, STAGES: gl.constexpr, dtype: gl.constexpr,
):
    """One (sequence, KV head, split): the online softmax of triton_decode._decode_split_kernel;
    dtype: the tiles' type (triton_codes.tile_dtype)."""
    b = gl.program_id(0)
    kv_head = gl.program_id(1)
    split = gl.program_id(2)
    seq_len = context_len(gl.load(seq_lens_ptr + b), max_pages, PAGE)
    start, end = split_range(split, positions_per_split, seq_len)

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[_NUM_WARPS, 1],
                                                  instr_shape=[16, GROUP_PAD, 16])
    key_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    key_layout: gl.constexpr = _key_bytes_layout(N, D, BS // 2)
    value_layout: gl.constexpr = row_bytes_layout(N, D, BS // 2, _NUM_WARPS)
    raw: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    kd_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, N, D // 2], raw)
    vd_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, N, D // 2], raw)
    ks_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, N, D // BS], raw)
    vs_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, N, D // BS], raw)
    for i in gl.static_range(STAGES - 1):
        stage_tile(start + i * N, end, b, kv_head, block_table_ptr, max_pages, num_pages, k_data_ptr, k_scales_ptr,
                   v_data_ptr, v_scales_ptr, i, kd_smem, ks_smem, vd_smem, vs_smem, HKV, D, BS, PAGE, N)

    # q's even and odd elements in the keys' column order: the B operands of the two score
    # products, stored [heads, k] and read through transposed views (wgmma's plainest B layout; an
    # [k, 8] one read out of bounds on Triton 3.6).
    q_layout: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [_NUM_WARPS, 1], [1, 0])
    head = gl.arange(0, GROUP_PAD, layout=gl.SliceLayout(1, q_layout))
    k = gl.arange(0, D // 2, layout=gl.SliceLayout(0, q_layout))
    pair = key_pair(k, D)
    q_offsets = gl.expand_dims((b * HQ + kv_head * GROUP + head).to(gl.int64) * D, 1) + gl.expand_dims(2 * pair, 0)
    q_mask = gl.expand_dims(head < GROUP, 1)
    q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([GROUP_PAD, D // 2], dtype)
    q_even = gl.allocate_shared_memory(dtype, [GROUP_PAD, D // 2], q_smem_layout,
                                       gl.load(q_ptr + q_offsets, mask=q_mask, other=0.0).to(dtype))
    q_odd = gl.allocate_shared_memory(dtype, [GROUP_PAD, D // 2], q_smem_layout,
                                      gl.load(q_ptr + q_offsets + 1, mask=q_mask, other=0.0).to(dtype))
    p_smem = gl.allocate_shared_memory(dtype, [GROUP_PAD, N],
                                       gl.NVMMASharedLayout.get_default_for([GROUP_PAD, N], dtype))
    v_smem = gl.allocate_shared_memory(dtype, [N, D], gl.NVMMASharedLayout.get_default_for([N, D], dtype))
    fence_async_shared()

    score_scale, v_g = global_scales(sm_scale, k_g_ptr, v_g_ptr, HAS_G)

    m = gl.full([GROUP_PAD], float("-inf"), gl.float32, layout=gl.SliceLayout(0, mma))
    l_acc = gl.zeros([N, GROUP_PAD], gl.float32, layout=mma)  # softmax denominators per position
    acc = gl.zeros([D, GROUP_PAD], gl.float32, layout=mma)  # out^T
    tile = 0
    for n0 in range(start, end, N):
        stage = tile % STAGES
        async_copy.wait_group(STAGES - 2)
        barrier()  # every thread's copies of this tile have landed, and the buffer refilled next is free
        stage_tile(n0 + (STAGES - 1) * N, end, b, kv_head, block_table_ptr, max_pages, num_pages, k_data_ptr,
                   k_scales_ptr, v_data_ptr, v_scales_ptr, (tile + STAGES - 1) % STAGES, kd_smem, ks_smem, vd_smem,
                   vs_smem, HKV, D, BS, PAGE, N)

        k_even, k_odd = decode_tile(kd_smem.index(stage), ks_smem.index(stage), key_layout, D, BS, E4M3_SCALES)
        # The same registers: the compiler checks that no data moves (assert_trivial).
        k_even = gl.convert_layout(key_columns(k_even, D), key_operand, assert_trivial=True)
        k_odd = gl.convert_layout(key_columns(k_odd, D), key_operand, assert_trivial=True)
        zeros = gl.zeros([N, GROUP_PAD], gl.float32, layout=mma)
        scores = warpgroup_mma(k_even, q_even.permute((1, 0)), zeros, use_acc=False, is_async=True)
        scores = warpgroup_mma(k_odd, q_odd.permute((1, 0)), scores, is_async=True)
        # The values decode while the tensor cores compute the scores (whose key registers stay live).
        v_even, v_odd = decode_tile(vd_smem.index(stage), vs_smem.index(stage), value_layout, D, BS, E4M3_SCALES)
        v = gl.reshape(gl.join(gl.reshape(v_even, [N, D // 2]), gl.reshape(v_odd, [N, D // 2])), [N, D])
        scores = warpgroup_mma_wait(num_outstanding=0, deps=(scores, k_even, k_odd))[0]
        pos = n0 + gl.arange(0, N, layout=gl.SliceLayout(1, mma))
        scores = gl.where(gl.expand_dims(pos < end, 1), scores * score_scale, float("-inf"))
        m_new = gl.maximum(m, gl.max(scores, axis=0))
        alpha = gl.exp2(m - m_new)
        p = gl.exp2(scores - gl.expand_dims(m_new, 0))
        l_acc = l_acc * gl.expand_dims(alpha, 0) + p

        v_smem.store(v)
        p_smem.store(gl.permute(p.to(dtype), [1, 0]))
        fence_async_shared()
        barrier()
        acc = warpgroup_mma(v_smem.permute((1, 0)), p_smem.permute((1, 0)), acc * gl.expand_dims(alpha, 0))
        m = m_new
        tile += 1
    async_copy.wait_group(0)

    # This split's partial result: out = acc^T / l (times the V global scale), lse in base 2; with
    # one split it is the output itself.
    l = gl.sum(l_acc, axis=0)
    safe_l = gl.where(l > 0, l, 1.0) / v_g
    head = gl.arange(0, GROUP_PAD, layout=gl.SliceLayout(0, mma))
    base = (b * HQ + kv_head * GROUP + head).to(gl.int64) * NUM_SPLITS + split
    dims = gl.arange(0, D, layout=gl.SliceLayout(1, mma))
    gl.store(partial_out_ptr + gl.expand_dims(base, 0) * D + gl.expand_dims(dims, 1),
             (acc / gl.expand_dims(safe_l, 0)).to(partial_out_ptr.dtype.element_ty),
             mask=gl.expand_dims(head < GROUP, 0))
    if NUM_SPLITS > 1:
        gl.store(partial_lse_ptr + base, split_lse(m, l), mask=head < GROUP)


def decode_attention(out, q, kv: PagedKV, fmt: KVRecipe, sm_scale: float, lse=None) -> None:
    """The Gluon kernel; call it only where supported(q, kv, fmt) (decode.py does)."""
    batch, hq, _ = q.shape
    hkv = kv.kv_heads
    positions = positions_per_split(kv.max_len, splits_for(batch, hkv, kv.max_len, q.device), BLOCK_N)
    splits = launch_splits(triton.cdiv(max(kv.max_len, 1), positions), lse)  # none left empty, unless for lse
    partial_out, partial_lse = split_outputs(out, splits)
    args, constants = split_kernel_arguments(q, kv, partial_out, partial_lse, fmt.v, sm_scale, positions)
    _decode_split_kernel[(batch, hkv, splits)](
        *args, **constants, GROUP_PAD=group_pad(hq // hkv), N=BLOCK_N, NUM_SPLITS=splits, STAGES=STAGES,
        dtype=tile_dtype(False, fmt.v.e4m3_scales), num_warps=_NUM_WARPS.value,
    )
    merge_splits(partial_out, partial_lse, out, splits, lse)
