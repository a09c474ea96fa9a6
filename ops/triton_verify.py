"""extend_attention's verify route: a few new tokens per sequence as one decode over the prefix.

Speculative verification attends n new tokens (2-8 drafts) per sequence over a long cached
prefix. Every one of them sees the whole prefix, so the n tokens times a KV head's g query heads
are n·g query rows of one decode: the decode kernel (the Gluon one on SM90, which the general
extend kernel is slower than) reads each prefix tile once for all of them. Only the last n
positions differ from row to row (causal); a small kernel attends those and merges the two parts
by their log-sum-exps. triton_extend routes the first `n = T // B` rows of every sequence here
when n·g fits the Gluon kernel, and runs its own kernel for the rest (none when every sequence
has n rows), so any cu_seqlens_q keeps eager's result.

Row i of sequence b (its rows [start, end) from eager.extend_rows) sits at position
base + i, base = seq_lens[b] - cu_seqlens_q[b + 1] + start. Positions below
prefix = clamp(base, 0, kv_len) are visible to all its rows (the decode, seq_lens = prefix); the
rest it sees lie in [prefix, prefix + n) (the tail kernel, one tile of at least n positions).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import decode, eager
from .attention_shared import (LOG2_E, context_len, global_scales, lse_weight, mma_side, split_kernel_arguments,
                               split_lse)
from .formats import KVRecipe
from .paged_kv import PagedKV
from .triton_attention_tiles import (drop_unseen_values, kernel_inputs, nan_where_seen, query_pairs, tile_scores,
                                     value_tile)


def routed_tokens(q: torch.Tensor, kv: PagedKV, fmt: KVRecipe) -> int:
    """New tokens per sequence this route serves for q [T, Hq, D] (0: none): n = T // B where n
    tokens times the group's query heads are rows the Hopper decode kernel serves on this cache.
    From shapes and the cache buffers only, so a CUDA graph of a verify step always takes the same
    path."""
    tokens, hq, d = q.shape
    batch, kv_heads = kv.block_table.shape[0], kv.kv_heads
    n = tokens // batch if batch else 0
    if n == 0:
        return 0
    rows = q.new_empty(1).as_strided((batch, kv_heads * n * (hq // kv_heads), d), (0, 0, 0))  # a shape, no data
    return n if decode.hopper_kernel(rows, kv, fmt) else 0


@triton.jit
def _verify_tail_kernel(
    q_ptr, k_data_ptr, k_scales_ptr, v_data_ptr, v_scales_ptr, k_g_ptr, v_g_ptr,
    block_table_ptr, seq_lens_ptr, prefix_out_ptr, prefix_lse_ptr, sm_scale, max_pages, num_pages,
    out_ptr, start_ptr, count_ptr, base_ptr, prefix_ptr,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, PAGE: tl.constexpr,
    E4M3_SCALES: tl.constexpr, HAS_G: tl.constexpr, GROUP: tl.constexpr, N: tl.constexpr, M: tl.constexpr,
    BLOCK_N: tl.constexpr, FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr, K_FP8: tl.constexpr,
    dtype: tl.constexpr,
):
    """One (sequence, KV head): its N·GROUP rows (token i, head j as column i·GROUP + j, padded
    to M) over the positions [prefix, prefix + BLOCK_N), merged with the decode's result over the
    prefix (fp32 output and natural-log LSE in the same column order), written to out's rows.
    dtype: the tiles' type (triton_codes.tile_dtype)."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    col = tl.arange(0, M)
    token = col // GROUP
    real = col < N * GROUP
    owned = real & (token < tl.load(count_ptr + b))
    query_pos = tl.load(base_ptr + b) + token
    prefix = tl.load(prefix_ptr + b).to(tl.int32)
    kv_len = context_len(tl.load(seq_lens_ptr + b), max_pages, PAGE)

    decode_col = (b * HKV + kv_head).to(tl.int64) * (N * GROUP) + col  # row of the decode's q, out, lse
    q_even, q_odd = query_pairs(q_ptr, decode_col[None, :] * D, real, D, dtype)
    score_scale, v_g = global_scales(sm_scale, k_g_ptr, v_g_ptr, HAS_G)

    pos = prefix + tl.arange(0, BLOCK_N)
    valid = pos < kv_len
    scores, in_cache, rows = tile_scores(  # [BLOCK_N, M]
        k_data_ptr, k_scales_ptr, block_table_ptr, b, max_pages, num_pages, kv_head, pos, valid, query_pos,
        q_even, q_odd, score_scale, D, BS, PAGE, HKV, E4M3_SCALES, FP32_TILES, HW_FP8, K_FP8, dtype)
    m = tl.max(scores, axis=0)
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    p = tl.exp2(scores - m_safe[None, :])
    l = tl.sum(p, axis=0)
    v = value_tile(v_data_ptr, v_scales_ptr, rows, in_cache, D, BS, E4M3_SCALES, FP32_TILES, HW_FP8)
    v, seen = drop_unseen_values(v, pos, valid, query_pos, dtype)  # every tail tile is a diagonal one
    tail = nan_where_seen(tl.dot(tl.trans(v), p.to(dtype)) * (v_g / tl.where(l > 0, l, 1.0))[None, :], seen)  # [D, M]
    tail_lse = split_lse(m, l)

    # Merge with the prefix's part by the two log-sum-exps (base 2); a part that saw nothing weighs 0.
    dims = tl.arange(0, D)[:, None]
    prefix_lse = tl.load(prefix_lse_ptr + decode_col, mask=real, other=float("-inf")) * LOG2_E  # natural -> base 2
    prefix_out = tl.load(prefix_out_ptr + decode_col[None, :] * D + dims, mask=real[None, :], other=0.0)
    top = tl.maximum(prefix_lse, tail_lse)
    top = tl.where(top > float("-inf"), top, 0.0)
    w_prefix = lse_weight(prefix_lse, top)
    w_tail = lse_weight(tail_lse, top)
    total = w_prefix + w_tail
    result = (prefix_out * w_prefix[None, :] + tail * w_tail[None, :]) / tl.where(total > 0, total, 1.0)[None, :]
    out_row = tl.load(start_ptr + b) + token
    head = kv_head * GROUP + col % GROUP
    tl.store(out_ptr + (out_row * HQ + head)[None, :] * D + dims, result.to(out_ptr.dtype.element_ty),
             mask=owned[None, :])


