"""Pure-PyTorch kernels: the reference that every other backend must match byte for byte.

They run on any device, are written for clarity rather than speed, and never synchronize with
the host (no ``.item()``, no data-dependent shapes), so they are CUDA-graph safe too.
Arguments arrive already checked (see ``checks.py``).
"""

from __future__ import annotations

import torch

from .formats import BLOCKFP4_MIN_SCALE, E2M1_THRESHOLDS, E4M3_MAX, FP4Format, ScaleRule
from .paged_kv import PagedKV
from .slots import in_cache, last_writer_slots

_F32_EXPONENT_SHIFT = 23
_F32_MANTISSA_MASK = 0x7FFFFF
_E8M0_NAN_BYTE = 0xFF
_F32_BITS_OF_2_POW_MINUS_127 = 0x400000  # E8M0 byte 0 is a float32 subnormal


def _e8m0_byte_ceil_log2_amax_over_6(amax: torch.Tensor) -> torch.Tensor:
    v = (amax / 6.0).clamp(min=BLOCKFP4_MIN_SCALE)
    bits = v.view(torch.int32)
    # ceil(log2(v)) for a normal float: its exponent, plus one unless the mantissa is zero.
    return (bits >> _F32_EXPONENT_SHIFT) + ((bits & _F32_MANTISSA_MASK) != 0).to(torch.int32)


def _e8m0_byte_floor_log2_amax_minus_2(amax: torch.Tensor) -> torch.Tensor:
    biased_floor_log2 = amax.view(torch.int32) >> _F32_EXPONENT_SHIFT  # 0 for zero and subnormals
    return (biased_floor_log2 - 2).clamp(min=0)


_E8M0_BYTE_RULES = {
    ScaleRule.E8M0_CEIL_LOG2_AMAX_OVER_6: _e8m0_byte_ceil_log2_amax_over_6,
    ScaleRule.E8M0_FLOOR_LOG2_AMAX_MINUS_2: _e8m0_byte_floor_log2_amax_minus_2,
}


def e8m0_decode(scale_bytes: torch.Tensor) -> torch.Tensor:
    """E8M0 byte -> float32 2^(byte-127); byte 255 is NaN."""
    b = scale_bytes.to(torch.int32)
    bits = torch.where(b == 0, _F32_BITS_OF_2_POW_MINUS_127, b << _F32_EXPONENT_SHIFT)
    return torch.where(b == _E8M0_NAN_BYTE, float("nan"), bits.view(torch.float32))


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes -> float32.

    Placing the code's sign at fp16 bit 15 and its 3 magnitude bits at bits 9..11 gives an fp16
    equal to value * 2^-14 (the subnormal code 1 included), so one exact multiply restores it.
    """
    c = codes.to(torch.int16)
    fp16_bits = ((c & 0x8) << 12) | ((c & 0x7) << 9)
    return fp16_bits.view(torch.float16).float() * 2.0**14


def _scale_bytes_and_divisor(amax, fmt: FP4Format, global_scale):
    """Per-block scale byte (uint8) and the float32 value elements are divided by."""
    if fmt.scale_rule is ScaleRule.E4M3_AMAX_OVER_6G:
        g = usable_global_scale(global_scale, amax)
        s = (amax / (6.0 * g)).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
        return s.view(torch.uint8), s.float() * g
    byte = _E8M0_BYTE_RULES[fmt.scale_rule](amax)
    return byte.to(torch.uint8), e8m0_decode(byte)


def usable_global_scale(global_scale, like: torch.Tensor) -> torch.Tensor:
    """The global scale as a float32 scalar (1 when None), NaN unless it is finite and > 0.

    Its value lives on the device, so checking it would cost a host sync; instead an unusable
    scale makes every block it touches NaN, which no caller can mistake for plausible numbers."""
    if global_scale is None:
        return torch.ones((), dtype=torch.float32, device=like.device)
    g = global_scale.float().reshape(())
    return torch.where((g > 0) & torch.isfinite(g), g, float("nan"))


def _e2m1_magnitude(y: torch.Tensor, fmt: FP4Format) -> torch.Tensor:
    m = torch.zeros(y.shape, dtype=torch.uint8, device=y.device)
    for i, t in enumerate(E2M1_THRESHOLDS):
        m += (y >= t) if fmt.tie_rounds_up(i) else (y > t)
    return m


def quantize(x: torch.Tensor, fmt: FP4Format, global_scale=None):
    """x [..., D] -> (data uint8 [..., D/2], scales uint8 [..., D/block])."""
    blocks = x.float().unflatten(-1, (-1, fmt.block_size))
    finite = torch.isfinite(blocks).all(-1)
    amax = blocks.abs().amax(-1)
    scale_bytes, divisor = _scale_bytes_and_divisor(amax, fmt, global_scale)
    # A block holding NaN or Inf, or quantized with an unusable global scale (a NaN divisor), is
    # stored as zero codes under a NaN scale byte; a zero scale (nvfp4) codes the block as zeros.
    stored = finite & torch.isfinite(divisor)
    magnitude = _e2m1_magnitude(blocks.abs() / divisor.unsqueeze(-1), fmt)
    codes = magnitude | (torch.signbit(blocks).to(torch.uint8) << 3)
    codes = torch.where((stored & (divisor != 0)).unsqueeze(-1), codes, 0)
    scale_bytes = torch.where(stored, scale_bytes, fmt.scale_nan_byte).to(torch.uint8)
    codes = codes.flatten(-2)
    data = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return data, scale_bytes


def dequantize(data, scales, fmt: FP4Format, global_scale=None, dtype=torch.bfloat16):
    """(data [..., D/2], scales [..., D/block]) -> [..., D] in dtype."""
    codes = torch.stack((data & 0xF, data >> 4), dim=-1).flatten(-2)
    values = e2m1_decode(codes).unflatten(-1, (-1, fmt.block_size))
    scale_bytes = scales.view(torch.uint8)
    if fmt.scale_rule is ScaleRule.E4M3_AMAX_OVER_6G:
        scale = scale_bytes.view(torch.float8_e4m3fn).float()
    else:
        scale = e8m0_decode(scale_bytes)
    out = values * scale.unsqueeze(-1)  # exact: 2 x 4 significant bits
    if global_scale is not None:
        out = out * usable_global_scale(global_scale, out)
    return cast_output(out.flatten(-2), dtype)


def cast_output(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 -> dtype, saturating at the dtype's largest finite value (NaN stays NaN).

    The stored value can exceed the input's range (blockfp4 rounds 60000 up to 4 * 2^14 = 65536,
    past fp16's 65504; 4 * 2^126 is past float32's), and no stored block means infinity: a block
    that held NaN or Inf decodes to NaN. FP8 saturation is also the hardware's satfinite.
    """
    largest = torch.finfo(dtype).max
    return x.clamp(-largest, largest).to(dtype)


