"""The paged FP4 K/V cache that the attention ops read, as one named bundle.

The attention ops keep flat schemas (their arguments one by one). Everything past them works on a
`PagedKV`: the argument checks, every backend, and the Python entry points. `from_op_args` and
`op_args` convert between the bundle and the schemas' argument tail, so the order in which the
schemas spell the cache lives here only.
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

    @classmethod
    def from_op_args(cls, k_data: Tensor, k_scales: Tensor, v_data: Tensor, v_scales: Tensor, block_table: Tensor,
                     seq_lens: Tensor, page_size: int, recipe: str, sm_scale: float,
                     k_global_scale: Optional[Tensor] = None,
                     v_global_scale: Optional[Tensor] = None) -> tuple[PagedKV, str, float]:
        """(cache, recipe, sm_scale) from the tail that decode_attention, decode_attention_with_lse
        and extend_attention share in their schemas (every argument after q, or after cu_seqlens_q):
        recipe and sm_scale sit between page_size and the global scales there, because a schema
        puts its required arguments before the defaulted ones."""
        return cls(k_data, k_scales, v_data, v_scales, block_table, seq_lens, page_size, k_global_scale,
                   v_global_scale), recipe, sm_scale

    def op_args(self, recipe: str, sm_scale: float) -> tuple:
        """The schemas' argument tail for this cache: the inverse of from_op_args."""
        return (self.k_data, self.k_scales, self.v_data, self.v_scales, self.block_table, self.seq_lens,
                self.page_size, recipe, sm_scale, self.k_global_scale, self.v_global_scale)

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
