"""An FP4 KV cache as an `nn.Module`: its tensors are module buffers with fixed addresses, which is
what torch.compile's CUDA-graph trees need to replay decode steps without copying the cache."""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .methods import FP4KVCacheQuantMethod, get_fp4_kv_cache_quant_method


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


class FP4KVCache(nn.Module):
    """All layers' FP4 K/V caches, allocated by a quantization method (a registry name or instance).

    Allocate it on the device it will run on: the method keeps references to the same tensors
    (for calibration and scale loading), so moving the module with `.to()` would split them.
    """

    def __init__(self, method: str | FP4KVCacheQuantMethod, size: int, head_num: int, head_dim: int,
                 layer_num: int, device=None):
        super().__init__()
        self.method = get_fp4_kv_cache_quant_method(method) if isinstance(method, str) else method
        b = self.method.create_buffers(size, head_num, head_dim, layer_num, device)
        recipe = self.method.fmt.name
        k_g = b.k_global_scales or [None] * layer_num
        v_g = b.v_global_scales or [None] * layer_num
        self.layers = nn.ModuleList(
            FP4KVLayerCache(recipe, b.k_data[i], b.v_data[i], b.k_scales[i], b.v_scales[i], k_g[i], v_g[i])
            for i in range(layer_num)
        )
        self.size, self.head_num, self.head_dim = size, head_num, head_dim

    def bytes_per_token(self) -> int:
        return self.method.compute_cell_size(self.head_num, self.head_dim, len(self.layers))
