"""The Triton attention kernels' tiles: what triton_decode, triton_extend and triton_verify read
from the FP4 cache and how they score it.

Decoding turns four packed bytes into eight exact 16-bit tensor-core inputs with a few lines of
inline PTX (byte-table lookups with prmt, see triton_codes._decode_ptx): fp16 for NVFP4, bf16 for
E8M0 scales, the block scale applied by one packed multiply. Positions are the long side of the
score tile (keys feed the tensor cores from registers, their pair columns permuted so each thread
reads adjacent bytes, see attention_shared.key_columns); values are decoded row by row and reach
the tensor cores through shared memory. The query is cast to the tiles' type once per program and
the global scales are applied to the fp32 scores and outputs. The error against SDPA over the
dequantized cache is the query's rounding to that type, the summation order, and the 16-bit
rounding of the softmax weights, as in any flash-attention kernel.

FP8 E4M3 keys ("+k8" recipes, K_FP8) are read as one 16-bit word per element pair and converted
to the tiles' type (exact: E4M3 values are fp16 and bf16 values), in the FP4 keys' column order;
values stay FP4.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_shared import context_len, key_columns, key_pair, paged_rows, split_lse
from .formats import Element, KVRecipe
from .paged_kv import PagedKV
from .triton_codes import block_scales, decode_packed, tile_dtype
from .triton_launch import fp32_tiles, hardware_casts


def kernel_inputs(kv: PagedKV, fmt: KVRecipe, device: torch.device) -> tuple[PagedKV, dict]:
    """(kv as the Triton attention kernels read it: FP8 keys as int16 words; the tile constexprs
    every one of them takes: FP32_TILES, HW_FP8, K_FP8 and dtype, the tiles' type)."""
    k_fp8 = fmt.k.element is Element.E4M3
    fp32 = fp32_tiles(device)
    constants = dict(FP32_TILES=fp32, HW_FP8=hardware_casts(device)[1], K_FP8=k_fp8,
                     dtype=tile_dtype(fp32, fmt.v.e4m3_scales))
    return (kv._replace(k_data=kv.k_data.view(torch.int16)) if k_fp8 else kv), constants


@triton.jit
def _key_tile(data_ptr, scales_ptr, rows, valid, D: tl.constexpr, BS: tl.constexpr,
              E4M3_SCALES: tl.constexpr, FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr):
    """Key rows [N] -> (even, odd) [N, D/2], pair columns in key_pair order: each thread of an A
    fragment reads D/8 adjacent bytes per row, which span 1 to 4 blocks, so it loads one scale per
    block instead of a scale every two bytes."""
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
    return key_columns(even, D), key_columns(odd, D)


@triton.jit
def _fp8_key_tile(data_ptr, rows, valid, D: tl.constexpr, FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr):
    """FP8 E4M3 key rows [N] -> (even, odd) [N, D/2] as _key_tile gives them (pair columns in
    key_pair order), in fp16 (float32 on the interpreter). data_ptr holds the cache as int16 words,
    word p = elements 2p (low byte) and 2p + 1, so a row is D/2 adjacent words."""
    words = tl.load(data_ptr + rows[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :], mask=valid[:, None], other=0)
    even = block_scales((words & 0xFF).to(tl.uint8), True, FP32_TILES, HW_FP8)
    odd = block_scales(((words >> 8) & 0xFF).to(tl.uint8), True, FP32_TILES, HW_FP8)
    return key_columns(even, D), key_columns(odd, D)


@triton.jit
def key_tiles(k_data_ptr, k_scales_ptr, rows, valid, D: tl.constexpr, BS: tl.constexpr, E4M3_SCALES: tl.constexpr,
              FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr, K_FP8: tl.constexpr, dtype: tl.constexpr):
    """Key rows [N] -> (even, odd) [N, D/2] in the tiles' type: FP4 (_key_tile) or, K_FP8, FP8
    E4M3 keys (_fp8_key_tile; k_data_ptr as int16 words, kernel_inputs)."""
    if K_FP8:
        even, odd = _fp8_key_tile(k_data_ptr, rows, valid, D, FP32_TILES, HW_FP8)
        even, odd = even.to(dtype), odd.to(dtype)
    else:
        even, odd = _key_tile(k_data_ptr, k_scales_ptr, rows, valid, D, BS, E4M3_SCALES, FP32_TILES, HW_FP8)
    return even, odd


@triton.jit
def value_bytes(data_ptr, scales_ptr, rows, valid, first, D: tl.constexpr, ROW_D: tl.constexpr, BS: tl.constexpr):
    """Columns [first, first + D) of value rows [N] ROW_D wide (`first` a multiple of BS) -> (packed
    [N, D/BS, BS/2] bytes, scale bytes [N, D/BS]): what value_tile decodes, loaded apart from the
    decode so a kernel can load the next tile before decoding this one."""
    NB: tl.constexpr = D // BS
    N: tl.constexpr = rows.shape[0]
    packed = tl.load(data_ptr + rows[:, None] * (ROW_D // 2) + first // 2 + tl.arange(0, D // 2)[None, :],
                     mask=valid[:, None], other=0)
    scale_byte = tl.load(scales_ptr + rows[:, None] * (ROW_D // BS) + first // BS + tl.arange(0, NB)[None, :],
                         mask=valid[:, None], other=0)
    return tl.reshape(packed, (N, NB, BS // 2)), scale_byte


@triton.jit
def value_words(data_ptr, scales_ptr, rows, valid, first, D: tl.constexpr, ROW_D: tl.constexpr, BS: tl.constexpr):
    """value_bytes with the packed codes as int32 words [N, D/8] (word_bytes unpacks them): a
    tile held across a loop iteration takes a register per word, where its bytes take one each."""
    NB: tl.constexpr = D // BS
    words = tl.load(data_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (ROW_D // 8) + first // 8
                    + tl.arange(0, D // 8)[None, :], mask=valid[:, None], other=0)
    scale_byte = tl.load(scales_ptr + rows[:, None] * (ROW_D // BS) + first // BS + tl.arange(0, NB)[None, :],
                         mask=valid[:, None], other=0)
    return words, scale_byte


@triton.jit
def word_bytes(words, BS: tl.constexpr):
    """value_words' words [N, D/8] -> the packed bytes [N, D/BS, BS/2] value_bytes gives (little-endian)."""
    N: tl.constexpr = words.shape[0]
    W: tl.constexpr = words.shape[1]
    packed = (words[:, :, None] >> (tl.arange(0, 4) * 8)[None, None, :]) & 0xFF
    return tl.reshape(packed.to(tl.uint8), (N, W * 8 // BS, BS // 2))


@triton.jit
def decode_values(packed, scale_byte, E4M3_SCALES: tl.constexpr, FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr):
    """value_bytes' (packed, scale bytes) -> [N, D] in element order, decoded as [rows, blocks,
    bytes] so a block's scale broadcasts over its bytes in registers. Joining the even and odd halves
    (not an elementwise op) keeps Triton from moving the decode into the tensor-core operand layout,
    where every element would need its own scale; the joined rows reach it through shared memory."""
    N: tl.constexpr = packed.shape[0]
    D: tl.constexpr = packed.shape[1] * packed.shape[2] * 2
    scale = tl.broadcast_to(tl.expand_dims(block_scales(scale_byte, E4M3_SCALES, FP32_TILES, HW_FP8), 2), packed.shape)
    even, odd = decode_packed(packed, scale, E4M3_SCALES, FP32_TILES)
    return tl.reshape(tl.join(even, odd), (N, D))


@triton.jit
def value_tile(data_ptr, scales_ptr, rows, valid, D: tl.constexpr, BS: tl.constexpr,
               E4M3_SCALES: tl.constexpr, FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr):
    """Value rows [N] -> [N, D] in element order (value_bytes, then decode_values)."""
    packed, scale_byte = value_bytes(data_ptr, scales_ptr, rows, valid, 0, D, D, BS)
    return decode_values(packed, scale_byte, E4M3_SCALES, FP32_TILES, HW_FP8)


@triton.jit
def fp8_words(data_ptr, rows, valid, D: tl.constexpr):
    """FP8 E4M3 rows [N] -> their [N, D/2] int16 words (data_ptr holds the cache as int16 words,
    word p = elements 2p (low byte) and 2p + 1): what fp8_rows converts."""
    return tl.load(data_ptr + rows[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :], mask=valid[:, None], other=0)


@triton.jit
def fp8_rows(words, FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr, dtype: tl.constexpr):
    """fp8_words' words [N, D/2] -> the elements [N, D] in order, as `dtype` (exact: E4M3 values
    are fp16 and bf16 values)."""
    N: tl.constexpr = words.shape[0]
    even = block_scales((words & 0xFF).to(tl.uint8), True, FP32_TILES, HW_FP8).to(dtype)
    odd = block_scales(((words >> 8) & 0xFF).to(tl.uint8), True, FP32_TILES, HW_FP8).to(dtype)
    return tl.reshape(tl.join(even, odd), (N, words.shape[1] * 2))


@triton.jit
def key_rows(k_data_ptr, k_scales_ptr, rows, valid, D: tl.constexpr, BS: tl.constexpr, E4M3_SCALES: tl.constexpr,
             FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr, K_FP8: tl.constexpr, dtype: tl.constexpr):
    """Key rows [N] -> [N, D] in element order, the tiles' type: for products q K^T, where keys
    reach the tensor cores through shared memory as values do (value_tile). K_FP8: FP8 E4M3 keys,
    k_data_ptr as int16 words (kernel_inputs)."""
    if K_FP8:
        keys = fp8_rows(fp8_words(k_data_ptr, rows, valid, D), FP32_TILES, HW_FP8, dtype)
    else:
        keys = value_tile(k_data_ptr, k_scales_ptr, rows, valid, D, BS, E4M3_SCALES, FP32_TILES, HW_FP8)
    return keys


@triton.jit
def query_pairs(q_ptr, q_cols, ok, D: tl.constexpr, dtype: tl.constexpr):
    """q's even and odd elements [D/2, columns] in key_pair order (the key tiles' columns), as the
    tiles' type; q_cols: each column's element offset in q, ok: which columns are real."""
    key_pairs = key_pair(tl.arange(0, D // 2), D)
    q_even = tl.load(q_ptr + q_cols + 2 * key_pairs[:, None], mask=ok[None, :], other=0.0).to(dtype)
    q_odd = tl.load(q_ptr + q_cols + 2 * key_pairs[:, None] + 1, mask=ok[None, :], other=0.0).to(dtype)
    return q_even, q_odd


@triton.jit
def visible(pos, valid, query_pos):
    """[positions, columns]: which of the positions `pos` each query column sees: the `valid` ones,
    up to the column's query_pos (extend's causal rule); query_pos None: every valid one."""
    if query_pos is None:
        seen = valid[:, None]
    else:
        seen = valid[:, None] & (pos[:, None] <= query_pos[None, :])
    return seen


@triton.jit
def tile_scores(k_data_ptr, k_scales_ptr, block_table_ptr, b, max_pages, num_pages, kv_head, pos, valid, query_pos,
                q_even, q_odd, score_scale, D: tl.constexpr, BS: tl.constexpr, PAGE: tl.constexpr, HKV: tl.constexpr,
                E4M3_SCALES: tl.constexpr, FP32_TILES: tl.constexpr, HW_FP8: tl.constexpr, K_FP8: tl.constexpr,
                dtype: tl.constexpr):
    """Scores [positions, columns] of the key positions `pos` of sequence b against the query
    columns (query_pairs), times score_scale (base 2); -inf where a column does not see the
    position (`visible`, query_pos None for decode). Also (readable, cache rows) of the positions,
    for their values."""
    in_cache, rows = paged_rows(block_table_ptr, b, max_pages, num_pages, pos, valid, PAGE, HKV, kv_head)
    k_even, k_odd = key_tiles(k_data_ptr, k_scales_ptr, rows, in_cache, D, BS, E4M3_SCALES, FP32_TILES, HW_FP8,
                              K_FP8, dtype)
    scores = tl.dot(k_even, q_even) + tl.dot(k_odd, q_odd)
    return tl.where(visible(pos, valid, query_pos), scores * score_scale, float("-inf")), in_cache, rows


NAN_GROUPS = tl.constexpr(16)  # value columns are flagged in 16 groups of D/16: each inside one FP4 block


@triton.jit
def softmax_step(m, l_acc, scores):
    """The online softmax over one tile of scores [positions, columns] (base 2, decode's layout):
    (the new running max per column, the factor that rescales what was accumulated under the old
    one, the tile's weights, the denominators updated). Denominators stay per position, [positions,
    columns], and are summed once at the end: one add per score in the loop instead of a reduction."""
    m_new = tl.maximum(m, tl.max(scores, axis=0))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(scores - m_new[None, :])
    return m_new, alpha, p, l_acc * alpha[None, :] + p


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
    seen = tl.dot(tl.trans(broken_groups), visible(pos, valid, query_pos).to(dtype))
    return tl.where(broken, 0.0, v).to(v.dtype), seen


@triton.jit
def nan_where_seen(out, seen):
    """out [D, M] with NaN in every group of value columns a column saw a NaN in (drop_unseen_values)."""
    D: tl.constexpr = out.shape[0]
    M: tl.constexpr = out.shape[1]
    hit = tl.reshape(tl.broadcast_to(tl.expand_dims(seen > 0, 1), (NAN_GROUPS, D // NAN_GROUPS, M)), (D, M))
    return tl.where(hit, float("nan"), out)


@triton.jit
def _split_result(acc, divisor, seen):
    out = acc / divisor[None, :]
    if seen is not None:
        out = nan_where_seen(out, seen)
    return out


@triton.jit
def store_split(partial_out_ptr, partial_lse_ptr, query_rows, split, acc, divisor, seen, m, l, ok,
                NUM_SPLITS: tl.constexpr):
    """Store a split's output acc [D, M] / divisor [M] for the query rows `query_rows` [M] (int64
    rows of q; only where `ok`) where attention_shared.split_outputs placed them, NaN where `seen`
    flags it (nan_where_seen; None: no flags), and with NUM_SPLITS > 1 its split_lse."""
    D: tl.constexpr = acc.shape[0]
    base = query_rows * NUM_SPLITS + split
    tl.store(partial_out_ptr + base[None, :] * D + tl.arange(0, D)[:, None],
             _split_result(acc, divisor, seen).to(partial_out_ptr.dtype.element_ty), mask=ok[None, :])
    if NUM_SPLITS > 1:
        lse = split_lse(m, l)
        tl.store(partial_lse_ptr + base, lse, mask=ok)


@triton.jit
def _running_max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _segment_bounds(cu_ptr, lanes, batch, tokens, SHIFT: tl.constexpr):
    """Row boundaries per segment lane: 0 for lane 0 (with SHIFT 1), the clamped running maximum
    of cu_seqlens_q (eager.extend_rows) for the sequences' lanes, T past them."""
    index = lanes - SHIFT
    inside = (index >= 0) & (index <= batch)
    raw = tl.load(cu_ptr + index, mask=inside, other=-2147483647)
    bound = tl.minimum(tl.maximum(tl.associative_scan(raw, 0, _running_max), 0), tokens)
    return tl.where(index <= batch, bound, tokens)


@triton.jit
def _pick(values, lanes, lane):
    return tl.sum(tl.where(lanes == lane, values, 0), axis=0)


@triton.jit
def segment_tile(cu_ptr, batch, tokens, tile, ROWS_PER_TOKEN: tl.constexpr, BLOCK: tl.constexpr, lanes):
    """Which rows tile `tile` of an extend kernel owns: (segment, the segment's first token, the
    tile's first row, the segment's end row). Segment 0 is q's tokens before the first sequence,
    segment b + 1 sequence b's (eager.extend_rows), segment B + 1 those after the last; each token
    is ROWS_PER_TOKEN rows (a KV head's query heads, or 1) and a segment's rows are cut into tiles
    of BLOCK, numbered in order. Rows count from token 0's first; a tile past the last one gets
    segment SEGMENTS_PAD and no rows. At most cdiv(T * ROWS_PER_TOKEN, BLOCK) + B + 2 tiles: the
    grid depends on shapes only. lanes: arange(0, SEGMENTS_PAD), a power of two above B + 1 (the
    caller makes it, so a Gluon kernel can give it a layout)."""
    lo = _segment_bounds(cu_ptr, lanes, batch, tokens, 1)
    hi = _segment_bounds(cu_ptr, lanes, batch, tokens, 0)
    tiles = ((hi - lo) * ROWS_PER_TOKEN + BLOCK - 1) // BLOCK
    tiles_end = tl.cumsum(tiles, 0)
    segment = tl.sum((tiles_end <= tile).to(tl.int32), axis=0)
    segment_start = _pick(lo, lanes, segment)
    first_row = segment_start * ROWS_PER_TOKEN + (tile - _pick(tiles_end - tiles, lanes, segment)) * BLOCK
    return segment, segment_start, first_row, _pick(hi, lanes, segment) * ROWS_PER_TOKEN


@triton.jit
def segment_sequence(segment, cu_ptr, seq_lens_ptr, batch, max_pages, PAGE: tl.constexpr):
    """An extend kernel's segment (segment_tile) as a sequence: (whether it is one, its index, safe
    to load with when it is not, the position of token 0 in it, the positions it attends). Token t
    of sequence b sits at position seq_lens[b] - cu_seqlens_q[b + 1] + t; a segment that is no
    sequence has no positions."""
    is_sequence = (segment >= 1) & (segment <= batch)
    b_safe = tl.where(is_sequence, segment - 1, 0)
    seq_len = tl.load(seq_lens_ptr + b_safe, mask=is_sequence, other=0)
    diagonal = seq_len - tl.load(cu_ptr + b_safe + 1, mask=is_sequence, other=0)
    return is_sequence, b_safe, diagonal, context_len(seq_len, max_pages, PAGE)


@triton.jit
def diagonal_start(start, end, query_pos, ok, BLOCK_N: tl.constexpr):
    """Where a program's diagonal tiles begin in its split [start, end): the tiles before, whole
    BLOCK_N tiles from `start` below every real row's query position (`ok` rows), are seen whole
    by all of them; from there some row may not see a position another one does."""
    first_unseen = tl.min(tl.where(ok, query_pos, end), axis=0) + 1
    return start + tl.maximum(tl.minimum(first_unseen, end) - start, 0) // BLOCK_N * BLOCK_N
