"""What every attention kernel shares: triton_decode, triton_extend, triton_verify and gluon_decode
import it, and it imports none of them.

The kernels must agree on these, or their results stop being interchangeable:

- split-K: each program takes a slice of the context (split_count, positions_per_split,
  split_range) and writes a partial output and its log-sum-exp in base 2 (split_outputs,
  split_lse; the Triton kernels through triton_attention_tiles.store_split); one split writes
  `out` itself, more are combined by _merge_splits_kernel (merge_splits), which also writes the
  final log-sum-exp when the caller asks for it (launch_splits gives such calls at least two
  splits), and triton_verify merges two parts by the same weights (lse_weight);
- the inputs: the same leading arguments (split_kernel_arguments), the page table's rule
  (context_len, paged_rows), q read in the keys' permuted column order (key_pair, key_columns),
  the global scales (global_scales), and the interpreter's float32 staging (interpreter_fp32);
- the tensor cores' smallest tile side (MMA_MIN_SIDE, mma_side) and the softmax's base 2 (LOG2_E).

The @triton.jit rules that gluon_decode calls (context_len, split_range, paged_rows,
global_scales, key_pair, key_columns, split_lse) use only element-wise operations, tl.load and
reshapes, which Gluon forwards to Triton's own builtins (Triton 3.6 and 3.9): one rule compiles
into both languages. They must take no tl.arange or `[None, :]` indexing, which need a layout in
Gluon.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .formats import FP4Format
from .paged_kv import PagedKV
from .triton_codes import usable_global_scale
from .triton_launch import fp32_tiles, global_scale_pair

MMA_MIN_SIDE = 16  # tensor-core (mma) tiles need a side of at least 16: the short side is padded to it
POSITIONS_PER_SPLIT_MIN = 256  # a shorter split costs more in start-up and merging than it saves
LOG2_E = tl.constexpr(1.4426950408889634)  # the softmax runs in base 2 (exp2): scores are scaled by log2(e)
LN_2 = tl.constexpr(0.6931471805599453)  # base-2 log-sum-exps times ln 2 are natural ones
_MERGE_SPLITS_PER_STEP = 8  # splits the merge kernel reads at once: 8 x D fp32 per program


def mma_side(n: int) -> int:
    """n padded to a tensor-core tile side: a power of two, at least MMA_MIN_SIDE."""
    return max(MMA_MIN_SIDE, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`, for sizing the splits; 4 off CUDA."""
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so the merge is exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(programs: int, max_len: int, sms: int, waves: int, min_positions: int = POSITIONS_PER_SPLIT_MIN) -> int:
    """Splits of the context for `programs` programs with work: enough to fill `sms` SMs `waves`
    times, each split at least `min_positions` long. From static sizes only, so one CUDA graph
    serves every sequence length."""
    wanted = triton.cdiv(waves * sms, max(1, programs))
    return max(1, min(wanted, triton.cdiv(max_len, min_positions)))


def positions_per_split(max_len: int, splits: int, block_n: int) -> int:
    """Context positions per split: the context in `splits` slices of whole BLOCK_N tiles."""
    return triton.cdiv(triton.cdiv(max(max_len, 1), splits), block_n) * block_n


@contextlib.contextmanager
def interpreter_fp32(out: torch.Tensor, q: torch.Tensor):
    """(out, q) as a Triton attention kernel takes them: as given on a GPU; on the interpreter
    (triton_launch.fp32_tiles), whose bf16 casts and arithmetic are not faithful, q in float32 (same
    values) and a float32 output that is cast into `out` when the block ends."""
    if not fp32_tiles(q.device):
        yield out, q
        return
    q = q.float()
    staged = torch.empty_like(out, dtype=torch.float32)
    yield staged, q
    out.copy_(staged)


