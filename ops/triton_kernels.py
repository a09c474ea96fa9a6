"""Triton kernels: the fast path on CUDA GPUs, byte-for-byte equal to eager.py.

The byte contract must hold on the GPU and under the CPU interpreter that CI runs these kernels
with (`TRITON_INTERPRET=1`), whose bf16 and float8 casts and default division round differently.
So divisions are correctly rounded (`div_rn`) or give the same codes and scale bytes as correctly
rounded ones (see _rounding_quotient and blockfp4's scale), format decoding is exact (integer
arithmetic on the bits, or inline PTX on a GPU: triton_codes), and the bf16/float8 output casts
are the hardware's on a GPU (float8 from SM89, see hardware_casts) and written out in integer
arithmetic on the interpreter.

FP8 E4M3 (the keys of a "+k8" recipe) has no blocks to reduce: it is one conversion per element,
which PyTorch's own kernels do on the GPU, so this backend runs eager.py's for it and its bytes are
eager's by construction. decode_attention reads FP8 keys in the Triton kernel (triton_decode).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import eager
from .formats import BLOCKFP4_MIN_SCALE, Element, FP4Format, KVRecipe, ScaleChoice, ScaleRule
from .slots import last_writer_slots
from .triton_codes import (E4M3_MAX_TL, FLT_MAX_TL, bf16_bits, block_scales, decode_packed, e4m3_byte, e4m3_value,
                           fp8_pair, usable_global_scale)
from .triton_launch import fp32_tiles, global_scale_pair, hardware_casts

_BLOCKFP4_MIN_SCALE = tl.constexpr(BLOCKFP4_MIN_SCALE)
_ONE_SIXTH = tl.constexpr(0.1666666716337204)  # 1/6 rounded to float32


class Launch(NamedTuple):
    elements: int  # per program and tensor
    num_warps: int
    max_registers: int | None = None  # per thread (Triton's maxnreg); None: the compiler's choice


# Launch shapes: of the shapes swept at D=128, the one close to the fastest for every recipe, op
# and output dtype at once (docs/performance.md). Quantize by the format's scale choice: a block
# rounded under two scales (4/6) holds twice the live values, so it takes one block per thread
# (1024 elements over 2 warps: 80 registers at sm_90) rather than two (168 registers, half the
# warps an SM can hold).
QUANTIZE_LAUNCH = {
    ScaleChoice.RULE: Launch(elements=1024, num_warps=1),
    ScaleChoice.SMALLER_ERROR_OF_AMAX_OVER_6_AND_4: Launch(elements=1024, num_warps=2),
}
DEQUANTIZE_LAUNCH = Launch(elements=4096, num_warps=4)
# The duplicate-slot rule (slots.py: the last token naming a slot wins) inside the quantize kernel:
# stores of at most MAX_TOKENS_DEDUPLICATED_IN_KERNEL tokens compare each token's slot with every
# later token's (no extra launch in a decode step); larger ones (prefill) first record the last
# token of every named slot in a scratch row per slot (_claim_slots_kernel, two O(T) launches).
NO_DUPLICATES = tl.constexpr(0)  # quantize without loc
COMPARE_LATER_TOKENS = tl.constexpr(1)
CLAIMED_SLOTS = tl.constexpr(2)
MAX_TOKENS_DEDUPLICATED_IN_KERNEL = 1024
_LATER_TOKENS_PER_STEP = tl.constexpr(64)
# Tokens per claim program: small, so a prefill's claims spread over every SM (a claim is one load
# and one atomic: latency, not work, is its cost).
_CLAIM_BLOCK = 128

# The kernels' SCALE_RULE constexpr: formats.ScaleRule's values.
_RULE_E4M3 = tl.constexpr(int(ScaleRule.E4M3_AMAX_OVER_6G))
_RULE_E8M0_CEIL = tl.constexpr(int(ScaleRule.E8M0_CEIL_LOG2_AMAX_OVER_6))
_RULE_E8M0_FLOOR = tl.constexpr(int(ScaleRule.E8M0_FLOOR_LOG2_AMAX_MINUS_2))
# The kernels' SCALE_CHOICE constexpr: formats.ScaleChoice's values.
_CHOICE_4_OVER_6 = tl.constexpr(int(ScaleChoice.SMALLER_ERROR_OF_AMAX_OVER_6_AND_4))
# The kernels' IN_KIND (quantize input dtype) and OUT_KIND (dequantize output dtype) constexprs.
_IN_FP32, _IN_FP16, _IN_BF16 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_OUT_FP32, _OUT_FP16, _OUT_BF16, _OUT_FP8 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
# Output dtype -> (kernel OUT_KIND, the dtype of a word holding two outputs): dequantize kernels
# write each packed byte's two values as one word.
_OUT_KINDS = {
    torch.float32: (_OUT_FP32.value, torch.int64),
    torch.float16: (_OUT_FP16.value, torch.int32),
    torch.bfloat16: (_OUT_BF16.value, torch.int32),
    torch.float8_e4m3fn: (_OUT_FP8.value, torch.int16),
}
_FP16_MAX = tl.constexpr(torch.finfo(torch.float16).max)
_BF16_MAX = tl.constexpr(torch.finfo(torch.bfloat16).max)


@triton.jit
def _clamp_keeping_nan(x, largest: tl.constexpr):
    x = tl.maximum(x, -largest, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, largest, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _saturate(x, OUT_KIND: tl.constexpr):
    """Clamp to the output dtype's largest finite value, NaN kept (eager.cast_output). FP8's
    conversions saturate by themselves."""
    if OUT_KIND == _OUT_FP32:
        x = _clamp_keeping_nan(x, FLT_MAX_TL)
    elif OUT_KIND == _OUT_FP16:
        x = _clamp_keeping_nan(x, _FP16_MAX)
    elif OUT_KIND == _OUT_BF16:
        x = _clamp_keeping_nan(x, _BF16_MAX)
    return x


@triton.jit
def _output_word(lo, hi, OUT_KIND: tl.constexpr, HW_BF16: tl.constexpr, HW_FP8: tl.constexpr):
    """Two float32 values -> one word holding both in the output dtype, `lo` in the low half."""
    if OUT_KIND == _OUT_FP32:
        lo_bits = lo.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        return lo_bits | (hi.to(tl.int32, bitcast=True).to(tl.int64) << 32)
    elif OUT_KIND == _OUT_FP16:
        lo_bits = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return lo_bits | (hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16)
    elif OUT_KIND == _OUT_BF16:
        if HW_BF16:
            lo_bits = lo.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            return lo_bits | (hi.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) << 16)
        return (bf16_bits(lo).to(tl.int32) & 0xFFFF) | (bf16_bits(hi).to(tl.int32) << 16)
    else:  # _OUT_FP8
        return fp8_pair(lo, hi, HW_FP8)


@triton.jit
def _cache_rows(rows, n_rows, loc_ptr, loc_stride, num_slots, H: tl.constexpr, USE_LOC: tl.constexpr):
    """Rows t * H + h of a [T, H, ...] batch -> (in range, has a cache row, its index, head h):
    the index is slot loc[t] with USE_LOC (slots out of range have no row: skipped on store, zeros
    on read), else t."""
    in_range = rows < n_rows
    token = (rows // H).to(tl.int64)
    if USE_LOC:
        slot = tl.load(loc_ptr + token * loc_stride, mask=in_range, other=-1).to(tl.int64)
        has_row = in_range & (slot >= 0) & (slot < num_slots)
        index = slot
    else:
        has_row = in_range
        index = token
    return in_range, has_row, index, (rows % H).to(tl.int64)


# ---- quantize (optionally scattering rows to cache slots) ---------------------------------------


@triton.jit
def _split_pair(word, IN_KIND: tl.constexpr):
    """One load word holding elements 2i (low half) and 2i+1 (high half) -> two float32."""
    if IN_KIND == _IN_FP32:  # fp32 pair in an int64
        lo = word.to(tl.int32).to(tl.float32, bitcast=True)
        hi = (word >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    elif IN_KIND == _IN_FP16:  # fp16 pair in an int32
        lo = word.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (word >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:  # _IN_BF16: a bf16 pair in an int32, each the top half of a float32
        lo = (word << 16).to(tl.float32, bitcast=True)
        hi = (word & -65536).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _e2m1_round(y, TIES_AWAY: tl.constexpr, AT_MOST_6: tl.constexpr):
    """|x| / scale (float32 >= 0) -> (3-bit E2M1 magnitude code, its value), by the float adder's
    rounding.

    E2M1's step is 0.5 below 2 and doubles with each binade above; adding a power of two M whose
    float32 step is that (2^22 below 2, 2^23 in [2, 4), 2^24 in [4, 8)) rounds y onto the grid,
    to even: (y + M) - M is the rounded value (exactly) and bits(y + M) - bits(M) counts the
    steps. Ties away first set y's last mantissa
    bit: a tie moves just above the midpoint, while no other value reaches it (midpoints have few
    bits). Values above 6 (an E4M3 scale rounded down, an MX scale, NaN or inf) clamp to 6 unless
    the scale rule keeps the quotient at most 6 (AT_MOST_6). tests/test_quantize_rounding.py checks
    every float32 in [2^-3, 8) against the thresholds."""
    if not AT_MOST_6:
        y = tl.minimum(y, 6.0, propagate_nan=tl.PropagateNan.NONE)  # minNum: NaN -> 6
    if TIES_AWAY:
        y = (y.to(tl.int32, bitcast=True) | 1).to(tl.float32, bitcast=True)
    magic = (tl.maximum(y, 1.0).to(tl.int32, bitcast=True) & 0x7F800000) + (22 << 23)
    magic_value = magic.to(tl.float32, bitcast=True)
    rounded = y + magic_value
    steps = rounded.to(tl.int32, bitcast=True) - magic
    # y in [2^b, 2^(b+1)) (b = 0 below 2) takes code steps + 2b; magic >> 22 is 298 + 2b.
    return steps + (magic >> 22) - 298, rounded - magic_value


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _unit_scale(d):
    """The power of two that brings a normal float32 d into [1, 2) (a subnormal one to 2^-22 or more)."""
    return ((254 - ((d.to(tl.int32, bitcast=True) >> 23) & 0xFF)) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _unit_divisor(d):
    """A per-block divisor d > 0 prepared for _rounding_quotient, once for all its dividends:
    (scale, d * scale, 1 / (d * scale) rounded to nearest); see there."""
    scale = _unit_scale(d)
    d = d * scale
    return scale, d, tl.math.div_rn(1.0, d)


@triton.jit
def _rounding_quotient(a, scale, d, inverse):
    """A float32 a / d (a >= 0; scale, d, inverse from _unit_divisor of a d > 0, broadcast against
    a) that rounds to the same E2M1 code as the correctly rounded quotient, which eager computes
    (NVFP4's codes).

    a * (1 / d), corrected once with its exact FMA residual (Markstein), is not always the correctly
    rounded quotient, but it is on the same side of every float32 midpoint next to a value of at
    most 5 significant bits (the codes' rounding boundaries): tests/test_quantize_rounding.py checks
    each float32 d in [1, 2) against the dividends nearest every such boundary (only a quotient
    within about 2^-46, relative, of a boundary can land on its other side, and only those
    dividends come that close). Both operands are first scaled by _unit_scale(d), which makes every
    normal d one of those checked and keeps the residual exact; a subnormal d lands in [2^-22, 1),
    where every step is a checked one scaled by a power of two, exactly. An a that overflows there
    gives a NaN quotient, which the callers' minimum maps to the top code, as they map the exact
    quotient; d == 0 gives inf or NaN, which _quantize_rows discards (keep)."""
    a = a * scale
    q = a * inverse
    return tl.fma(tl.fma(q, -d, a), inverse, q)  # -d: negated once per divisor, not per quotient


@triton.jit
def _e4m3_candidate(amax, a_lo, a_hi, g, BLOCK_MAX: tl.constexpr, TIES_AWAY: tl.constexpr):
    """Blocks of |x| (both halves) under the E4M3 scale s that brings amax to BLOCK_MAX, elements
    divided by s * g: (scale byte, s, magnitude codes and their E2M1 values of each half)."""
    byte = e4m3_byte(tl.minimum(tl.math.div_rn(amax, BLOCK_MAX * g), E4M3_MAX_TL))
    s = e4m3_value(byte)
    scale, d, inverse = _unit_divisor((s * g)[:, :, None])
    code_lo, value_lo = _e2m1_round(_rounding_quotient(a_lo, scale, d, inverse), TIES_AWAY, False)
    code_hi, value_hi = _e2m1_round(_rounding_quotient(a_hi, scale, d, inverse), TIES_AWAY, False)
    return byte, s, code_lo, code_hi, value_lo, value_hi


@triton.jit
def _add_neighbours(x):
    """[NB, ROWS, 2n] -> [NB, ROWS, n]: entry i is x[2i] + x[2i + 1]."""
    a, b = tl.split(tl.reshape(x, [x.shape[0], x.shape[1], x.shape[2] // 2, 2]))
    return a + b


@triton.jit
def _dequantized_squared_error(value_lo, value_hi, s, g, a_lo, a_hi, HAS_G: tl.constexpr):
    """eager.dequantized_squared_error of NVFP4 blocks ([NB, ROWS, 8] halves): per block, the
    float32 sum of ((e2m1 * s) * g - |x|)^2, added in eager.pairwise_sum's order. The kernel is
    compiled without FMA contraction here, so each operation rounds on its own, as eager's do."""
    tl.static_assert(value_lo.shape[2] == 8)
    s = s[:, :, None]
    d_lo, d_hi = value_lo * s, value_hi * s
    if HAS_G:
        d_lo, d_hi = d_lo * g, d_hi * g
    d_lo, d_hi = d_lo - a_lo, d_hi - a_hi
    total = _add_neighbours(_add_neighbours(_add_neighbours(d_lo * d_lo + d_hi * d_hi)))
    return tl.reshape(total, [total.shape[0], total.shape[1]])


@triton.jit
def _block_axis(NB: tl.constexpr, BLOCKS: tl.constexpr):
    """A tile's block axis: (arange(BLOCKS), which of them are one of the row's NB blocks). tl.arange
    takes powers of two only, so a head_dim whose block count is none (80, 96: 5 and 6 NVFP4 blocks)
    pads the axis to BLOCKS and masks the padding off every load and store."""
    blocks = tl.arange(0, BLOCKS)
    if BLOCKS == NB:
        real = tl.full([BLOCKS], True, tl.int1)
    else:
        real = blocks < NB
    return blocks, real


@triton.jit
def _quantize_rows(
    x_ptr, x_stride_t, x_stride_h, data_ptr, scales_ptr, g_ptr, rows, in_range, write, dest,
    H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, SCALE_RULE: tl.constexpr, SCALE_CHOICE: tl.constexpr,
    TIES_AWAY: tl.constexpr, SCALE_NAN_BYTE: tl.constexpr, HAS_G: tl.constexpr, IN_KIND: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    """Rows of x (see _cache_rows) into cache rows `dest`. x is read as words of two elements
    (strides in words): pairs give the packed bytes directly. BLOCKS: the row's D / BS blocks
    rounded up to a power of two (_block_axis)."""
    NB: tl.constexpr = D // BS
    HALF: tl.constexpr = BS // 2
    t = (rows // H).to(tl.int64)
    h = (rows % H).to(tl.int64)

    # Tiles are [NB, ROWS, HALF], blocks before rows: the compiler then gives each thread one whole
    # block and a warp's threads neighbouring blocks of a row, so loads and the packed stores are
    # coalesced. As [ROWS, NB, HALF] a warp's threads would take one block of 32 rows each, and
    # every 8-byte store would hit a different sector.
    blocks, real = _block_axis(NB, BLOCKS)
    pairs = blocks[:, None, None] * HALF + tl.arange(0, HALF)[None, None, :]  # [BLOCKS, 1, HALF]
    src = (t * x_stride_t + h * x_stride_h)[None, :, None] + pairs
    words = tl.load(x_ptr + src, mask=in_range[None, :, None] & real[:, None, None], other=0)
    lo, hi = _split_pair(words, IN_KIND)
    a_lo, a_hi = tl.abs(lo), tl.abs(hi)
    amax = tl.reduce(_max_keeping_nan(a_lo, a_hi), 2, _max_keeping_nan)  # [NB, ROWS]; NaN if any is
    finite = amax <= FLT_MAX_TL

    if SCALE_RULE == _RULE_E4M3:  # E4M3 of amax / (6 g)
        if HAS_G:
            g = usable_global_scale(tl.load(g_ptr))
            finite = tl.where(g == g, finite, False)  # a NaN scale stores the block as NaN, as eager does
        else:
            g = 1.0
        byte, s, code_lo, code_hi, value_lo, value_hi = _e4m3_candidate(amax, a_lo, a_hi, g, 6.0, TIES_AWAY)
        if SCALE_CHOICE == _CHOICE_4_OVER_6:  # E4M3 of amax / (4 g) where it dequantizes closer
            byte4, s4, code_lo4, code_hi4, value_lo4, value_hi4 = _e4m3_candidate(amax, a_lo, a_hi, g, 4.0, TIES_AWAY)
            use4 = (_dequantized_squared_error(value_lo4, value_hi4, s4, g, a_lo, a_hi, HAS_G)
                    < _dequantized_squared_error(value_lo, value_hi, s, g, a_lo, a_hi, HAS_G))
            byte, s = tl.where(use4, byte4, byte), tl.where(use4, s4, s)
            code_lo = tl.where(use4[:, :, None], code_lo4, code_lo)
            code_hi = tl.where(use4[:, :, None], code_hi4, code_hi)
        keep = finite & (s * g != 0.0)
    else:
        if SCALE_RULE == _RULE_E8M0_CEIL:  # E8M0 ceil(log2(max(amax / 6, 1e-10)))
            # amax * RN(1/6) for eager's amax / 6: the byte only asks whether the quotient is a
            # power of two and which binade it is in, and both roundings agree on that for every
            # float32 amax (tests/test_quantize_rounding.py).
            v = tl.maximum(amax * _ONE_SIXTH, _BLOCKFP4_MIN_SCALE)
            bits = v.to(tl.int32, bitcast=True)
            byte = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        else:  # _RULE_E8M0_FLOOR: E8M0 floor(log2(amax)) - 2, clamped at byte 0
            byte = tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) - 2, 0)
        # Dividing by a power of two is multiplying by its exact inverse 2^-(byte - 127).
        inverse = ((254 - byte) << 23).to(tl.float32, bitcast=True)[:, :, None]
        # The ceil rule's scale is at least amax / 6 rounded, so no quotient passes 6 by more than
        # a rounding error: the clamp, which matters from 7 on, is skipped.
        at_most_6: tl.constexpr = SCALE_RULE == _RULE_E8M0_CEIL
        code_lo, _ = _e2m1_round(a_lo * inverse, TIES_AWAY, at_most_6)
        code_hi, _ = _e2m1_round(a_hi * inverse, TIES_AWAY, at_most_6)
        keep = finite

    if SCALE_RULE == _RULE_E4M3 and IN_KIND != _IN_FP32:
        # Both sign bits from the 16-bit pair's word at once (bits 15, 31 to 3, 7): fewer
        # instructions for NVFP4, which is bound by instruction issue. With E8M0 scales it is
        # slower (docs/performance.md), so those take each element's sign below.
        shifted = (words >> 12) & 0x80008
        signs = shifted | (shifted >> 12)
        codes = code_lo | (code_hi << 4) | signs
    else:
        code_lo |= (lo.to(tl.int32, bitcast=True) >> 28) & 0x8
        code_hi |= (hi.to(tl.int32, bitcast=True) >> 28) & 0x8
        codes = code_lo | (code_hi << 4)
    packed = tl.where(keep[:, :, None], codes, 0).to(tl.uint8)
    tl.store(data_ptr + dest[None, :, None] * (D // 2) + pairs, packed,
             mask=write[None, :, None] & real[:, None, None])
    byte = tl.where(finite, byte, SCALE_NAN_BYTE).to(tl.uint8)
    tl.store(scales_ptr + dest[None, :] * NB + blocks[:, None], byte, mask=write[None, :] & real[:, None])


@triton.jit
def _quantize_kernel(
    k_ptr, k_stride_t, k_stride_h, k_data_ptr, k_scales_ptr, k_g_ptr,
    v_ptr, v_stride_t, v_stride_h, v_data_ptr, v_scales_ptr, v_g_ptr,
    loc_ptr, loc_stride, last_token_ptr, n_rows, num_slots, H: tl.constexpr,
    D: tl.constexpr, BS: tl.constexpr, SCALE_RULE: tl.constexpr, SCALE_CHOICE: tl.constexpr, TIES_AWAY: tl.constexpr,
    SCALE_NAN_BYTE: tl.constexpr, HAS_G: tl.constexpr, SCATTER: tl.constexpr, DUPLICATES: tl.constexpr,
    ROWS: tl.constexpr, BLOCKS: tl.constexpr,
    IN_KIND: tl.constexpr, WITH_V: tl.constexpr,
):
    """One program quantizes a tile of K's rows and, WITH_V, the same rows of V: the two tiles'
    independent work interleaves in each thread, and their slots are loaded once (faster than K
    and V tiles in separate programs: docs/performance.md)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    in_range, write, index, head = _cache_rows(rows, n_rows, loc_ptr, loc_stride, num_slots, H, SCATTER)
    token = rows // H
    if DUPLICATES == COMPARE_LATER_TOKENS:  # a token whose slot a later token names again is not written
        n_tokens = n_rows // H
        overwritten = tl.zeros([ROWS], tl.int1)
        for first in range(tl.program_id(0) * ROWS // H + 1, n_tokens, _LATER_TOKENS_PER_STEP):
            later = first + tl.arange(0, _LATER_TOKENS_PER_STEP)
            later_slot = tl.load(loc_ptr + later.to(tl.int64) * loc_stride, mask=later < n_tokens, other=-1)
            same = (later_slot.to(tl.int64)[None, :] == index[:, None]) & (later[None, :] > token[:, None])
            overwritten = overwritten | (tl.max(same.to(tl.int32), axis=1) > 0)
        write = write & ~overwritten
    elif DUPLICATES == CLAIMED_SLOTS:
        write = write & (tl.load(last_token_ptr + index, mask=write, other=-1) == token)
    dest = index * H + head  # the cache is contiguous [slots, H, ...]
    _quantize_rows(k_ptr, k_stride_t, k_stride_h, k_data_ptr, k_scales_ptr, k_g_ptr, rows, in_range, write, dest,
                   H, D, BS, SCALE_RULE, SCALE_CHOICE, TIES_AWAY, SCALE_NAN_BYTE, HAS_G, IN_KIND, BLOCKS)
    if WITH_V:
        _quantize_rows(v_ptr, v_stride_t, v_stride_h, v_data_ptr, v_scales_ptr, v_g_ptr, rows, in_range, write, dest,
                       H, D, BS, SCALE_RULE, SCALE_CHOICE, TIES_AWAY, SCALE_NAN_BYTE, HAS_G, IN_KIND, BLOCKS)


@triton.jit
def _claim_slots_kernel(loc_ptr, loc_stride, n_tokens, num_slots, last_token_ptr, CLAIM: tl.constexpr,
                        BLOCK: tl.constexpr):
    """Run twice: first (CLAIM false) every slot named in loc gets -1, then the largest token naming it."""
    token = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(loc_ptr + token.to(tl.int64) * loc_stride, mask=token < n_tokens, other=-1).to(tl.int64)
    named = (token < n_tokens) & (slot >= 0) & (slot < num_slots)
    if CLAIM:
        tl.atomic_max(last_token_ptr + slot, token, mask=named)
    else:
        tl.store(last_token_ptr + slot, tl.full([BLOCK], -1, tl.int32), mask=named)


def _claim_slots(loc: torch.Tensor, tokens: int, num_slots: int) -> torch.Tensor:
    """int32 [num_slots] holding, for each slot named in loc, the last token naming it (other
    entries are never written nor read: the allocation is not cleared)."""
    last_token = torch.empty(num_slots, dtype=torch.int32, device=loc.device)
    for claim in (False, True):
        _claim_slots_kernel[(triton.cdiv(tokens, _CLAIM_BLOCK),)](
            loc, loc.stride(0), tokens, num_slots, last_token, CLAIM=claim, BLOCK=_CLAIM_BLOCK)
    return last_token


# ---- dequantize (optionally gathering rows from cache slots) ------------------------------------


@triton.jit
def _dequantize_kernel(
    data_ptr, data_stride_row, data_stride_head, data_stride_byte,
    scales_ptr, scales_stride_row, scales_stride_head, scales_stride_block,
    g_ptr, loc_ptr, loc_stride, out_ptr,
    n_rows, num_slots, H: tl.constexpr,
    D: tl.constexpr, BS: tl.constexpr, E4M3_SCALES: tl.constexpr, HAS_G: tl.constexpr,
    GATHER: tl.constexpr, OUT_KIND: tl.constexpr, ROWS: tl.constexpr, BLOCKS: tl.constexpr, FP32_TILES: tl.constexpr,
    HW_BF16: tl.constexpr, HW_FP8: tl.constexpr,
):
    """Packed rows [index, head] (any strides: engines pass head slices of a cache) -> out rows."""
    NB: tl.constexpr = D // BS
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    in_range, read, index, head = _cache_rows(rows, n_rows, loc_ptr, loc_stride, num_slots, H, GATHER)

    # [NB, ROWS, HALF] tiles, as in _quantize_rows: one block's bytes per thread, a warp's threads
    # on neighbouring blocks, and each scale byte loaded once per block by the thread that applies it
    # (no values cross shared memory).
    blocks, real = _block_axis(NB, BLOCKS)
    pairs = blocks[:, None, None] * (BS // 2) + tl.arange(0, BS // 2)[None, None, :]  # [BLOCKS, 1, HALF]
    data_row = index * data_stride_row + head * data_stride_head
    packed = tl.load(data_ptr + data_row[None, :, None] + pairs * data_stride_byte,
                     mask=read[None, :, None] & real[:, None, None], other=0)
    scales_row = index * scales_stride_row + head * scales_stride_head
    scale_byte = tl.load(scales_ptr + scales_row[None, :] + blocks[:, None] * scales_stride_block,
                         mask=read[None, :] & real[:, None], other=0)
    # e2m1 * scale is exact in 16 bits (fp16 for E4M3 scales, bf16 for E8M0), which the decode PTX
    # computes for four bytes at once on a GPU (float32 arithmetic on the interpreter); the global
    # scale then rounds in float32, as in eager.
    scale = tl.broadcast_to(block_scales(scale_byte, E4M3_SCALES, FP32_TILES, HW_FP8)[:, :, None], packed.shape)
    lo, hi = decode_packed(packed, scale, E4M3_SCALES, FP32_TILES)
    lo = lo.to(tl.float32)
    hi = hi.to(tl.float32)
    if HAS_G:
        g = usable_global_scale(tl.load(g_ptr))
        lo = lo * g
        hi = hi * g
    lo, hi = _saturate(lo, OUT_KIND), _saturate(hi, OUT_KIND)
    dest = rows.to(tl.int64)[None, :, None] * (D // 2) + pairs
    tl.store(out_ptr + dest, _output_word(lo, hi, OUT_KIND, HW_BF16, HW_FP8),
             mask=in_range[None, :, None] & real[:, None, None])


# ---- launchers ----------------------------------------------------------------------------------


def _rows_per_program(elements: int, head_dim: int) -> int:
    """Rows a program takes: about `elements` worth, a power of two (tl.arange's)."""
    return 1 << (max(1, elements // head_dim).bit_length() - 1)


def _blocks(head_dim: int, fmt: FP4Format) -> int:
    """The kernels' BLOCKS: a row's blocks rounded up to a power of two (_block_axis)."""
    return triton.next_power_of_2(head_dim // fmt.block_size)


# Input dtype -> (kernel IN_KIND, the dtype of a word holding two elements).
_IN_KINDS = {
    torch.float32: (_IN_FP32.value, torch.int64),
    torch.float16: (_IN_FP16.value, torch.int32),
    torch.bfloat16: (_IN_BF16.value, torch.int32),
}


def _as_words(x: torch.Tensor) -> torch.Tensor:
    """[T, H, D] viewed as [T, H, D/2] words of two elements (copied first if it cannot be)."""
    word = _IN_KINDS[x.dtype][1]
    try:
        return x.view(word)
    except RuntimeError:  # last axis not contiguous, or an odd stride or offset
        return x.contiguous().view(word)


def _launch_quantize(k, v, k_data, v_data, k_scales, v_scales, k_g, v_g, loc, fmt: FP4Format, num_slots: int):
    """k, v: [T, H, D]; v may be None (then K alone). With loc (any stride), rows go to its slots,
    the last token naming a slot winning."""
    t, h, d = k.shape
    duplicates, last_token = NO_DUPLICATES, k_data
    if loc is not None and t <= MAX_TOKENS_DEDUPLICATED_IN_KERNEL:
        duplicates = COMPARE_LATER_TOKENS
    elif loc is not None:
        duplicates, last_token = CLAIMED_SLOTS, _claim_slots(loc, t, num_slots)
    launch = QUANTIZE_LAUNCH[fmt.scale_choice]
    rows = _rows_per_program(launch.elements, d)
    n_rows = t * h
    with_v = v is not None
    if not with_v:
        v, v_data, v_scales, v_g = k, k_data, k_scales, k_g
    k_words, v_words = _as_words(k), _as_words(v)
    has_g = k_g is not None
    grid = (triton.cdiv(n_rows, rows),)
    _quantize_kernel[grid](
        k_words, k_words.stride(0), k_words.stride(1), k_data, k_scales.view(torch.uint8), k_g if has_g else k,
        v_words, v_words.stride(0), v_words.stride(1), v_data, v_scales.view(torch.uint8), v_g if has_g else v,
        loc if loc is not None else k_data, loc.stride(0) if loc is not None else 0, last_token, n_rows, num_slots, H=h,
        D=d, BS=fmt.block_size, SCALE_RULE=int(fmt.scale_rule), SCALE_CHOICE=int(fmt.scale_choice),
        TIES_AWAY=fmt.ties_away, SCALE_NAN_BYTE=fmt.scale_nan_byte, HAS_G=has_g, SCATTER=loc is not None,
        DUPLICATES=duplicates, ROWS=rows, BLOCKS=_blocks(d, fmt), IN_KIND=_IN_KINDS[k.dtype][0], WITH_V=with_v,
        num_warps=launch.num_warps, maxnreg=launch.max_registers,
        # A chosen scale compares float32 errors that must round as eager's: no mul-add fused.
        enable_fp_fusion=fmt.scale_choice is ScaleChoice.RULE,
    )


def quantize(x, fmt: FP4Format, global_scale=None):
    if fmt.element is Element.E4M3:
        return eager.quantize(x, fmt, global_scale)
    d = x.shape[-1]
    flat = x.reshape(-1, 1, d)
    data = torch.empty((flat.shape[0], 1, d // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((flat.shape[0], 1, d // fmt.block_size), dtype=torch.uint8, device=x.device)
    _launch_quantize(flat, None, data, None, scales, None, global_scale, None, None, fmt, flat.shape[0])
    return data.view(*x.shape[:-1], d // 2), scales.view(*x.shape[:-1], d // fmt.block_size)


def quantize_and_store(k_data, v_data, k_scales, v_scales, loc, k, v, kv_recipe: KVRecipe, k_global_scale=None,
                       v_global_scale=None):
    if kv_recipe.k.element is Element.E4M3:  # FP8 keys by eager's kernels (see the top), V by the kernel alone
        if k_data.shape[0]:
            eager.store(k_data, k_scales, last_writer_slots(loc, k_data.shape[0]), k, kv_recipe.k, k_global_scale)
        store_fp4(v_data, v_scales, loc, v, kv_recipe.v, v_global_scale)
        return
    k_global_scale, v_global_scale = global_scale_pair(k_global_scale, v_global_scale, k.device)
    _launch_quantize(
        k, v, k_data, v_data, k_scales, v_scales,
        k_global_scale, v_global_scale, loc, kv_recipe.v, k_data.shape[0],
    )


def store_fp4(data, scales, loc, x, fmt: FP4Format, global_scale=None) -> None:
    """One FP4 tensor x [T, H, D] into the cache rows named by loc [T] (slots.py's rule, applied in
    the quantize kernel): V beside FP8 keys, and the latent of an MLA cache (triton_mla)."""
    _launch_quantize(x, None, data, None, scales, None, global_scale, None, loc, fmt, data.shape[0])


def _launch_dequantize(data, scales, loc, fmt: FP4Format, global_scale, dtype, out_rows: int):
    """data [rows or slots, H, D/2] and scales [.., H, D/block], any strides -> [out_rows * H, D]."""
    h, d = data.shape[1], data.shape[2] * 2
    rows = _rows_per_program(DEQUANTIZE_LAUNCH.elements, d)
    out = torch.empty((out_rows * h, d), dtype=dtype, device=data.device)
    out_kind, view_dtype = _OUT_KINDS[dtype]
    hw_bf16, hw_fp8 = hardware_casts(data.device)
    has_g = global_scale is not None
    scales = scales.view(torch.uint8)
    _dequantize_kernel[(triton.cdiv(out_rows * h, rows),)](
        data, *data.stride(), scales, *scales.stride(), global_scale if has_g else data,
        loc if loc is not None else data, loc.stride(0) if loc is not None else 0,
        out.view(view_dtype), out_rows * h, data.shape[0], H=h,
        D=d, BS=fmt.block_size, E4M3_SCALES=fmt.e4m3_scales,
        HAS_G=has_g, GATHER=loc is not None, OUT_KIND=out_kind, ROWS=rows, BLOCKS=_blocks(d, fmt),
        FP32_TILES=fp32_tiles(data.device),
        HW_BF16=hw_bf16, HW_FP8=hw_fp8, num_warps=DEQUANTIZE_LAUNCH.num_warps,
    )
    return out


def dequantize(data, scales, fmt: FP4Format, global_scale=None, dtype=torch.bfloat16):
    if fmt.element is Element.E4M3:
        return eager.dequantize(data, scales, fmt, global_scale, dtype)
    d = data.shape[-1] * 2
    flat = data.reshape(-1, 1, data.shape[-1])  # a view where the strides allow one
    out = _launch_dequantize(flat, scales.reshape(-1, 1, scales.shape[-1]), None, fmt, global_scale, dtype,
                             flat.shape[0])
    return out.view(*data.shape[:-1], d)


def gather_dequantize(data, scales, loc, fmt: FP4Format, global_scale=None, dtype=torch.bfloat16):
    if fmt.element is Element.E4M3:
        return eager.gather_dequantize(data, scales, loc, fmt, global_scale, dtype)
    slots, h, half_d = data.shape
    out = _launch_dequantize(data, scales, loc, fmt, global_scale, dtype, loc.shape[0])
    return out.view(loc.shape[0], h, half_d * 2)
