"""The latent-cache (MLA) ops in Triton: the store, and a split-K paged decode that reads the FP4
latent directly.

Store: the latent is a one-head FP4 cache, stored by the MHA quantize kernel (triton_kernels.store_fp4,
slot rules in the kernel); k_pe is FP8 E4M3, one conversion per element, stored by eager's kernel
as the "+k8" keys are (triton_kernels' docstring).

Decode: one program per (sequence, block of BLOCK_H query heads x value part, split of the
context). At 128 heads the decode is compute-bound (per position 128 x (R + P + R) multiply-adds
against a few hundred bytes), so the kernel is shaped for the tensor cores: the heads are the
products' M side (whole wgmma tiles of 64 rows a warpgroup), q is read from shared memory, and
each latent tile is decoded once per program into the operand the products read from shared
memory: scores = q_nope latent^T (+ q_pe k_pe^T, FP8 keys) and out += p latent. VALUE_PARTS
programs share a head block, each owning R / VALUE_PARTS output columns (FlashMLA splits the value
columns the same way), so the fp32 output fits in registers. The next tile's bytes are loaded
before this one is decoded (one program per SM leaves few warps to hide the loads' latency). The
splits fill the SMs in whole waves (mla_num_splits); one split writes `out` and `lse` itself.
attention_shared's rules do the rest: the page table (paged_rows), the merge of several splits by
log-sum-exp, the interpreter's float32 staging. The grid depends on shapes only, so one CUDA graph
serves every step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import eager
from .attention_shared import (LN_2, POSITIONS_PER_SPLIT_MIN, context_len, global_scales, interpreter_fp32,
                               merge_splits, mma_side, paged_rows, positions_per_split, sm_count, split_lse,
                               split_outputs, split_range)
from .formats import LatentRecipe
from .paged_latent import PagedLatent
from .slots import last_writer_slots
from .triton_attention_tiles import decode_values, fp8_rows, fp8_words, kernel_inputs, value_words, word_bytes
from .triton_kernels import store_fp4
from .triton_launch import global_scale_pair


class MLALaunch(NamedTuple):
    block_h: int  # query heads per program (at most; mma_side of Hq below it)
    block_n: int  # context positions per tile
    num_warps: int
    waves: int  # the most programs per SM that mla_num_splits weighs when splitting the context
    value_parts: int  # 1 or 2 programs share a head block, each owning R / value_parts output columns


# 128 heads on 8 warps, each program owning half the output columns: Triton gives a dot whose result
# feeds another all its warps along M, so only 128 heads make both products whole wgmma tiles (64
# rows a warpgroup), and the [128, R / 2] fp32 output then takes 128 registers a thread. Both
# halves decode the whole latent tile (the scores need it). One program per SM (the registers), so
# the splits aim at whole waves of them.
MLA_LAUNCH = MLALaunch(block_h=128, block_n=32, num_warps=8, waves=2, value_parts=2)


_TORCH_TYPES = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16}


def mla_store(latent_data, latent_scales, rope_data, loc, c_kv, k_pe, fmt: LatentRecipe, latent_global_scale=None,
              rope_global_scale=None) -> None:
    if latent_data.shape[0] == 0:  # no slot to write (eager.store would index an empty cache)
        return
    store_fp4(latent_data, latent_scales, loc, c_kv[:, None], fmt.latent, latent_global_scale)
    eager.store(rope_data, rope_data.new_empty((*rope_data.shape[:2], 0)), last_writer_slots(loc, rope_data.shape[0]),
                k_pe[:, None], fmt.rope, rope_global_scale)


@triton.jit
def _tile_rows(block_table_ptr, b, max_pages, num_pages, n0, end, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """(readable, cache rows) of positions [n0, n0 + BLOCK_N) of sequence b below `end`."""
    pos = n0 + tl.arange(0, BLOCK_N)
    return paged_rows(block_table_ptr, b, max_pages, num_pages, pos, pos < end, PAGE, 1, 0)


@triton.jit
def _mla_decode_split_kernel(
    q_ptr, latent_data_ptr, latent_scales_ptr, rope_data_ptr, rope_g_ptr, latent_g_ptr,
    block_table_ptr, seq_lens_ptr, partial_out_ptr, partial_lse_ptr,
    sm_scale, max_pages, num_pages, positions_per_split,
    HQ: tl.constexpr, R: tl.constexpr, P: tl.constexpr, BS: tl.constexpr, PAGE: tl.constexpr,
    E4M3_SCALES: tl.constexpr, HAS_G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    VALUE_PARTS: tl.constexpr, NUM_SPLITS: tl.constexpr, FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr,
    dtype: tl.constexpr,
):
    """One (sequence, head block x value part, split): the scores over all R + P key columns, the
    output's R / VALUE_PARTS columns of its part. q is in the tiles' type (the launcher casts it:
    a cast in the kernel would keep q_nope in registers as the wgmma A operand, 128 a thread);
    rope_data_ptr holds k_pe as int16 words (kernel_inputs). With NUM_SPLITS 1 the partial
    pointers are `out` and `lse`, and the natural log-sum-exp is stored here (no merge writes it)."""
    VC: tl.constexpr = R // VALUE_PARTS  # output columns per program
    b = tl.program_id(0)
    heads = tl.program_id(1) // VALUE_PARTS * BLOCK_H + tl.arange(0, BLOCK_H)
    own = tl.program_id(1) % VALUE_PARTS * VC  # the first of this program's output columns
    other = VC - own  # with two parts, the other part's first column
    split = tl.program_id(2)
    seq_len = context_len(tl.load(seq_lens_ptr + b), max_pages, PAGE)
    start, end = split_range(split, positions_per_split, seq_len)

    head_ok = heads < HQ
    q_row = q_ptr + (b * HQ + heads).to(tl.int64)[:, None] * (R + P)
    q_own = tl.load(q_row + own + tl.arange(0, VC)[None, :], mask=head_ok[:, None], other=0.0)
    q_pe = tl.load(q_row + R + tl.arange(0, P)[None, :], mask=head_ok[:, None], other=0.0)
    if VALUE_PARTS == 2:
        q_other = tl.load(q_row + other + tl.arange(0, VC)[None, :], mask=head_ok[:, None], other=0.0)
    # attention_shared.global_scales for each part of the keys: the latent (scores and values), k_pe.
    latent_score_scale, _ = global_scales(sm_scale, latent_g_ptr, rope_g_ptr, HAS_G)
    rope_score_scale, latent_g = global_scales(sm_scale, rope_g_ptr, latent_g_ptr, HAS_G)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_acc = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)  # softmax denominators, per position until the end
    acc = tl.zeros([BLOCK_H, VC], tl.float32)
    # Each tile's bytes are loaded one iteration ahead: one program per SM leaves few warps to hide
    # the loads' latency behind. Past `end` the loads are masked off (no memory traffic).
    in_cache, rows = _tile_rows(block_table_ptr, b, max_pages, num_pages, start, end, PAGE, BLOCK_N)
    own_packed, own_scales = value_words(latent_data_ptr, latent_scales_ptr, rows, in_cache, own, VC, R, BS)
    if VALUE_PARTS == 2:
        other_packed, other_scales = value_words(latent_data_ptr, latent_scales_ptr, rows, in_cache, other, VC, R, BS)
    rope_words = fp8_words(rope_data_ptr, rows, in_cache, P)
    for n0 in range(start, end, BLOCK_N):
        in_cache, rows = _tile_rows(block_table_ptr, b, max_pages, num_pages, n0 + BLOCK_N, end, PAGE, BLOCK_N)
        next_own_packed, next_own_scales = value_words(latent_data_ptr, latent_scales_ptr, rows, in_cache, own, VC, R,
                                                       BS)
        if VALUE_PARTS == 2:
            next_other_packed, next_other_scales = value_words(latent_data_ptr, latent_scales_ptr, rows, in_cache,
                                                               other, VC, R, BS)
        next_rope_words = fp8_words(rope_data_ptr, rows, in_cache, P)

        # The latent's own columns: keys of the scores and this program's values, decoded once.
        latent = decode_values(word_bytes(own_packed, BS), own_scales, E4M3_SCALES, FP32_TILES, HW_FP8)  # [BLOCK_N, VC]
        scores = tl.dot(q_own, tl.trans(latent))  # [BLOCK_H, BLOCK_N]
        if VALUE_PARTS == 2:
            other_latent = decode_values(word_bytes(other_packed, BS), other_scales, E4M3_SCALES, FP32_TILES, HW_FP8)
            scores = tl.dot(q_other, tl.trans(other_latent), scores)
        rope = fp8_rows(rope_words, FP32_TILES, HW_FP8, dtype)  # [BLOCK_N, P]
        scores = scores * latent_score_scale + tl.dot(q_pe, tl.trans(rope)) * rope_score_scale
        scores = tl.where((n0 + tl.arange(0, BLOCK_N) < end)[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_acc = l_acc * alpha[:, None] + p
        acc = tl.dot(p.to(dtype), latent, acc * alpha[:, None])
        m = m_new
        own_packed, own_scales, rope_words = next_own_packed, next_own_scales, next_rope_words
        if VALUE_PARTS == 2:
            other_packed, other_scales = next_other_packed, next_other_scales

    l = tl.sum(l_acc, axis=1)
    out = acc / (tl.where(l > 0, l, 1.0) / latent_g)[:, None]
    rows = (b * HQ + heads).to(tl.int64)
    # attention_shared.split_outputs' places: [B, Hq, NUM_SPLITS, R]; one split writes out [B, Hq, R].
    tl.store(partial_out_ptr + (rows * NUM_SPLITS + split)[:, None] * R + own + tl.arange(0, VC)[None, :],
             out.to(partial_out_ptr.dtype.element_ty), mask=head_ok[:, None])
    # The parts' scores sum the same products (in another order: each starts from its own columns),
    # so part 0's log-sum-exp stands for all.
    if own == 0:
        if NUM_SPLITS > 1:
            tl.store(partial_lse_ptr + rows * NUM_SPLITS + split, split_lse(m, l), mask=head_ok)
        else:
            tl.store(partial_lse_ptr + rows, split_lse(m, l) * LN_2, mask=head_ok)


def mla_num_splits(batch: int, programs: int, max_len: int, device, waves: int) -> int:
    """Splits of the context for the `programs` programs per sequence of a decode, one program per
    SM at a time: of 1 up to `waves` SMs' worth, the count whose rounds of programs per split
    length, cdiv(programs x splits, SMs) / splits, is least (the fewest splits on a tie, each
    split at least POSITIONS_PER_SPLIT_MIN long): whole waves, no nearly empty last one."""
    programs, sms = max(1, batch * programs), sm_count(device)
    most = max(1, min(triton.cdiv(waves * sms, programs), triton.cdiv(max_len, POSITIONS_PER_SPLIT_MIN)))
    return min(range(1, most + 1), key=lambda splits: (triton.cdiv(programs * splits, sms) / splits, splits))


def mla_decode_attention(out, lse, q, cache: PagedLatent, fmt: LatentRecipe, sm_scale: float) -> None:
    """The Triton kernel: every CUDA GPU from SM80, any head count, page size and recipe."""
    kv, tiles = kernel_inputs(cache.as_paged_kv(), fmt.as_kv_recipe(), q.device)
    batch, hq, _ = q.shape
    rank, rope_dim = out.shape[2], q.shape[2] - out.shape[2]
    block_h = min(MLA_LAUNCH.block_h, mma_side(hq))
    programs = triton.cdiv(hq, block_h) * MLA_LAUNCH.value_parts  # per sequence and split
    splits = mla_num_splits(batch, programs, kv.max_len, q.device, MLA_LAUNCH.waves)
    positions = positions_per_split(kv.max_len, splits, MLA_LAUNCH.block_n)
    rope_g, latent_g = global_scale_pair(kv.k_global_scale, kv.v_global_scale, q.device)
    has_g = rope_g is not None
    with interpreter_fp32(out, q) as (out, q):
        partial_out, partial_lse = split_outputs(out, splits) if splits > 1 else (out, lse)
        q = q.to(_TORCH_TYPES[tiles["dtype"]]).contiguous()  # the kernel's docstring: why here
        _mla_decode_split_kernel[(batch, programs, splits)](
            q, kv.v_data, kv.v_scales.view(torch.uint8), kv.k_data, rope_g if has_g else q,
            latent_g if has_g else q, kv.block_table.contiguous(), kv.seq_lens.contiguous(), partial_out, partial_lse,
            sm_scale, kv.max_pages, kv.num_pages, positions,
            HQ=hq, R=rank, P=rope_dim, BS=fmt.latent.block_size, PAGE=kv.page_size, E4M3_SCALES=fmt.latent.e4m3_scales,
            HAS_G=has_g, BLOCK_H=block_h, BLOCK_N=MLA_LAUNCH.block_n, VALUE_PARTS=MLA_LAUNCH.value_parts,
            NUM_SPLITS=splits, FP32_TILES=tiles["FP32_TILES"], HW_FP8=tiles["HW_FP8"], dtype=tiles["dtype"],
            num_warps=MLA_LAUNCH.num_warps,
        )
        merge_splits(partial_out, partial_lse, out, splits, lse)
