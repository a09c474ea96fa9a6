"""An engine's FP4 KV pool: every layer's cache as one `nn.Module`, allocated by a quantization method."""

from __future__ import annotations

from torch import nn

from .methods import FP4KVCacheQuantMethod, TableFP4Method, get_fp4_kv_cache_quant_method


class FP4KVPool(nn.Module):
    """Every layer's FP4 K/V cache for an engine, allocated by a quantization method: a registry
    name, optionally with options (`"nvfp4+rot+k8"`), or an instance.

    `layers[i]` is layer i's FP4KVPoolLayer, the owner of its tensors; the method stores, reads
    and sets scales through those same modules, and `workspace` is the method's FP8 prefill
    workspace (None without one), so `.to()` moves everything the method uses. (transformers
    models use `torch_fp4kv.hf.FP4Cache` instead.) `FP4KVCache` is this class's former name, kept
    as an alias for one release.
    """

    def __init__(self, method: str | FP4KVCacheQuantMethod, size: int, head_num: int, head_dim: int,
                 layer_num: int, device=None):
        super().__init__()
        self.method = get_fp4_kv_cache_quant_method(method) if isinstance(method, str) else method
        if not isinstance(self.method, TableFP4Method):
            raise TypeError(f"method must be a TableFP4Method (it provides the per-layer caches), "
                            f"got {type(self.method).__name__}")
        if self.method.buffers is not None:  # a second create_buffers would leave the other owner's layers behind
            raise ValueError(f"method: this {type(self.method).__name__} holds buffers already (another pool's, or "
                             "create_buffers was called); give each pool a method of its own")
        self.method.create_buffers(size, head_num, head_dim, layer_num, device)
        self.layers = nn.ModuleList(self.method.layer(i) for i in range(layer_num))
        self.workspace = self.method.workspace
        self.size, self.head_num, self.head_dim = size, head_num, head_dim

    def bytes_per_token(self) -> int:
        return self.method.compute_cell_size(self.head_num, self.head_dim, len(self.layers))


FP4KVCache = FP4KVPool  # former name, kept as an alias for one release
