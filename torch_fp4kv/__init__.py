"""torch_fp4kv: keep an attention KV cache in 4-bit floating point, under torch.compile and CUDA graphs.

- `torch_fp4kv.ops`: the `torch.ops.fp4kv.*` operators and the format table.
- Strategies: `get_fp4_kv_cache_quant_method("nvfp4" | "blockfp4" | "mxfp4")`.
- `FP4KVCache`: an `nn.Module` holding every layer's cache as buffers.
- `torch_fp4kv.sglang`: SGLang's FP4 KV cache interface under SGLang's names, for porting.
"""

from . import ops
from .cache import FP4KVCache
from .layer_cache import FP4KVLayerCache
from .methods import (
    FP4_KV_CACHE_QUANT_REGISTRY,
    AttentionRead,
    BlockFP4KVMethod,
    FP4KVBuffers,
    FP4KVCacheQuantMethod,
    MXFP4KVMethod,
    NVFP4KVMethod,
    TableFP4KVMethod,
    get_fp4_kv_cache_quant_method,
    register_fp4_kv_cache_quant_method,
)
from .ops import (
    FORMATS,
    FP4KVCacheRecipe,
    decode_attention,
    dequantize,
    extend_attention,
    gather_dequantize,
    quantize,
    quantize_and_store,
)
from .options import KVCacheOptions

__all__ = [
    "AttentionRead",
    "FORMATS",
    "FP4_KV_CACHE_QUANT_REGISTRY",
    "BlockFP4KVMethod",
    "FP4KVBuffers",
    "FP4KVCache",
    "FP4KVCacheQuantMethod",
    "FP4KVCacheRecipe",
    "FP4KVLayerCache",
    "KVCacheOptions",
    "MXFP4KVMethod",
    "NVFP4KVMethod",
    "TableFP4KVMethod",
    "decode_attention",
    "dequantize",
    "extend_attention",
    "gather_dequantize",
    "get_fp4_kv_cache_quant_method",
    "quantize",
    "quantize_and_store",
    "register_fp4_kv_cache_quant_method",
]
