"""Paged decode attention that reads the FP4 cache itself (split-K flash decoding, Triton).

Each program takes one sequence, one KV head (with all the query heads that share it) and one
slice of the context: it loads packed K/V tiles, decodes them in registers, and keeps an online
softmax. split_decode's merge kernel combines the slices (a lone slice writes the output itself). The grid
depends only on shapes (batch, heads, the page table's width), never on sequence lengths, so one
CUDA graph serves every step.

Decoding turns four packed bytes into eight exact 16-bit tensor-core inputs with a few lines of
inline PTX (byte-table lookups with prmt, see triton_codes._decode_ptx): fp16 for NVFP4, bf16 for
E8M0 scales, the block scale applied by one packed multiply. Positions are the long side of the
score tile (keys feed the tensor cores from registers, their pair columns permuted so each thread
reads adjacent bytes, see _key_tile); values are decoded row by row and reach the tensor cores
through shared memory. The query is cast to the tiles' type once per program and the global scales
are applied to the fp32 scores and outputs. The error against SDPA over the dequantized cache is
the query's rounding to that type, the summation order, and the 16-bit rounding of the softmax
weights, as in any flash-attention kernel.

FP8 E4M3 keys ("+k8" recipes, K_FP8) are read as one 16-bit word per element pair and converted
to the tiles' type (exact: E4M3 values are fp16 and bf16 values), in the FP4 keys' column order;
values stay FP4.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .formats import Element, KVRecipe
from .paged_kv import PagedKV
from .split_decode import key_pair, launch_splits, merge_splits, sm_count, split_kernel_arguments, split_outputs
from .triton_codes import block_scales, decode_packed
from .triton_kernels import hardware_casts, usable_global_scale


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
_MIN_GROUP = 16  # tensor-core tiles need a side of at least 16: query heads are padded to this
_POSITIONS_PER_SPLIT_MIN = 256
_POSITIONS_PER_SPLIT_SMALL_GRID = 128  # one tile, for grids that would leave SMs idle (triton_num_splits)


@triton.jit
def _key_tile(data_ptr, scales_ptr, rows, valid, D: tl.constexpr, BS: tl.constexpr,
              E4M3_SCALES: tl.constexpr, FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr):
    """Key rows [N] -> (even, odd) [N, D/2], pair columns in key_pair order.

    Any column order gives the same q.k if q is read in it too; this one hands each thread of a
    tensor-core A fragment (pairs 2c, 2c+1, 2c+8, 2c+9 of every 16, c = lane % 4) D/8 adjacent
    bytes per row: 16-byte loads, and one scale per block those bytes span (1 to 4) instead of a
    scale every two bytes."""
    PC: tl.constexpr = D // 8  # adjacent pairs per fragment thread
    NBC: tl.constexpr = PC * 2 // BS if PC * 2 >= BS else 1  # blocks a thread's pairs touch
    PPC: tl.constexpr = PC // NBC
    N: tl.constexpr = rows.shape[0]
    chunk = tl.arange(0, 4)[:, None] * PC + tl.arange(0, NBC)[None, :] * PPC  # [4, NBC] first pair
    packed = tl.load(data_ptr + rows[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :], mask=valid[:, None], other=0)
    packed = tl.reshape(packed, (N, 4, NBC, PPC))
    scale_byte = tl.load(scales_ptr + rows[:, None, None] * (D // BS) + (chunk // (BS // 2))[None, :, :],
                         mask=valid[:, None, None], other=0)
    scale = tl.broadcast_to(tl.expand_dims(block_scales(scale_byte, E4M3_SCALES, FP32_TILES, HW_FP8), 3), packed.shape)
    even, odd = decode_packed(packed, scale, E4M3_SCALES, FP32_TILES)
    even = tl.reshape(tl.permute(tl.reshape(even, (N, 4, PC // 4, 2, 2)), (0, 2, 3, 1, 4)), (N, D // 2))
    odd = tl.reshape(tl.permute(tl.reshape(odd, (N, 4, PC // 4, 2, 2)), (0, 2, 3, 1, 4)), (N, D // 2))
    return even, odd


@triton.jit
def _fp8_key_tile(data_ptr, rows, valid, D: tl.constexpr, FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr):
    """FP8 E4M3 key rows [N] -> (even, odd) [N, D/2] as _key_tile gives them (pair columns in
    key_pair order), in fp16 (float32 on the interpreter). data_ptr holds the cache as int16 words,
    word p = elements 2p (low byte) and 2p + 1, so a row is D/2 adjacent words."""
    PC: tl.constexpr = D // 8
    N: tl.constexpr = rows.shape[0]
    words = tl.load(data_ptr + rows[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :], mask=valid[:, None], other=0)
    even = block_scales((words & 0xFF).to(tl.uint8), True, FP32_TILES, HW_FP8)
    odd = block_scales(((words >> 8) & 0xFF).to(tl.uint8), True, FP32_TILES, HW_FP8)
    even = tl.reshape(tl.permute(tl.reshape(even, (N, 4, PC // 4, 2, 2)), (0, 2, 3, 1, 4)), (N, D // 2))
    odd = tl.reshape(tl.permute(tl.reshape(odd, (N, 4, PC // 4, 2, 2)), (0, 2, 3, 1, 4)), (N, D // 2))
    return even, odd


@triton.jit
def key_tiles(k_data_ptr, k_scales_ptr, rows, valid, D: tl.constexpr, BS: tl.constexpr, E4M3_SCALES: tl.constexpr,
              FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr, K_FP8: tl.constexpr, dtype: tl.constexpr):
    """Key rows [N] -> (even, odd) [N, D/2] in the tiles' type: FP4 (_key_tile) or, K_FP8, FP8
    E4M3 keys (_fp8_key_tile; k_data_ptr as int16 words, kv_for_kernels)."""
    if K_FP8:
        even, odd = _fp8_key_tile(k_data_ptr, rows, valid, D, FP32_TILES, HW_FP8)
        even, odd = even.to(dtype), odd.to(dtype)
    else:
        even, odd = _key_tile(k_data_ptr, k_scales_ptr, rows, valid, D, BS, E4M3_SCALES, FP32_TILES, HW_FP8)
    return even, odd


def kv_for_kernels(kv: PagedKV, fmt: KVRecipe) -> tuple[PagedKV, bool]:
    """(kv as the Triton attention kernels read it, K_FP8): FP8 keys are read as int16 words."""
    k_fp8 = fmt.k.element is Element.E4M3
    return (kv._replace(k_data=kv.k_data.view(torch.int16)) if k_fp8 else kv), k_fp8


@triton.jit
def value_tile(data_ptr, scales_ptr, rows, valid, D: tl.constexpr, BS: tl.constexpr,
                E4M3_SCALES: tl.constexpr, FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr):
    """Value rows [N] -> [N, D] in element order, decoded as [rows, blocks, bytes] so a block's
    scale broadcasts over its bytes in registers. Joining the even and odd halves (not an
    elementwise op) keeps Triton from moving the decode into the tensor-core operand layout, where
    every element would need its own scale; the joined rows reach it through shared memory."""
    NB: tl.constexpr = D // BS
    HB: tl.constexpr = BS // 2
    N: tl.constexpr = rows.shape[0]
    packed = tl.load(data_ptr + rows[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :], mask=valid[:, None], other=0)
    packed = tl.reshape(packed, (N, NB, HB))
    scale_byte = tl.load(scales_ptr + rows[:, None] * NB + tl.arange(0, NB)[None, :], mask=valid[:, None], other=0)
    scale = tl.broadcast_to(tl.expand_dims(block_scales(scale_byte, E4M3_SCALES, FP32_TILES, HW_FP8), 2), packed.shape)
    even, odd = decode_packed(packed, scale, E4M3_SCALES, FP32_TILES)
    return tl.reshape(tl.join(even, odd), (N, D))


def tile_dtype(fp32_tiles: bool, e4m3_scales: bool):
    """The type key and value tiles decode to (decode_packed): float32 on the interpreter, else
    the 16-bit type that holds every code times its block scale exactly (fp16 under E4M3 scales,
    bf16 under E8M0 ones)."""
    if fp32_tiles:
        return tl.float32
    return tl.float16 if e4m3_scales else tl.bfloat16


@triton.jit
def query_pairs(q_ptr, q_cols, ok, D: tl.constexpr, dtype: tl.constexpr):
    """q's even and odd elements [D/2, columns] in key_pair order (the key tiles' columns), as the
    tiles' type; q_cols: each column's element offset in q, ok: which columns are real."""
    key_pairs = key_pair(tl.arange(0, D // 2), D)
    q_even = tl.load(q_ptr + q_cols + 2 * key_pairs[:, None], mask=ok[None, :], other=0.0).to(dtype)
    q_odd = tl.load(q_ptr + q_cols + 2 * key_pairs[:, None] + 1, mask=ok[None, :], other=0.0).to(dtype)
    return q_even, q_odd


@triton.jit
def global_scales(sm_scale, k_g_ptr, v_g_ptr, HAS_G: tl.constexpr):
    """(the scores' scale: sm_scale times K's global scale, in base 2 for exp2; V's global scale)."""
    if HAS_G:
        k_g = usable_global_scale(tl.load(k_g_ptr))
        v_g = usable_global_scale(tl.load(v_g_ptr))
    else:
        k_g = 1.0
        v_g = 1.0
    return sm_scale * k_g * 1.4426950408889634, v_g


@triton.jit
def paged_rows(block_table_ptr, b, max_pages, num_pages, pos, valid, PAGE: tl.constexpr, HKV: tl.constexpr,
               kv_head):
    """Positions `pos` of sequence b -> (readable, cache rows of kv_head). A page id outside the
    cache reads as zero keys and values (eager's gather_dequantize rule): not readable."""
    page = tl.load(block_table_ptr + b.to(tl.int64) * max_pages + pos // PAGE, mask=valid, other=0)
    in_cache = valid & (page >= 0) & (page < num_pages)
    return in_cache, (page.to(tl.int64) * PAGE + pos % PAGE) * HKV + kv_head


@triton.jit
def causal_scores(k_data_ptr, k_scales_ptr, block_table_ptr, b, max_pages, num_pages, kv_head, pos, valid, query_pos,
                  q_even, q_odd, score_scale, D: tl.constexpr, BS: tl.constexpr, PAGE: tl.constexpr, HKV: tl.constexpr,
                  E4M3_SCALES: tl.constexpr, FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr, K_FP8: tl.constexpr,
                  dtype: tl.constexpr):
    """Scores [positions, columns] of the key positions `pos` of sequence b against the query
    columns (query_pairs), in base 2; -inf where a position is not `valid` or lies after the
    column's query_pos (extend's causal rule). Also (readable, cache rows) of the positions, for
    their values."""
    in_cache, rows = paged_rows(block_table_ptr, b, max_pages, num_pages, pos, valid, PAGE, HKV, kv_head)
    k_even, k_odd = key_tiles(k_data_ptr, k_scales_ptr, rows, in_cache, D, BS, E4M3_SCALES, FP32_TILES, HW_FP8,
                              K_FP8, dtype)
    scores = tl.dot(k_even, q_even) + tl.dot(k_odd, q_odd)
    visible = valid[:, None] & (pos[:, None] <= query_pos[None, :])
    return tl.where(visible, scores * score_scale, float("-inf")), in_cache, rows


NAN_GROUPS = tl.constexpr(16)  # value columns are flagged in 16 groups of D/16: each inside one FP4 block


@triton.jit
def drop_unseen_values(v, pos, valid, query_pos, dtype: tl.constexpr):
    """A value tile [N, D] that some query columns see only in part (query_pos [M]: each column's
    last visible position) -> (v with its NaN entries zeroed, [NAN_GROUPS, M] count of the NaN entries
    each column sees, per group of D/16 value columns).

    A position a column does not see has weight 0 there, and 0 x NaN = NaN: zeroed, a stale NaN
    (a later token's, a page's past seq_lens) reaches no column that does not see it, and the
    count marks the outputs of the columns that do (see nan_where_seen; eager.masked_attention
    is the rule). In the cache a NaN fills a whole block, so a group's flag is its columns'."""
    N: tl.constexpr = v.shape[0]
    D: tl.constexpr = v.shape[1]
    broken = v != v
    broken_groups = tl.max(tl.reshape(broken.to(tl.int32), (N, NAN_GROUPS, D // NAN_GROUPS)), axis=2).to(dtype)
    visible = valid[:, None] & (pos[:, None] <= query_pos[None, :])
    seen = tl.dot(tl.trans(broken_groups), visible.to(dtype))
    return tl.where(broken, 0.0, v).to(v.dtype), seen


@triton.jit
def nan_where_seen(out, seen):
    """out [D, M] with NaN in every group of value columns a column saw a NaN in (drop_unseen_values)."""
    D: tl.constexpr = out.shape[0]
    M: tl.constexpr = out.shape[1]
    hit = tl.reshape(tl.broadcast_to(tl.expand_dims(seen > 0, 1), (NAN_GROUPS, D // NAN_GROUPS, M)), (D, M))
    return tl.where(hit, float("nan"), out)


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
    """One (sequence, KV head, split); dtype: the tiles' type (tile_dtype)."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    seq_len = tl.minimum(seq_len, max_pages * PAGE)
    start = split * positions_per_split
    end = tl.minimum(start + positions_per_split, seq_len)

    # Scores are K q^T [BLOCK_N, heads]: positions are the tensor-core tile's long side, and q is
    # read in the keys' pair order (key_pair). The output is kept transposed, V^T p
    # [D, heads], for the same reason: with the 16 padded heads as the long side, the second
    # product ran on the older mma.sync path, whose reads of V from shared memory were 4-way
    # bank-conflicted; as V^T p both are wgmma.
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
        in_cache, rows = paged_rows(block_table_ptr, b, max_pages, num_pages, pos, valid, PAGE, HKV, kv_head)
        k_even, k_odd = key_tiles(k_data_ptr, k_scales_ptr, rows, in_cache, D, BS, E4M3_SCALES, FP32_TILES, HW_FP8,
                                  K_FP8, dtype)
        scores = tl.dot(k_even, q_even) + tl.dot(k_odd, q_odd)  # [BLOCK_N, GROUP_PAD]
        scores = tl.where(valid[:, None], scores * score_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[None, :])
        l_acc = l_acc * alpha[None, :] + p
        v = value_tile(v_data_ptr, v_scales_ptr, rows, in_cache, D, BS, E4M3_SCALES, FP32_TILES, HW_FP8)
        acc = tl.dot(tl.trans(v), p.to(dtype), acc * alpha[None, :])
        m = m_new

    # Partial results of this split: out = acc^T / l (times the V global scale), lse in base 2. With
    # one split this is the output itself (partial_out_ptr is out: no merge kernel runs).
    l = tl.sum(l_acc, axis=0)
    safe_l = tl.where(l > 0, l, 1.0) / v_g
    base = ((b * HQ + heads).to(tl.int64) * NUM_SPLITS + split)
    tl.store(partial_out_ptr + base[None, :] * D + tl.arange(0, D)[:, None],
             (acc / safe_l[None, :]).to(partial_out_ptr.dtype.element_ty), mask=head_ok[None, :])
    if NUM_SPLITS > 1:
        lse = tl.where(l > 0, m + tl.log2(l), float("-inf"))
        tl.store(partial_lse_ptr + base, lse, mask=head_ok)


def triton_num_splits(batch: int, kv_heads: int, max_len: int, device: torch.device, waves: int) -> int:
    """Enough (sequence, KV head, split) programs to fill the GPU `waves` times, from static sizes only.

    A split takes at least 256 positions, or one 128-position tile where 256 would give fewer
    programs than the GPU has SMs (1 x 1k with 8 KV heads: 32 programs): shorter splits pay for
    themselves only where SMs would otherwise idle (docs/performance.md)."""
    pairs, sms = max(1, batch * kv_heads), sm_count(device)
    wanted = triton.cdiv(waves * sms, pairs)
    min_positions = _POSITIONS_PER_SPLIT_MIN
    if pairs * triton.cdiv(max_len, min_positions) < sms:
        min_positions = _POSITIONS_PER_SPLIT_SMALL_GRID
    return max(1, min(wanted, triton.cdiv(max_len, min_positions)))


def decode_attention(out, q, kv: PagedKV, fmt: KVRecipe, sm_scale: float, lse=None) -> None:
    """The Triton kernel: every CUDA GPU from SM80, every accepted head_dim, group size and
    recipe (decode.decode_attention runs gluon_decode's instead where that one serves the call)."""
    kv, k_fp8 = kv_for_kernels(kv, fmt)
    batch, hq, d = q.shape
    hkv = kv.kv_heads
    # On CPU tensors (the Triton interpreter, in CI) bf16 casts and arithmetic are not faithful:
    # there q, the E8M0 tiles and the output stay fp32 (same values), and out is cast at the end.
    on_interpreter = q.device.type == "cpu"
    final_out, q = (out, q.float()) if on_interpreter else (None, q)
    if on_interpreter:
        out = torch.empty_like(q)
    launch = DECODE_LAUNCH[d]
    splits = triton_num_splits(batch, hkv, kv.max_len, q.device, launch.waves)
    positions_per_split = triton.cdiv(triton.cdiv(max(kv.max_len, 1), splits), launch.block_n) * launch.block_n
    splits = launch_splits(splits, lse)
    partial_out, partial_lse = split_outputs(out, splits)
    args, constants = split_kernel_arguments(q, kv, partial_out, partial_lse, fmt.v, sm_scale, positions_per_split)
    _decode_split_kernel[(batch, hkv, splits)](
        *args, **constants, GROUP_PAD=max(_MIN_GROUP, triton.next_power_of_2(hq // hkv)),
        BLOCK_N=launch.block_n, NUM_SPLITS=splits, FP32_TILES=on_interpreter, HW_FP8=hardware_casts(q.device)[1],
        K_FP8=k_fp8, dtype=tile_dtype(on_interpreter, constants["E4M3_SCALES"]),
        num_warps=launch.num_warps, maxnreg=launch.max_registers, num_stages=launch.num_stages,
    )
    merge_splits(partial_out, partial_lse, out, splits, lse)
    if on_interpreter:
        final_out.copy_(out)
