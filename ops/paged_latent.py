"""The paged latent (MLA) cache that mla_decode_attention reads, as one named bundle.

The op keeps a flat schema; everything past it (checks, backends, the Python entry point) works on
a `PagedLatent`. `from_op_args` and `op_args` convert between the bundle and the schema's argument
tail, so the order in which the schema spells the cache lives here only.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

from .paged_kv import PagedKV


class PagedLatent(NamedTuple):
    """One layer's latent cache as a one-head cache: latent_data [slots, 1, R/2] and latent_scales
    [slots, 1, R/block] (c_kv in FP4), rope_data [slots, 1, P] (k_pe in FP8 E4M3), and the page
    table (PagedKV's rule: slot = block_table[b, pos // page_size] * page_size + pos % page_size,
    for pos < seq_lens[b]). Global scales: float32 [1] device tensors or None."""

    latent_data: Tensor
    latent_scales: Tensor
    rope_data: Tensor
    block_table: Tensor
    seq_lens: Tensor
    page_size: int
    latent_global_scale: Optional[Tensor] = None
    rope_global_scale: Optional[Tensor] = None

    @classmethod
    def from_op_args(cls, latent_data: Tensor, latent_scales: Tensor, rope_data: Tensor, block_table: Tensor,
                     seq_lens: Tensor, page_size: int, recipe: str, sm_scale: float,
                     latent_global_scale: Optional[Tensor] = None,
                     rope_global_scale: Optional[Tensor] = None) -> tuple[PagedLatent, str, float]:
        """(cache, recipe, sm_scale) from mla_decode_attention's schema tail (every argument after q)."""
        return cls(latent_data, latent_scales, rope_data, block_table, seq_lens, page_size, latent_global_scale,
                   rope_global_scale), recipe, sm_scale

    def op_args(self, recipe: str, sm_scale: float) -> tuple:
        """The schema's argument tail for this cache: the inverse of from_op_args."""
        return (self.latent_data, self.latent_scales, self.rope_data, self.block_table, self.seq_lens, self.page_size,
                recipe, sm_scale, self.latent_global_scale, self.rope_global_scale)

    @property
    def rope_scales(self) -> Tensor:
        """k_pe's block scales: none (FP8 E4M3), as the zero-width [slots, 1, 0] the FP8 format reads."""
        return self.rope_data.new_empty((*self.rope_data.shape[:2], 0))

    def as_paged_kv(self) -> PagedKV:
        """The cache as the MHA kernels see one: K = k_pe (FP8), V = the latent (FP4), one KV head;
        what the page-table helpers (num_pages, max_pages, max_len) and the split rules read."""
        return PagedKV(self.rope_data, self.rope_scales, self.latent_data, self.latent_scales, self.block_table,
                       self.seq_lens, self.page_size, self.rope_global_scale, self.latent_global_scale)