def _store_rows(cache: torch.Tensor, slot: torch.Tensor, rows: torch.Tensor) -> None:
    """cache[slot[t]] = rows[t] where slot[t] >= 0; `slot` comes from slots.last_writer_slots, so
    the slots written are distinct.

    Sync-free and deterministic: index_add_ of (new - old) mod 256 writes `rows` at those slots,
    while the other tokens add 0 to slot 0.
    """
    cache = cache.view(torch.uint8)
    written = slot >= 0
    target = torch.where(written, slot, 0)
    delta = torch.where(written.view(-1, *([1] * (rows.dim() - 1))), rows - cache[target], 0)
    cache.index_add_(0, target, delta.to(torch.uint8))


def quantize_and_store(k_data, v_data, k_scales, v_scales, loc, k, v, fmt, k_global_scale=None, v_global_scale=None):
    if k_data.shape[0] == 0:
        return
    slot = last_writer_slots(loc, k_data.shape[0])
    for data, scales, x, g in ((k_data, k_scales, k, k_global_scale), (v_data, v_scales, v, v_global_scale)):
        new_data, new_scales = quantize(x, fmt, g)
        _store_rows(data, slot, new_data)
        _store_rows(scales, slot, new_scales)


def gather_dequantize(data, scales, loc, fmt, global_scale=None, dtype=torch.bfloat16):
    """Slots loc -> [T, H, D]; slots out of range read as zeros (zero codes, zero scale bytes)."""
    num_slots = data.shape[0]
    if num_slots == 0:
        return torch.zeros((loc.shape[0], data.shape[1], data.shape[2] * 2), dtype=dtype, device=data.device)
    valid = in_cache(loc, num_slots).view(-1, 1, 1)
    slot = torch.where(valid.view(-1), loc, 0).long()
    rows = torch.where(valid, data[slot], 0)
    row_scales = torch.where(valid, scales.view(torch.uint8)[slot], 0)
    return dequantize(rows, row_scales, fmt, global_scale, dtype)


def paged_slots(block_table: torch.Tensor, page_size: int) -> torch.Tensor:
    """[B, max_pages] page table -> [B, max_pages * page_size] cache slot of every position."""
    offsets = torch.arange(page_size, device=block_table.device)
    return (block_table.long()[:, :, None] * page_size + offsets).flatten(1)


def decode_attention(out, q, kv: PagedKV, fmt: FP4Format, sm_scale: float, lse=None) -> None:
    """One query token per sequence against its paged FP4 context: gather, dequantize, SDPA.

    Positions at or past seq_lens[b] are masked; a sequence of length 0 attends to nothing and
    gets zeros (and a log-sum-exp of -inf)."""
    b, hq, d = q.shape
    hkv = kv.kv_heads
    slots = paged_slots(kv.block_table, kv.page_size)  # [B, L]
    length = slots.shape[1]
    flat = slots.reshape(-1)
    k = gather_dequantize(kv.k_data, kv.k_scales, flat, fmt, kv.k_global_scale, torch.float32).view(b, length, hkv, d)
    v = gather_dequantize(kv.v_data, kv.v_scales, flat, fmt, kv.v_global_scale, torch.float32).view(b, length, hkv, d)
    visible = torch.arange(length, device=q.device)[None, :] < kv.seq_lens[:, None].long()  # [B, L]
    scores = torch.einsum("bgrd,blgd->bgrl", q.float().view(b, hkv, hq // hkv, d), k) * sm_scale
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    has_context = visible.any(-1)[:, None, None, None]
    weights = torch.where(has_context, torch.softmax(scores, dim=-1), 0.0)  # length 0: zeros, not NaN
    result = torch.einsum("bgrl,blgd->bgrd", weights, v).reshape(b, hq, d)
    out.copy_(result.to(out.dtype))
    if lse is not None:
        lse.copy_(torch.logsumexp(scores, dim=-1).reshape(b, hq))