@triton.jit
def key_pair(k, D: tl.constexpr):
    """The physical pair behind column k of the kernels' key tiles (key_columns' order), the
    order q is read in: k = 16 s + 8 h + 2 c + e -> D/8 c + 4 s + 2 h + e."""
    return (k // 2 % 4) * (D // 8) + (k // 16) * 4 + (k // 8 % 2) * 2 + k % 2


@triton.jit
def key_columns(x, D: tl.constexpr):
    """Key pairs [N, ...] in byte order (D/2 per row) -> [N, D/2] in key_pair's column order.

    Any column order gives the same q.k if q is read in it too; this one hands each thread of a
    tensor-core A fragment (pairs 2c, 2c+1, 2c+8, 2c+9 of every 16, c = lane % 4) D/8 adjacent
    bytes per row: 16-byte loads, and one scale per block those bytes span."""
    N: tl.constexpr = x.shape[0]
    return tl.reshape(tl.permute(tl.reshape(x, (N, 4, D // 32, 2, 2)), (0, 2, 3, 1, 4)), (N, D // 2))


@triton.jit
def context_len(seq_len, max_pages, PAGE: tl.constexpr):
    """The positions a sequence attends: seq_len, capped at the page table's width."""
    return tl.minimum(seq_len, max_pages * PAGE)


@triton.jit
def split_range(split, positions_per_split, length):
    """(start, end) of split `split`'s positions below `length`; empty past it."""
    start = split * positions_per_split
    return start, tl.minimum(start + positions_per_split, length)


@triton.jit
def paged_rows(block_table_ptr, b, max_pages, num_pages, pos, valid, PAGE: tl.constexpr, HKV: tl.constexpr,
               kv_head):
    """Positions `pos` of sequence b -> (readable, cache rows of kv_head). A page id outside the
    cache reads as zero keys and values (eager's gather_dequantize rule): not readable."""
    page = tl.load(block_table_ptr + b.to(tl.int64) * max_pages + pos // PAGE, mask=valid, other=0)
    in_cache = valid & (page >= 0) & (page < num_pages)
    return in_cache, (page.to(tl.int64) * PAGE + pos % PAGE) * HKV + kv_head


@triton.jit
def global_scales(sm_scale, k_g_ptr, v_g_ptr, HAS_G: tl.constexpr):
    """(the scores' scale: sm_scale times K's global scale, in base 2 for exp2; V's global scale),
    each scale through usable_global_scale."""
    if HAS_G:
        k_g = usable_global_scale(tl.load(k_g_ptr))
        v_g = usable_global_scale(tl.load(v_g_ptr))
    else:
        k_g = 1.0
        v_g = 1.0
    return sm_scale * k_g * LOG2_E, v_g


@triton.jit
def split_lse(m, l):
    """A split's log-sum-exp in base 2 from its running maximum and sum; -inf where it saw nothing,
    NaN where its sum is NaN (a NaN score: eager's log-sum-exp of that row is NaN, never "empty")."""
    return tl.where(l > 0, m + tl.log2(l), tl.where(l == l, float("-inf"), float("nan")))


@triton.jit
def lse_weight(lse, top):
    """A part's weight in a merge by log-sum-exps (base 2, `top` at least the largest): 0 for a part
    that saw no position (lse = -inf), and for a NaN one, whose output is NaN already and makes
    the merged row NaN through 0 x NaN."""
    return tl.where(lse > float("-inf"), tl.exp2(lse - top), 0.0)


def split_outputs(out: torch.Tensor, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a split kernel writes: `out` itself for one split (no log-sum-exp is stored), else
    fp32 partial outputs [B, Hq, splits, D] and their log-sum-exps [B, Hq, splits]."""
    if splits == 1:
        return out, out
    batch, hq, d = out.shape
    return (torch.empty((batch, hq, splits, d), dtype=torch.float32, device=out.device),
            torch.empty((batch, hq, splits), dtype=torch.float32, device=out.device))


def launch_splits(splits: int, lse) -> int:
    """Splits to launch: `splits`, or 2 when the caller wants the log-sum-exp (`lse` not None) of a
    one-split launch. The kernels store a split's log-sum-exp only when there is a merge (a lone
    split writes `out` itself), and the merge kernel is what writes `lse`. The added split starts
    where the first one's positions end, past every sequence, so it is empty and weighs nothing."""
    return 2 if lse is not None and splits == 1 else splits


def split_kernel_arguments(q, kv: PagedKV, partial_out, partial_lse, fmt: FP4Format, sm_scale,
                           positions_per_split):
    """What every split kernel takes up to GROUP: the positional arguments and the shared
    constexprs. A lone global scale gets 1.0 beside it (global_scale_pair); the kernels index q,
    block_table and seq_lens as contiguous (engines pass slices)."""
    batch, hq, d = q.shape
    k_global_scale, v_global_scale = global_scale_pair(kv.k_global_scale, kv.v_global_scale, q.device)
    has_g = k_global_scale is not None
    args = (q.contiguous(), kv.k_data, kv.k_scales.view(torch.uint8), kv.v_data, kv.v_scales.view(torch.uint8),
            k_global_scale if has_g else q, v_global_scale if has_g else q,
            kv.block_table.contiguous(), kv.seq_lens.contiguous(), partial_out, partial_lse, sm_scale,
            kv.max_pages, kv.num_pages, positions_per_split)
    constants = dict(HQ=hq, HKV=kv.kv_heads, D=d, BS=fmt.block_size, PAGE=kv.page_size,
                     E4M3_SCALES=fmt.e4m3_scales, HAS_G=has_g,
                     GROUP=hq // kv.kv_heads)
    return args, constants


@triton.jit
def _merge_splits_kernel(partial_out_ptr, partial_lse_ptr, out_ptr, lse_ptr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         SPLITS_PER_STEP: tl.constexpr, HAS_LSE: tl.constexpr):
    """One (sequence, query head): combine the splits' partial outputs by their log-sum-exps (base
    2), and with HAS_LSE store the total's in natural log (-inf when no split saw a position, NaN
    when one split's is NaN).

    Splits are read SPLITS_PER_STEP at a time with a running maximum, so the registers a program
    needs stay the same however many splits a short batch gets."""
    row = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, D)
    top = tl.full([1], float("-inf"), tl.float32)
    total = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    broken = tl.zeros([1], tl.int32)  # a split's log-sum-exp was NaN: the maximum and weights skip it
    for first in range(0, NUM_SPLITS, SPLITS_PER_STEP):
        splits = first + tl.arange(0, SPLITS_PER_STEP)
        present = splits < NUM_SPLITS
        lse = tl.load(partial_lse_ptr + row * NUM_SPLITS + splits, mask=present, other=float("-inf"))
        new_top = tl.maximum(top, tl.max(lse, axis=0))
        # Rescale what is summed so far to the new maximum (0 while no split has seen a position).
        rescale = tl.where(new_top > float("-inf"), tl.exp2(top - new_top), 0.0)
        weights = lse_weight(lse, new_top)
        partial = tl.load(partial_out_ptr + (row * NUM_SPLITS + splits)[:, None] * D + dims[None, :],
                          mask=present[:, None], other=0.0)
        acc = acc * rescale + tl.sum(partial * weights[:, None], axis=0)
        total = total * rescale + tl.sum(weights, axis=0)
        broken = tl.maximum(broken, tl.max((lse != lse).to(tl.int32), axis=0))
        top = new_top
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * D + dims, out.to(out_ptr.dtype.element_ty))
    if HAS_LSE:
        lse_total = tl.where(total > 0, (top + tl.log2(tl.where(total > 0, total, 1.0))) * LN_2, float("-inf"))
        lse_total = tl.where(broken > 0, float("nan"), lse_total)
        tl.store(lse_ptr + row + tl.arange(0, 1), lse_total)


def merge_splits(partial_out: torch.Tensor, partial_lse: torch.Tensor, out: torch.Tensor, splits: int,
                 lse: torch.Tensor | None = None) -> None:
    """Combine the splits of split_outputs into `out` (one split wrote it already), and write the
    natural log-sum-exp into `lse` [B, Hq] float32 when given (launch_splits: then splits > 1)."""
    if splits > 1:
        batch, hq, d = out.shape
        _merge_splits_kernel[(batch * hq,)](
            partial_out, partial_lse, out, out if lse is None else lse, D=d, NUM_SPLITS=splits,
            SPLITS_PER_STEP=min(_MERGE_SPLITS_PER_STEP, triton.next_power_of_2(splits)), HAS_LSE=lse is not None,
        )
