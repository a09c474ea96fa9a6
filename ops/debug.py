"""Debug mode: the value checks an engine author turns on while integrating.

By contract the ops never read index values on the host (checks.py, README "Input contract"): a
slot outside the cache is skipped, a page id outside it reads as zeros, so the hot path never
waits for the device, and an engine's off-by-one loses tokens without a trace. With
`TORCH_FP4KV_DEBUG=1` (read at every call, so it can be toggled; `debug_checks()` sets it for a
block) the real kernel of each op validates its indices on the host after the metadata checks and
raises a ValueError naming the argument, the first bad index and its value, before anything is
written. What it accepts:

- `loc` (quantize_and_store, gather_dequantize): every slot in [0, slots), or exactly -1, the
  padding engines give CUDA-graph batch sizes; duplicate slots stay legal (the last token wins).
- `seq_lens[b]` in [0, max_pages * page_size], and every page id sequence b reaches,
  block_table[b, :ceil(seq_lens[b] / page_size)], in [0, pages); entries past them are never read.
- `cu_seqlens_q` (extend_attention): every offset in [0, T] and none below the one before it, and
  each sequence's new tokens cu_seqlens_q[b + 1] - cu_seqlens_q[b] at most seq_lens[b].

It synchronizes with the device at every call: an integration aid, not a serving setting. Off, an
op pays only for reading the variable. During CUDA-graph capture, where a host sync is illegal,
nothing is checked (replays never run Python anyway): check a step eagerly before capturing it.
"""

from __future__ import annotations

import os

import torch

from .environment import environment_variable
from .paged_kv import PagedKV
from .slots import in_cache

ENV_VAR = "TORCH_FP4KV_DEBUG"
PADDING_SLOT = -1


def enabled(device: torch.device) -> bool:
    """Whether this call's values are checked: TORCH_FP4KV_DEBUG=1 ("0" or unset: off; any other
    value raises, so a typo never leaves the checks silently off), outside CUDA-graph capture."""
    value = os.environ.get(ENV_VAR, "0")
    if value in ("0", ""):
        return False
    if value != "1":
        raise ValueError(f"{ENV_VAR}={value!r} is neither 1 (debug checks on) nor 0 (off)")
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def debug_checks(on: bool = True):
    """Run the block with TORCH_FP4KV_DEBUG=1 (on=False: 0), then restore the variable."""
    return environment_variable(ENV_VAR, "1" if on else "0")


def _first(bad: torch.Tensor) -> tuple[int, ...] | None:
    """The index of the first True of a mask in row-major order, or None (one host sync)."""
    hits = bad.nonzero()
    return tuple(hits[0].tolist()) if hits.shape[0] else None


def loc_values(loc: torch.Tensor, num_slots: int) -> None:
    """Every slot of loc in [0, num_slots), or exactly PADDING_SLOT."""
    loc = loc.long()
    bad = _first(~in_cache(loc, num_slots) & (loc != PADDING_SLOT))
    if bad is not None:
        (i,) = bad
        raise ValueError(f"loc[{i}] = {int(loc[i])} is outside the cache's {num_slots} slots "
                         f"(debug mode accepts [0, {num_slots}) and {PADDING_SLOT} for padding)")


def paged_kv_values(kv: PagedKV) -> None:
    """seq_lens within the page table, and every page id a sequence reaches within the cache."""
    lengths = kv.seq_lens.long()
    bad = _first((lengths < 0) | (lengths > kv.max_len))
    if bad is not None:
        (b,) = bad
        raise ValueError(f"seq_lens[{b}] = {int(lengths[b])} is outside [0, {kv.max_len}]: block_table has "
                         f"{kv.max_pages} pages of {kv.page_size} per sequence")
    reached = (lengths + kv.page_size - 1) // kv.page_size
    page = kv.block_table.long()
    in_use = torch.arange(kv.max_pages, device=page.device)[None, :] < reached[:, None]
    bad = _first(in_use & ~in_cache(page, kv.num_pages))
    if bad is not None:
        b, p = bad
        raise ValueError(f"block_table[{b}, {p}] = {int(page[b, p])} is outside the cache's {kv.num_pages} pages "
                         f"(sequence {b}, of length {int(lengths[b])}, reaches its first {int(reached[b])} pages)")


def cu_seqlens_q_values(cu_seqlens_q: torch.Tensor, num_rows: int, seq_lens: torch.Tensor) -> None:
    """cu_seqlens_q's offsets in [0, num_rows] and nondecreasing, and no sequence with more new
    tokens than seq_lens counts."""
    cu = cu_seqlens_q.long()
    below_previous = torch.zeros_like(cu, dtype=torch.bool)
    below_previous[1:] = cu[1:] < cu[:-1]
    bad = _first((cu < 0) | (cu > num_rows) | below_previous)
    if bad is not None:
        (i,) = bad
        value = int(cu[i])
        why = (f"is outside q's {num_rows} rows [0, {num_rows}]" if not 0 <= value <= num_rows
               else f"is below cu_seqlens_q[{i - 1}] = {int(cu[i - 1])} (offsets must not decrease)")
        raise ValueError(f"cu_seqlens_q[{i}] = {value} {why}")
    new_tokens = cu[1:] - cu[:-1]
    lengths = seq_lens.long()
    bad = _first(new_tokens > lengths)
    if bad is not None:
        (b,) = bad
        raise ValueError(f"seq_lens[{b}] = {int(lengths[b])} is less than sequence {b}'s {int(new_tokens[b])} new "
                         f"tokens (cu_seqlens_q[{b + 1}] - cu_seqlens_q[{b}])")
