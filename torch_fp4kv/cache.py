"""All layers' FP4 KV caches as one `nn.Module`, allocated by a quantization method."""

from __future__ import annotations

from torch import nn

from .methods import FP4KVCacheQuantMethod, TableFP4KVMethod, get_fp4_kv_cache_quant_method


class FP4KVCache(nn.Module):
    """All layers' FP4 K/V caches, allocated by a quantization method (a registry name or instance).

    `layers[i]` is the method's own FP4KVLayerCache for layer i: the method stores, reads and sets
    scales through it. Allocate the cache on the device it will run on: `.to()` moves the layers'
    tensors, but the method's `buffers` lists keep the originals.
    """

    def __init__(self, method: str | FP4KVCacheQuantMethod, size: int, head_num: int, head_dim: int,
                 layer_num: int, device=None):
        super().__init__()
        self.method = get_fp4_kv_cache_quant_method(method) if isinstance(method, str) else method
        if not isinstance(self.method, TableFP4KVMethod):
            raise TypeError(f"method must be a TableFP4KVMethod (it provides the per-layer caches), "
                            f"got {type(self.method).__name__}")
        self.method.create_buffers(size, head_num, head_dim, layer_num, device)
        self.layers = nn.ModuleList(self.method.layer(i) for i in range(layer_num))
        self.size, self.head_num, self.head_dim = size, head_num, head_dim

    def bytes_per_token(self) -> int:
        return self.method.compute_cell_size(self.head_num, self.head_dim, len(self.layers))