def extend_attention(out, q, cu_seqlens_q, kv: PagedKV, fmt: KVRecipe, sm_scale: float, n: int) -> None:
    """Write the first n rows of every sequence (eager.extend_rows) of extend_attention's result
    into out; other rows are left alone. n·(Hq/Hkv) query rows per KV head go to one decode."""
    tokens, hq, d = q.shape
    batch, hkv = kv.block_table.shape[0], kv.kv_heads
    group = hq // hkv
    start, end = eager.extend_rows(cu_seqlens_q, tokens)
    base = kv.seq_lens.long() - cu_seqlens_q[1:].long() + start
    prefix = torch.minimum(base.clamp(min=0), kv.seq_lens.long().clamp(0, kv.max_len)).int()
    # The decode's query rows: sequence b, KV head h, column i·g + j = q[start[b] + i, h·g + j]
    # (rows past the sequence's own read a neighbour's q; they are never written back).
    rows = (start[:, None] + torch.arange(n, device=q.device)).clamp(max=max(tokens - 1, 0))
    decode_q = q[rows].view(batch, n, hkv, group, d).transpose(1, 2).reshape(batch, hkv * n * group, d)
    prefix_out = torch.empty(decode_q.shape, dtype=torch.float32, device=q.device)
    prefix_lse = torch.empty(decode_q.shape[:2], dtype=torch.float32, device=q.device)
    decode.decode_attention(prefix_out, decode_q, kv._replace(seq_lens=prefix), fmt, sm_scale, prefix_lse)

    kernel_kv, tiles = kernel_inputs(kv, fmt, q.device)
    args, constants = split_kernel_arguments(decode_q, kernel_kv, prefix_out, prefix_lse, fmt.v, sm_scale, 0)
    constants.update(HQ=hq, GROUP=group)
    _verify_tail_kernel[(batch, hkv)](
        *args[:-1], out, start, end - start, base, prefix, **constants, **tiles, N=n, M=mma_side(n * group),
        BLOCK_N=mma_side(n),
    )
