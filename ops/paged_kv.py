"""The paged FP4 K/V cache that decode attention reads, as one named bundle.

`torch.ops.fp4kv.decode_attention` keeps a flat schema (its arguments one by one); the op builds a
`PagedKV` once and hands it to the argument checks and to every backend, so the cache's nine
arguments are spelled out in one place.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor


class PagedKV(NamedTuple):
    """One layer's cache buffers [slots, Hkv, ...] and the page table that maps each sequence's
    positions to slots: slot = block_table[b, pos // page_size] * page_size + pos % page_size, for
    pos < seq_lens[b]. Global scales are NVFP4's (float32 [1] device tensors) or None.

    A NamedTuple rather than a dataclass: torch.compile traces through its construction in the
    Python entry point (api.py) like a tuple."""

    k_data: Tensor
    k_scales: Tensor
    v_data: Tensor
    v_scales: Tensor
    block_table: Tensor
    seq_lens: Tensor
    page_size: int
    k_global_scale: Optional[Tensor] = None
    v_global_scale: Optional[Tensor] = None

    @property
    def kv_heads(self) -> int:
        return self.k_data.shape[1]

    @property
    def num_pages(self) -> int:
        """Pages the cache holds (page ids outside [0, num_pages) read as zeros)."""
        return self.k_data.shape[0] // self.page_size

    @property
    def max_pages(self) -> int:
        """Pages per sequence in the table: with page_size, the longest context the grid covers."""
        return self.block_table.shape[1]

    @property
    def max_len(self) -> int:
        return self.max_pages * self.page_size
