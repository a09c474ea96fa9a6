"""Format codes in Triton, shared by the quantize, dequantize and attention kernels.

Scalar encodings and decodings (E4M3, E8M0, E2M1, bf16, FP8 output) as integer arithmetic on the
bits, which the CPU interpreter runs exactly as the GPU does; on GPUs, inline PTX where it saves
instructions: the decode of packed bytes into exact 16-bit values (e2m1 * scale, see _decode_ptx,
in the type tile_dtype names) and FP8 output pairs in one conversion. The global scale's rule
(usable_global_scale) is here too: every kernel that reads a global scale applies it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .formats import E4M3_MAX

E4M3_MAX_TL = tl.constexpr(E4M3_MAX)
FLT_MAX_TL = tl.constexpr(3.4028234663852886e38)  # float32's largest finite value


@triton.jit
def usable_global_scale(g):
    """eager.usable_global_scale: a global scale that is not finite and > 0 becomes NaN."""
    return tl.where((g > 0.0) & (g <= FLT_MAX_TL), g, float("nan"))


# ---- scalar encodings ---------------------------------------------------------------------------


@triton.jit
def e4m3_byte(v):
    """float32 in [0, 448] -> E4M3 byte, round to nearest even."""
    bits = v.to(tl.int32, bitcast=True)
    rounded = bits + 0x7FFFF + ((bits >> 20) & 1)  # keep 3 mantissa bits
    normal = (((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)
    # Below 2^-6 the step is 2^-9: the float adder rounds v * 2^9 to an integer, ties to even.
    subnormal = ((v * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    return tl.where(bits >= (121 << 23), normal, subnormal)


@triton.jit
def _e4m3_half(byte):
    """E4M3 byte -> fp16 holding value / 2^8: the byte's bits shifted into an fp16 (NaN not handled)."""
    return (((byte & 0x80) << 8) | ((byte & 0x7F) << 7)).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def e4m3_value(byte):
    """E4M3 byte -> float32."""
    value = _e4m3_half(byte).to(tl.float32) * 256.0
    return tl.where((byte & 0x7F) == 0x7F, float("nan"), value)


@triton.jit
def _e8m0_value(byte):
    """E8M0 byte -> float32 2^(byte - 127); 255 is NaN."""
    bits = tl.where(byte == 0, 0x400000, byte << 23)
    return tl.where(byte == 255, float("nan"), bits.to(tl.float32, bitcast=True))


@triton.jit
def _e2m1_half(code):
    """4-bit E2M1 code -> fp16 holding value / 2^14: sign and magnitude bits placed in an fp16."""
    return (((code & 0x8) << 12) | ((code & 0x7) << 9)).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _e2m1_value(code):
    """4-bit E2M1 code -> float32."""
    return _e2m1_half(code).to(tl.float32) * 16384.0


