"""What both split-K decode kernels share (triton_decode.py and gluon_decode.py import it; it
imports neither).

Both kernels give each (sequence, KV head, split) program a slice of the context and write a
partial output and its log-sum-exp per split (split_outputs); one split writes `out` itself, more
are combined by _merge_splits_kernel (merge_splits), which also writes the final log-sum-exp when
the caller asks for it (launch_splits gives such calls at least two splits). They take the same leading arguments
(split_kernel_arguments) and read q in the same permuted key-column order (key_pair).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .formats import FP4Format, ScaleRule
from .paged_kv import PagedKV
from .triton_kernels import global_scale_pair

_MERGE_SPLITS_PER_STEP = 8  # splits the merge kernel reads at once: 8 x D fp32 per program


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`, for sizing the splits; 4 off CUDA."""
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so the merge is exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def key_pair(k, D: tl.constexpr):
    """The physical pair behind column k of both kernels' key tiles (triton_decode._key_tile,
    gluon_decode._key_columns): k = 16 s + 8 h + 2 c + e -> D/8 c + 4 s + 2 h + e."""
    return (k // 2 % 4) * (D // 8) + (k // 16) * 4 + (k // 8 % 2) * 2 + k % 2


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
    """What both split kernels take up to GROUP: the positional arguments and the shared
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
                     E4M3_SCALES=fmt.scale_rule is ScaleRule.E4M3_AMAX_OVER_6G, HAS_G=has_g,
                     GROUP=hq // kv.kv_heads)
    return args, constants


@triton.jit
def _merge_splits_kernel(partial_out_ptr, partial_lse_ptr, out_ptr, lse_ptr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         SPLITS_PER_STEP: tl.constexpr, HAS_LSE: tl.constexpr):
    """One (sequence, query head): combine the splits' partial outputs by their log-sum-exps (base
    2), and with HAS_LSE store the total's in natural log (-inf when no split saw a position).

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
    if HAS_LSE:
        lse_total = tl.where(total > 0, (top + tl.log2(tl.where(total > 0, total, 1.0))) * 0.6931471805599453,
                             float("-inf"))
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
