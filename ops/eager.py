"""Pure-PyTorch kernels: the reference that every other backend must match byte for byte.

They run on any device, are written for clarity rather than speed, and never synchronize with
the host (no ``.item()``, no data-dependent shapes), so they are CUDA-graph safe too.
Arguments arrive already checked (see ``checks.py``).
"""

from __future__ import annotations

import torch

from .formats import (BLOCKFP4_MIN_SCALE, E2M1_MAX, E2M1_THRESHOLDS, E2M1_VALUES, E4M3_MAX, E4M3_NAN_BYTE, Element,
                      FP4Format, KVRecipe, ScaleRule)
from .paged_kv import PagedKV
from .slots import in_cache, last_writer_slots

_F32_EXPONENT_SHIFT = 23
_F32_MANTISSA_MASK = 0x7FFFFF
_E8M0_NAN_BYTE = 0xFF
_F32_BITS_OF_2_POW_MINUS_127 = 0x400000  # E8M0 byte 0 is a float32 subnormal
_E2M1_MAGNITUDES = torch.tensor(E2M1_VALUES)


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


def _scale_bytes_and_divisor(amax, fmt: FP4Format, global_scale, block_max: float = E2M1_MAX):
    """Per-block scale byte (uint8) and the float32 value elements are divided by; E4M3 scales
    bring amax to `block_max` (one of fmt.block_maxima)."""
    if fmt.scale_rule is ScaleRule.E4M3_AMAX_OVER_6G:
        g = usable_global_scale(global_scale, amax)
        s = (amax / (block_max * g)).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
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


def _candidate(magnitudes: torch.Tensor, amax, fmt: FP4Format, global_scale, block_max: float):
    """(scale bytes, divisor, E2M1 magnitude codes) of blocks |x| under the scale for block_max."""
    scale_bytes, divisor = _scale_bytes_and_divisor(amax, fmt, global_scale, block_max)
    return scale_bytes, divisor, _e2m1_magnitude(magnitudes / divisor.unsqueeze(-1), fmt)


