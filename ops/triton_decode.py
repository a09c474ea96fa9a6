"""Paged decode attention that reads the FP4 cache itself (split-K flash decoding, Triton).

Each program takes one sequence, one KV head (with all the query heads that share it) and one
slice of the context: it loads packed K/V tiles, decodes them in registers
(triton_attention_tiles), and keeps an online softmax. attention_shared's merge kernel combines
the slices (a lone slice writes the output itself). The grid depends only on shapes (batch, heads,
the page table's width), never on sequence lengths, so one CUDA graph serves every step.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .attention_shared import (POSITIONS_PER_SPLIT_MIN, context_len, global_scales, interpreter_fp32, launch_splits,
                               merge_splits, mma_side, positions_per_split, sm_count, split_count,
                               split_kernel_arguments, split_outputs, split_range)
from .formats import KVRecipe
from .paged_kv import PagedKV
from .triton_attention_tiles import kernel_inputs, query_pairs, softmax_step, store_split, tile_scores, value_tile


class DecodeLaunch(NamedTuple):
    block_n: int  # context positions per tile
    num_warps: int
    waves: int  # programs per SM to aim for (triton_num_splits)
    max_registers: Optional[int]  # per thread; None: the compiler's count
    num_stages: int  # software-pipeline stages


# head_dim -> launch shape, chosen by timing the candidates (docs/performance.md). The register cap
# lets three programs share an SM instead of two; head_dim 256 keeps the compiler's count (capped,
# it would spill 384 bytes per thread).
DECODE_LAUNCH = {
    64: DecodeLaunch(block_n=128, num_warps=4, waves=4, max_registers=168, num_stages=3),
    128: DecodeLaunch(block_n=128, num_warps=4, waves=4, max_registers=168, num_stages=3),
    256: DecodeLaunch(block_n=128, num_warps=4, waves=4, max_registers=None, num_stages=3),
}
_POSITIONS_PER_SPLIT_SMALL_GRID = 128  # one tile, for grids that would leave SMs idle (triton_num_splits)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_data_ptr, k_scales_ptr, v_data_ptr, v_scales_ptr, k_g_ptr, v_g_ptr,
    block_table_ptr, seq_lens_ptr, partial_out_ptr, partial_lse_ptr,
    sm_scale, max_pages, num_pages, positions_per_split,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, PAGE: tl.constexpr,
    E4M3_SCALES: tl.constexpr, HAS_G: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr,
    K_FP8: tl.constexpr, dtype: tl.constexpr,
):
    """One (sequence, KV head, split); dtype: the tiles' type (triton_codes.tile_dtype)."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = context_len(tl.load(seq_lens_ptr + b), max_pages, PAGE)
    start, end = split_range(split, positions_per_split, seq_len)

    # Scores are K q^T [BLOCK_N, heads]: positions are the tensor-core tile's long side, and q is
    # read in the keys' pair order (key_pair). The output is kept transposed, V^T p [D, heads], for
    # the same reason: with the padded heads as the long side the second product would not run as
    # wgmma but on mma.sync, whose reads of V from shared memory are bank-conflicted.
    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
    head_ok = tl.arange(0, GROUP_PAD) < GROUP
    q_even, q_odd = query_pairs(q_ptr, (b * HQ + heads).to(tl.int64)[None, :] * D, head_ok, D, dtype)
    score_scale, v_g = global_scales(sm_scale, k_g_ptr, v_g_ptr, HAS_G)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_acc = tl.zeros([BLOCK_N, GROUP_PAD], tl.float32)  # softmax denominators, per position until the end
    acc = tl.zeros([D, GROUP_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        scores, in_cache, rows = tile_scores(  # [BLOCK_N, GROUP_PAD]
            k_data_ptr, k_scales_ptr, block_table_ptr, b, max_pages, num_pages, kv_head, pos, valid, None,
            q_even, q_odd, score_scale, D, BS, PAGE, HKV, E4M3_SCALES, FP32_TILES, HW_FP8, K_FP8, dtype)
        m_new, alpha, p, l_acc = softmax_step(m, l_acc, scores)
        v = value_tile(v_data_ptr, v_scales_ptr, rows, in_cache, D, BS, E4M3_SCALES, FP32_TILES, HW_FP8)
        acc = tl.dot(tl.trans(v), p.to(dtype), acc * alpha[None, :])
        m = m_new

    # This split's partial result: out = acc^T / l (times the V global scale); with one split it is
    # the output itself (partial_out_ptr is out: no merge kernel runs).
    l = tl.sum(l_acc, axis=0)
    safe_l = tl.where(l > 0, l, 1.0) / v_g
    store_split(partial_out_ptr, partial_lse_ptr, (b * HQ + heads).to(tl.int64), split, acc, safe_l, None, m, l,
                head_ok, NUM_SPLITS)


def triton_num_splits(batch: int, kv_heads: int, max_len: int, device: torch.device, waves: int) -> int:
    """attention_shared.split_count for the (sequence, KV head) programs of a decode.

    A split takes at least 256 positions, or one 128-position tile where 256 would give fewer
    programs than the GPU has SMs (1 x 1k with 8 KV heads: 32 programs): shorter splits pay for
    themselves only where SMs would otherwise idle (docs/performance.md)."""
    pairs, sms = max(1, batch * kv_heads), sm_count(device)
    min_positions = POSITIONS_PER_SPLIT_MIN
    if pairs * triton.cdiv(max_len, min_positions) < sms:
        min_positions = _POSITIONS_PER_SPLIT_SMALL_GRID
    return split_count(pairs, max_len, sms, waves, min_positions)


def decode_attention(out, q, kv: PagedKV, fmt: KVRecipe, sm_scale: float, lse=None) -> None:
    """The Triton kernel: every CUDA GPU from SM80, every accepted head_dim, group size and
    recipe (decode.decode_attention runs gluon_decode's instead where that one serves the call)."""
    kv, tiles = kernel_inputs(kv, fmt, q.device)
    batch, hq, d = q.shape
    hkv = kv.kv_heads
    launch = DECODE_LAUNCH[d]
    splits = triton_num_splits(batch, hkv, kv.max_len, q.device, launch.waves)
    positions = positions_per_split(kv.max_len, splits, launch.block_n)
    splits = launch_splits(splits, lse)
    with interpreter_fp32(out, q) as (out, q):
        partial_out, partial_lse = split_outputs(out, splits)
        args, constants = split_kernel_arguments(q, kv, partial_out, partial_lse, fmt.v, sm_scale, positions)
        _decode_split_kernel[(batch, hkv, splits)](
            *args, **constants, **tiles, GROUP_PAD=mma_side(hq // hkv), BLOCK_N=launch.block_n, NUM_SPLITS=splits,
            num_warps=launch.num_warps, maxnreg=launch.max_registers, num_stages=launch.num_stages,
        )
        merge_splits(partial_out, partial_lse, out, splits, lse)