@triton.jit
def bf16_bits(v):
    """float32 -> bf16 bits, round to nearest even; NaN -> 0x7FC0 (as PyTorch does)."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(v != v, 0x7FC0, rounded).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _fp8_byte(v):
    """float32 -> E4M3 byte from the bits, saturating at +-448; NaN -> 0x7F with its sign."""
    magnitude = e4m3_byte(tl.minimum(tl.abs(v), E4M3_MAX_TL))
    sign = (v.to(tl.uint32, bitcast=True) >> 24).to(tl.int32) & 0x80
    return tl.where(v != v, 0x7F, magnitude) | sign


# Two float32 -> an E4M3 pair in one conversion (SM89+): saturating at +-448 (inf too), NaN to NaN
# (0x7F on the H100; the PTX ISA: NaN in, NaN out).
_E4M3_PAIR_PTX = tl.constexpr("cvt.rn.satfinite.e4m3x2.f32 $0, $2, $1;")


@triton.jit
def fp8_pair(lo, hi, HW_FP8: tl.constexpr):
    """Two float32 -> one int16 holding both as E4M3, `lo` in the low byte; saturating at +-448,
    NaN stays NaN (0x7F from the conversion, 0x7F with the NaN's sign from the bits: NaN payloads
    are not contract). Without HW_FP8 (the interpreter, GPUs before SM89), from the bits."""
    if HW_FP8:
        return tl.inline_asm_elementwise(_E4M3_PAIR_PTX, "=h,r,r", [lo, hi], dtype=tl.int16, is_pure=True, pack=1)
    return (_fp8_byte(lo) | (_fp8_byte(hi) << 8)).to(tl.int16)


# ---- packed bytes to exact 16-bit values ---------------------------------------------------------


def _table_lookup(name: str, table_bytes) -> list[str]:
    """PTX that reads byte table[code] for the four 3-bit codes in `codes` (and in `codes_hi`):
    prmt picks bytes of two words by 4-bit selectors, so eight entries fit in two registers."""
    table = bytes(table_bytes)
    return [f"mov.b32 ta, 0x{int.from_bytes(table[:4], 'little'):08X};",
            f"mov.b32 tb, 0x{int.from_bytes(table[4:], 'little'):08X};",
            f"prmt.b32 {name}_lo, ta, tb, codes;",
            f"prmt.b32 {name}_hi, ta, tb, codes_hi;"]


def _decode_ptx(high_bytes, low_bytes, multiply: str) -> str:
    """Inline PTX: four packed bytes (eight E2M1 codes) and their scales -> eight 16-bit values.

    Operands: $0 $1 the even elements (of bytes 0-1, 2-3), $2 $3 the odd ones, $4 the four bytes,
    $5 $6 the four bytes' scales as 16-bit pairs. The magnitude codes index byte tables for each
    value's high byte and (bf16 only) low byte; a shuffle puts two values in a word, the sign bits
    of a byte pair get there with at most one shift, and one packed multiply applies the scales.
    About 25 instructions for the eight values (ptxas folds the table words into the prmts)."""
    lines = [
        ".reg .b32 codes, codes_hi, high_lo, high_hi, low_lo, low_hi, signs_lo, signs_hi, shifted, t, ta, tb;",
        *([".reg .b32 negative_zero;", "mov.b32 negative_zero, 0x80008000;"] if "negative_zero" in multiply else []),
        "and.b32 codes, $4, 0x77777777;",  # magnitude codes: bits 2..0 of each nibble
        "shr.u32 codes_hi, codes, 16;",
        *_table_lookup("high", high_bytes),
        *(["mov.b32 low_lo, 0;", "mov.b32 low_hi, 0;"] if low_bytes is None else _table_lookup("low", low_bytes)),
        # Bytes 0, 1 (2, 3) moved to bits 15..8 and 31..24: the odd codes' sign bits land on bits 15
        # and 31, where a 16-bit pair keeps them, and the even codes' 4 bits lower.
        "prmt.b32 signs_lo, $4, 0, 0x1404;",
        "prmt.b32 signs_hi, $4, 0, 0x3424;",
    ]
    for out, (half, selector, shift) in enumerate((
        ("lo", "0x6240", 4),  # even codes of bytes 0, 1: table bytes 0 and 2 (low, high each)
        ("hi", "0x6240", 4),  # even codes of bytes 2, 3
        ("lo", "0x7351", 0),  # odd codes of bytes 0, 1: table bytes 1 and 3
        ("hi", "0x7351", 0),  # odd codes of bytes 2, 3
    )):
        signs = f"signs_{half}"
        if shift:
            lines.append(f"shl.b32 shifted, {signs}, {shift};")
            signs = "shifted"
        lines += [f"prmt.b32 t, low_{half}, high_{half}, {selector};",
                  f"lop3.b32 t, t, {signs}, 0x80008000, 0xF8;",  # t | (signs & 0x80008000)
                  multiply.format(out=f"${out}", value="t", scale=f"${5 + out % 2}")]
    return "{\n" + "\n".join(lines) + "\n}"


# NVFP4: fp16 tiles. Every E2M1 value is an fp16 whose low byte is zero, and E4M3 scales are fp16
# values: their product is exact (at most 6 significant bits, 2^-10 to 2688).
_NVFP4_TABLE_DECODE_PTX = tl.constexpr(_decode_ptx(
    [0x00, 0x38, 0x3C, 0x3E, 0x40, 0x42, 0x44, 0x46], None, "mul.rn.f16x2 {out}, {value}, {scale};"))
# E8M0 scales: bf16 tiles (their range), the scale 2^(byte - 127) a bf16 too; the product, a power
# of two times an E2M1 value, is exact down to bf16's subnormals. fma with -0 is the bf16 multiply
# SM80 has (mul.bf16x2 needs SM90) and keeps the product's sign of zero.
E8M0_DECODE_PTX = tl.constexpr(_decode_ptx(
    [0x00, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40], [0x00, 0x00, 0x80, 0xC0, 0x00, 0x40, 0x80, 0xC0],
    "fma.rn.bf16x2 {out}, {value}, {scale}, negative_zero;"))


@triton.jit
def block_scales(byte, E4M3_SCALES: tl.constexpr, FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr):
    """Scale bytes -> the scales as the tiles' type (float32 on the interpreter); NaN bytes give NaN.

    E4M3 from SM89 by the conversion instruction (two per cvt, NaN kept), else from the bits."""
    if FP32_TILES:
        if E4M3_SCALES:
            scale = e4m3_value(byte.to(tl.int32))
        else:
            scale = _e8m0_value(byte.to(tl.int32))
    elif E4M3_SCALES:
        if HW_FP8:
            scale = byte.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        else:  # every E4M3 value is an fp16
            scale = e4m3_value(byte.to(tl.int32)).to(tl.float16)
    else:
        scale = e8m0_bf16(byte)
    return scale


@triton.jit
def e8m0_bf16(byte):
    """E8M0 scale bytes -> bf16 2^(byte - 127) from the bits (byte 0: the subnormal 2^-127; 255: NaN)."""
    byte = byte.to(tl.int32)
    bits = tl.where(byte == 0, 0x40, tl.where(byte == 255, 0x7FC0, byte << 7))
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


def tile_dtype(fp32_tiles: bool, e4m3_scales: bool):
    """The type decode_packed gives (and the attention kernels' tiles take): float32 on the
    interpreter, else the 16-bit type that holds every code times its block scale exactly (fp16
    under E4M3 scales, bf16 under E8M0 ones)."""
    if fp32_tiles:
        return tl.float32
    return tl.float16 if e4m3_scales else tl.bfloat16


@triton.jit
def decode_packed(packed, scale, E4M3_SCALES: tl.constexpr, FP32_TILES: tl.constexpr):
    """Packed bytes and their scales (same shape) -> (even, odd) exact values, 16-bit on a GPU."""
    if FP32_TILES:  # the interpreter runs no PTX: the same values from Triton arithmetic
        codes = packed.to(tl.int32)
        even = _e2m1_value(codes & 0xF) * scale
        odd = _e2m1_value(codes >> 4) * scale
    else:
        even, odd = tl.inline_asm_elementwise(
            _NVFP4_TABLE_DECODE_PTX if E4M3_SCALES else E8M0_DECODE_PTX, "=r,=r,=r,=r,r,r,r", [packed, scale],
            dtype=(scale.dtype, scale.dtype), is_pure=True, pack=4)
    return even, odd