def pairwise_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis (a power of two long) in neighbouring pairs, then pairs of those
    sums, down to one: a fixed order, which the Triton kernels follow for equal float32 sums."""
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x.squeeze(-1)


def dequantized_squared_error(magnitudes, codes, scale_bytes, global_scale) -> torch.Tensor:
    """Per block, the float32 sum of squared differences between |x| and what a reader of
    (codes, E4M3 scale bytes) dequantizes: (e2m1 * s) * g (formats.ScaleChoice)."""
    s = scale_bytes.view(torch.float8_e4m3fn).float().unsqueeze(-1)
    values = _E2M1_MAGNITUDES.to(magnitudes.device)[codes.long()] * s
    if global_scale is not None:
        values = values * usable_global_scale(global_scale, values)
    return pairwise_sum((values - magnitudes).square())


def _chosen_scales(magnitudes, amax, fmt: FP4Format, global_scale):
    """(scale bytes, divisor, magnitude codes) of the candidate each block keeps: the only one, or
    (formats.ScaleChoice) the one with the smallest dequantized error, earlier ones winning ties."""
    first, *others = fmt.block_maxima
    best = _candidate(magnitudes, amax, fmt, global_scale, first)
    if not others:
        return best
    best_error = dequantized_squared_error(magnitudes, best[2], best[0], global_scale)
    for block_max in others:
        candidate = _candidate(magnitudes, amax, fmt, global_scale, block_max)
        error = dequantized_squared_error(magnitudes, candidate[2], candidate[0], global_scale)
        better = error < best_error
        best = (torch.where(better, candidate[0], best[0]), torch.where(better, candidate[1], best[1]),
                torch.where(better.unsqueeze(-1), candidate[2], best[2]))
        best_error = torch.where(better, error, best_error)
    return best


def _quantize_e4m3(x: torch.Tensor, global_scale):
    """FP8 E4M3 elements of x / g (RNE, finite values saturating at +-448), no scale bytes; a NaN
    or +-Inf element, or an unusable global scale, stores the NaN byte: never a finite value."""
    g = usable_global_scale(global_scale, x)
    byte = (x.float() / g).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    data = torch.where(torch.isfinite(x) & torch.isfinite(g), byte, E4M3_NAN_BYTE).to(torch.uint8)
    return data, data.new_empty((*x.shape[:-1], 0))


def quantize(x: torch.Tensor, fmt: FP4Format, global_scale=None):
    """x [..., D] -> (data uint8 [..., D/2], scales uint8 [..., D/block]); FP8 E4M3: data [..., D],
    scales [..., 0]."""
    if fmt.element is Element.E4M3:
        return _quantize_e4m3(x, global_scale)
    blocks = x.float().unflatten(-1, (-1, fmt.block_size))
    finite = torch.isfinite(blocks).all(-1)
    magnitudes = blocks.abs()
    amax = magnitudes.amax(-1)
    scale_bytes, divisor, magnitude = _chosen_scales(magnitudes, amax, fmt, global_scale)
    # A block holding NaN or Inf, or quantized with an unusable global scale (a NaN divisor), is
    # stored as zero codes under a NaN scale byte; a zero scale (nvfp4) codes the block as zeros.
    stored = finite & torch.isfinite(divisor)
    codes = magnitude | (torch.signbit(blocks).to(torch.uint8) << 3)
    codes = torch.where((stored & (divisor != 0)).unsqueeze(-1), codes, 0)
    scale_bytes = torch.where(stored, scale_bytes, fmt.scale_nan_byte).to(torch.uint8)
    codes = codes.flatten(-2)
    data = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return data, scale_bytes


def dequantize(data, scales, fmt: FP4Format, global_scale=None, dtype=torch.bfloat16):
    """(data [..., D/2], scales [..., D/block]) -> [..., D] in dtype (FP8 E4M3: data [..., D])."""
    if fmt.element is Element.E4M3:
        out = data.view(torch.float8_e4m3fn).float()
        if global_scale is not None:
            out = out * usable_global_scale(global_scale, out)
        return cast_output(out, dtype)
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


def quantize_and_store(k_data, v_data, k_scales, v_scales, loc, k, v, kv_recipe: KVRecipe, k_global_scale=None,
                       v_global_scale=None):
    if k_data.shape[0] == 0:
        return
    slot = last_writer_slots(loc, k_data.shape[0])
    store(k_data, k_scales, slot, k, kv_recipe.k, k_global_scale)
    store(v_data, v_scales, slot, v, kv_recipe.v, v_global_scale)


def store(data, scales, slot, x, fmt: FP4Format, global_scale=None) -> None:
    """One of K or V: quantize x [T, H, D] into the cache rows `slot` (slots.last_writer_slots)."""
    new_data, new_scales = quantize(x, fmt, global_scale)
    _store_rows(data, slot, new_data)
    _store_rows(scales, slot, new_scales)


def gather_dequantize(data, scales, loc, fmt, global_scale=None, dtype=torch.bfloat16):
    """Slots loc -> [T, H, D]; slots out of range read as zeros (zero codes, zero scale bytes)."""
    num_slots = data.shape[0]
    if num_slots == 0:
        return torch.zeros((loc.shape[0], data.shape[1], fmt.head_dim_of(data.shape[2])), dtype=dtype,
                           device=data.device)
    valid = in_cache(loc, num_slots).view(-1, 1, 1)
    slot = torch.where(valid.view(-1), loc, 0).long()
    rows = torch.where(valid, data[slot], 0)
    row_scales = torch.where(valid, scales.view(torch.uint8)[slot], 0)
    return dequantize(rows, row_scales, fmt, global_scale, dtype)


def paged_slots(block_table: torch.Tensor, page_size: int) -> torch.Tensor:
    """[B, max_pages] page table -> [B, max_pages * page_size] cache slot of every position."""
    offsets = torch.arange(page_size, device=block_table.device)
    return (block_table.long()[:, :, None] * page_size + offsets).flatten(1)


def masked_attention(scores: torch.Tensor, visible: torch.Tensor, values: torch.Tensor):
    """Softmax attention over the visible positions alone: (out [..., R, D], lse [..., R]).

    scores [..., R, L] (scaled, float32), visible [..., R, L] (broadcastable), values [..., L, D]
    (float32). A position a row does not see never reaches it, whatever it holds: multiplying a
    masked value by its zero weight would turn a stale NaN into a NaN row (0 x NaN = NaN), so
    values enter the sum with their non-finite entries zeroed, and a non-finite value reaches
    exactly the rows that see it, in its own dimensions, as NaN. A row that sees nothing gets
    zeros and a log-sum-exp of -inf."""
    scores = scores.masked_fill(~visible, float("-inf"))
    sees = visible.any(-1, keepdim=True)
    weights = torch.where(sees, torch.softmax(scores, dim=-1), 0.0)  # nothing visible: zeros, not NaN
    finite = torch.isfinite(values)
    out = weights @ torch.where(finite, values, 0.0)
    reached = (visible.to(values.dtype) @ (~finite).to(values.dtype)) > 0
    return torch.where(reached, float("nan"), out), torch.logsumexp(scores, dim=-1)


def decode_attention(out, q, kv: PagedKV, fmt: KVRecipe, sm_scale: float, lse=None) -> None:
    """One query token per sequence against its paged FP4 context: gather, dequantize, attend.

    Positions at or past seq_lens[b] are masked (masked_attention: whatever they hold); a
    sequence of length 0 attends to nothing and gets zeros (and a log-sum-exp of -inf)."""
    b, hq, d = q.shape
    hkv = kv.kv_heads
    slots = paged_slots(kv.block_table, kv.page_size)  # [B, L]
    length = slots.shape[1]
    flat = slots.reshape(-1)
    k = gather_dequantize(kv.k_data, kv.k_scales, flat, fmt.k, kv.k_global_scale, torch.float32).view(b, length, hkv, d)
    v = gather_dequantize(kv.v_data, kv.v_scales, flat, fmt.v, kv.v_global_scale, torch.float32).view(b, length, hkv, d)
    visible = torch.arange(length, device=q.device)[None, :] < kv.seq_lens[:, None].long()  # [B, L]
    scores = torch.einsum("bgrd,blgd->bgrl", q.float().view(b, hkv, hq // hkv, d), k) * sm_scale
    result, result_lse = masked_attention(scores, visible[:, None, None, :], v.transpose(1, 2))
    out.copy_(result.reshape(b, hq, d).to(out.dtype))
    if lse is not None:
        lse.copy_(result_lse.reshape(b, hq))


def extend_rows(cu_seqlens_q: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start [B], end [B]) int64: sequence b owns rows [start[b], end[b]) of q.

    The boundaries are the running maximum of cu_seqlens_q clamped to [0, num_tokens]: the ranges
    never overlap whatever the offsets hold (no two programs write one row), and they are the
    offsets themselves when those are sorted and within q (rows past cu_seqlens_q[B]: padding)."""
    bounds = torch.cummax(cu_seqlens_q.long(), 0).values.clamp(0, num_tokens)
    return bounds[:-1], bounds[1:]


