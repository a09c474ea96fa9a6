"""Paged decode attention that reads the FP4 cache itself (split-K flash decoding, Triton).

Each program takes one sequence, one KV head (with all the query heads that share it) and one
slice of the context: it loads packed K/V tiles, decodes them in registers, and keeps an online
softmax. A second kernel merges the slices. The grid depends only on shapes (batch, heads, the
page table's width), never on sequence lengths, so one CUDA graph serves every step.

Decoding builds tensor-core inputs from bits and exact 16-bit products (no float conversions,
which Hopper runs at a fraction of its arithmetic rate): fp16 for NVFP4, bf16 for E8M0 scales
(see _decoded_tile); the query is cast to that type once per program, and the global scales and the
factor left out of the tiles are applied to the fp32 scores and outputs. The error against SDPA
over the dequantized cache is the query's rounding to that type, the summation order, and the
16-bit rounding of the softmax weights, as in any flash-attention kernel.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .formats import FP4Format, ScaleRule
from .triton_kernels import _e2m1_half, _e4m3_half, global_scale_pair

# (context positions per tile, warps, programs per SM to aim for): tuned on the H100 (README).
DECODE_LAUNCH = (128, 4, 4)
_MIN_GROUP = 16  # tensor-core tiles need at least 16 rows: query heads are padded to this
_POSITIONS_PER_SPLIT_MIN = 256
_MERGE_SPLITS_PER_STEP = 8  # splits the merge kernel reads at once: 8 x D fp32 per program


@triton.jit
def _decoded_tile(data_ptr, scales_ptr, rows, valid, pairs, D: tl.constexpr, BS: tl.constexpr,
                  E4M3_SCALES: tl.constexpr, FP32_TILES: tl.constexpr):
    """Packed rows [N] -> (even, odd) elements [N, D/2] built from bits, with no float conversion.

    NVFP4: fp16 holding e2m1 * s * 2^-14 (the code's bits placed in an fp16 give e2m1 * 2^-14, and
    E4M3 scales are fp16 values; every such product is exact in fp16, down to its smallest
    subnormal). E8M0: bf16 holding e2m1 * 2^e (see _e2m1_times_e8m0_bf16)."""
    packed = tl.load(data_ptr + rows[:, None] * (D // 2) + pairs[None, :], mask=valid[:, None], other=0).to(tl.int16)
    scale_byte = tl.load(scales_ptr + rows[:, None] * (D // BS) + (pairs // (BS // 2))[None, :],
                         mask=valid[:, None], other=0).to(tl.int16)
    lo, hi = packed & 0xF, (packed >> 4) & 0xF
    if E4M3_SCALES:
        scale = _e4m3_half(scale_byte) * 256.0
        scale = tl.where((scale_byte & 0x7F) == 0x7F, float("nan"), scale).to(tl.float16)
        even = _e2m1_half(lo) * scale
        odd = _e2m1_half(hi) * scale
    else:
        even = _e2m1_times_e8m0_bf16(lo, scale_byte, FP32_TILES)
        odd = _e2m1_times_e8m0_bf16(hi, scale_byte, FP32_TILES)
    return even, odd


@triton.jit
def _e2m1_times_e8m0_bf16(code, scale_byte, FP32_TILES: tl.constexpr):
    """E2M1 code times 2^(scale_byte - 127) as bf16: two exact bf16 products.

    The code's bits placed in a bf16 give e2m1 * 2^-126 (as in _e2m1_half); times 2^126, then
    times the scale, whose bits are the byte shifted into the exponent field (byte 0 is the
    subnormal 2^-127, 255 is NaN). Both products are exact wherever the result is a bf16."""
    tiny = ((code & 0x8) << 12) | ((code & 0x7) << 6)
    scale = tl.where(scale_byte == 0, 0x40, tl.where(scale_byte == 255, 0x7FC0, scale_byte << 7))
    if FP32_TILES:  # the interpreter: the same values as float32 (a bf16 is the top half of one)
        tiny = (tiny.to(tl.int32) << 16).to(tl.float32, bitcast=True)
        scale = (scale.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        tiny = tiny.to(tl.int16).to(tl.bfloat16, bitcast=True)
        scale = scale.to(tl.int16).to(tl.bfloat16, bitcast=True)
    return tiny * 8.507059173023462e37 * scale  # 2^126


@triton.jit
def _decode_split_kernel(
    q_ptr, k_data_ptr, k_scales_ptr, v_data_ptr, v_scales_ptr, k_g_ptr, v_g_ptr,
    block_table_ptr, seq_lens_ptr, partial_out_ptr, partial_lse_ptr,
    sm_scale, max_pages, positions_per_split,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, PAGE: tl.constexpr,
    E4M3_SCALES: tl.constexpr, HAS_G: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, FP32_TILES: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if E4M3_SCALES:  # the dtype _decoded_tile builds, and the factor it leaves out
        dtype = tl.float16
        tile_factor = 16384.0
    elif FP32_TILES:
        dtype = tl.float32
        tile_factor = 1.0
    else:
        dtype = tl.bfloat16
        tile_factor = 1.0
    seq_len = tl.load(seq_lens_ptr + b)
    seq_len = tl.minimum(seq_len, max_pages * PAGE)
    start = split * positions_per_split
    end = tl.minimum(start + positions_per_split, seq_len)

    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
    head_ok = tl.arange(0, GROUP_PAD) < GROUP
    pairs = tl.arange(0, D // 2)
    q_rows = (b * HQ + heads).to(tl.int64)[:, None] * D
    q_even = tl.load(q_ptr + q_rows + 2 * pairs[None, :], mask=head_ok[:, None], other=0.0).to(dtype)
    q_odd = tl.load(q_ptr + q_rows + 2 * pairs[None, :] + 1, mask=head_ok[:, None], other=0.0).to(dtype)
    if HAS_G:
        k_g = tl.load(k_g_ptr)
        v_g = tl.load(v_g_ptr)
    else:
        k_g = 1.0
        v_g = 1.0
    score_scale = sm_scale * k_g * tile_factor * 1.4426950408889634  # softmax in base 2

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc_even = tl.zeros([GROUP_PAD, D // 2], tl.float32)
    acc_odd = tl.zeros([GROUP_PAD, D // 2], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        page = tl.load(block_table_ptr + b.to(tl.int64) * max_pages + pos // PAGE, mask=valid, other=0)
        rows = (page.to(tl.int64) * PAGE + pos % PAGE) * HKV + kv_head
        k_even, k_odd = _decoded_tile(k_data_ptr, k_scales_ptr, rows, valid, pairs, D, BS, E4M3_SCALES, FP32_TILES)
        scores = tl.dot(q_even, tl.trans(k_even)) + tl.dot(q_odd, tl.trans(k_odd))  # [GROUP_PAD, BLOCK_N]
        scores = tl.where(valid[None, :], scores * score_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v_even, v_odd = _decoded_tile(v_data_ptr, v_scales_ptr, rows, valid, pairs, D, BS, E4M3_SCALES, FP32_TILES)
        p = p.to(dtype)
        acc_even = acc_even * alpha[:, None] + tl.dot(p, v_even)
        acc_odd = acc_odd * alpha[:, None] + tl.dot(p, v_odd)
        m = m_new

    # Partial results of this split: out = acc / l (times the V global scale), lse in base 2.
    safe_l = tl.where(l > 0, l, 1.0) / (v_g * tile_factor)
    base = ((b * HQ + heads).to(tl.int64) * NUM_SPLITS + split)
    out_rows = base[:, None] * D
    tl.store(partial_out_ptr + out_rows + 2 * pairs[None, :], acc_even / safe_l[:, None], mask=head_ok[:, None])
    tl.store(partial_out_ptr + out_rows + 2 * pairs[None, :] + 1, acc_odd / safe_l[:, None], mask=head_ok[:, None])
    lse = tl.where(l > 0, m + tl.log2(l), float("-inf"))
    tl.store(partial_lse_ptr + base, lse, mask=head_ok)


@triton.jit
def _merge_splits_kernel(partial_out_ptr, partial_lse_ptr, out_ptr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         SPLITS_PER_STEP: tl.constexpr):
    """One (sequence, query head): combine the splits' partial outputs by their log-sum-exps.

    Splits are read SPLITS_PER_STEP at a time with a running maximum, so the registers a program
    needs stay the same however many splits a short batch gets."""
    row = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, D)
    top = tl.full([1], float("-inf"), tl.float32)
    total = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for first in range(0, NUM_SPLITS, SPLITS_PER_STEP):
        splits = first + tl.arange(0, SPLITS_PER_STEP)
        present = splits < NUM_SPLITS
        lse = tl.load(partial_lse_ptr + row * NUM_SPLITS + splits, mask=present, other=float("-inf"))
        new_top = tl.maximum(top, tl.max(lse, axis=0))
        # Rescale what is summed so far; splits that saw no position (lse = -inf) weigh 0.
        rescale = tl.where(new_top > float("-inf"), tl.exp2(top - new_top), 0.0)
        weights = tl.where(lse > float("-inf"), tl.exp2(lse - new_top), 0.0)
        partial = tl.load(partial_out_ptr + (row * NUM_SPLITS + splits)[:, None] * D + dims[None, :],
                          mask=present[:, None], other=0.0)
        acc = acc * rescale + tl.sum(partial * weights[:, None], axis=0)
        total = total * rescale + tl.sum(weights, axis=0)
        top = new_top
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * D + dims, out.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so the merge is exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(batch: int, kv_heads: int, max_len: int, device: torch.device, waves: int) -> int:
    """Enough (sequence, KV head, split) programs to fill the GPU `waves` times, from static sizes only."""
    wanted = triton.cdiv(waves * _sm_count(device), max(1, batch * kv_heads))
    return max(1, min(wanted, triton.cdiv(max_len, _POSITIONS_PER_SPLIT_MIN)))


def decode_attention(out, q, k_data, k_scales, v_data, v_scales, block_table, seq_lens, page_size,
                     fmt: FP4Format, sm_scale, k_global_scale=None, v_global_scale=None):
    batch, hq, d = q.shape
    hkv = k_data.shape[1]
    # On CPU tensors (the Triton interpreter, in CI) bf16 casts and arithmetic are not faithful:
    # there q, the E8M0 tiles and the output stay fp32 (same values), and out is cast at the end.
    on_interpreter = q.device.type == "cpu"
    final_out, q = (out, q.float()) if on_interpreter else (None, q.contiguous())
    if on_interpreter:
        out = torch.empty_like(q)
    block_table = block_table.contiguous()
    max_pages = block_table.shape[1]
    max_len = max_pages * page_size
    block_n, num_warps, waves = DECODE_LAUNCH
    splits = num_splits(batch, hkv, max_len, q.device, waves)
    positions_per_split = triton.cdiv(triton.cdiv(max(max_len, 1), splits), block_n) * block_n
    partial_out = torch.empty((batch, hq, splits, d), dtype=torch.float32, device=q.device)
    partial_lse = torch.empty((batch, hq, splits), dtype=torch.float32, device=q.device)
    group = hq // hkv
    k_global_scale, v_global_scale = global_scale_pair(k_global_scale, v_global_scale, q.device)
    has_g = k_global_scale is not None
    _decode_split_kernel[(batch, hkv, splits)](
        q, k_data, k_scales.view(torch.uint8), v_data, v_scales.view(torch.uint8),
        k_global_scale if has_g else q, v_global_scale if has_g else q,
        block_table, seq_lens, partial_out, partial_lse,
        sm_scale, max_pages, positions_per_split,
        HQ=hq, HKV=hkv, D=d, BS=fmt.block_size, PAGE=page_size,
        E4M3_SCALES=fmt.scale_rule is ScaleRule.E4M3_AMAX_OVER_6G, HAS_G=has_g,
        GROUP=group, GROUP_PAD=max(_MIN_GROUP, triton.next_power_of_2(group)),
        BLOCK_N=block_n, NUM_SPLITS=splits, FP32_TILES=on_interpreter, num_warps=num_warps,
    )
    _merge_splits_kernel[(batch * hq,)](
        partial_out, partial_lse, out, D=d, NUM_SPLITS=splits,
        SPLITS_PER_STEP=min(_MERGE_SPLITS_PER_STEP, triton.next_power_of_2(splits)),
    )
    if on_interpreter:
        final_out.copy_(out)
