"""One layer's FP4 K/V cache as an `nn.Module`: the op calls that store, read and attend over it.

Its tensors are module buffers with fixed addresses, which is what torch.compile's CUDA-graph
trees need to replay decode steps without copying the cache. Both the strategies (methods.py)
and the whole-model cache (cache.py) go through it.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops


class FP4KVLayerCache(nn.Module):
    """One layer's K/V cache: data [slots, H, D/2], scales [slots, H, D/block], global scales."""

    def __init__(self, recipe: str, k_data, v_data, k_scales, v_scales, k_global_scale=None, v_global_scale=None):
        super().__init__()
        self.recipe = recipe
        for name, tensor in (("k_data", k_data), ("v_data", v_data), ("k_scales", k_scales), ("v_scales", v_scales),
                             ("k_global_scale", k_global_scale), ("v_global_scale", v_global_scale)):
            self.register_buffer(name, tensor)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating buffer; the ops need the global scales in float32,
        # and rounding them to bf16 would change the cache's values. Follow device moves only.
        scales = {name: getattr(self, name) for name in ("k_global_scale", "v_global_scale")}
        super()._apply(fn, recurse)
        for name, original in scales.items():
            if original is not None:
                setattr(self, name, original.to(fn(original).device))
        return self

    def store(self, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize k, v [T, H, D] into slots loc [T]."""
        ops.quantize_and_store(
            self.k_data, self.v_data, self.k_scales, self.v_scales, loc, k, v, self.recipe,
            self.k_global_scale, self.v_global_scale,
        )

    def read(self, loc: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots loc [T] as (k, v) [T, H, D] in dtype."""
        k = ops.gather_dequantize(self.k_data, self.k_scales, loc, self.recipe, self.k_global_scale, dtype)
        v = ops.gather_dequantize(self.v_data, self.v_scales, loc, self.recipe, self.v_global_scale, dtype)
        return k, v

    def decode(self, q, block_table, seq_lens, page_size: int, sm_scale: float | None = None, out=None):
        """Attention of one new token per sequence, q [B, Hq, D], over its paged context read in FP4."""
        return ops.decode_attention(q, self.k_data, self.k_scales, self.v_data, self.v_scales, block_table, seq_lens,
                                    page_size, self.recipe, self.k_global_scale, self.v_global_scale, sm_scale, out)