def extend_attention(out, q, cu_seqlens_q, kv: PagedKV, fmt: KVRecipe, sm_scale: float) -> None:
    """Several new tokens per sequence against its paged FP4 cache (new tokens stored already):
    per sequence, gather and dequantize the context, then masked attention in fp32.

    Row t of sequence b (extend_rows) sits at position seq_lens[b] - cu_seqlens_q[b + 1] + t and
    sees the positions up to it, below min(seq_lens[b], the page table's length); a row that sees
    none, or that no sequence owns, gets zeros."""
    tokens, hq, d = q.shape
    hkv = kv.kv_heads
    start, end = extend_rows(cu_seqlens_q, tokens)
    rows = torch.arange(tokens, device=q.device)
    keys = torch.arange(kv.max_len, device=q.device)
    slots = paged_slots(kv.block_table, kv.page_size)  # [B, L]
    queries = q.float().view(tokens, hkv, hq // hkv, d)
    result = torch.zeros_like(queries)
    for b in range(slots.shape[0]):
        k = gather_dequantize(kv.k_data, kv.k_scales, slots[b], fmt.k, kv.k_global_scale, torch.float32)
        v = gather_dequantize(kv.v_data, kv.v_scales, slots[b], fmt.v, kv.v_global_scale, torch.float32)
        owned = (rows >= start[b]) & (rows < end[b])  # [T]
        position = kv.seq_lens[b].long() - cu_seqlens_q[b + 1].long() + rows
        visible = owned[:, None] & (keys[None, :] <= position[:, None]) & (keys[None, :] < kv.seq_lens[b].long())
        scores = torch.einsum("tgrd,lgd->tgrl", queries, k) * sm_scale
        attended, _ = masked_attention(scores, visible[:, None, None, :], v.transpose(0, 1))
        # where, not +=: rows of other sequences are not this one's to write.
        result = torch.where(owned[:, None, None, None], attended, result)
    out.copy_(result.reshape(tokens, hq, d).to(out.dtype))
