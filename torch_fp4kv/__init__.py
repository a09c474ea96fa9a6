"""torch_fp4kv: keep an attention KV cache in 4-bit floating point, under torch.compile and CUDA graphs.

- `torch_fp4kv.ops`: the `torch.ops.fp4kv.*` operators and the format table.
- Strategies: `get_fp4_kv_cache_quant_method("nvfp4" | "nvfp4_4over6" | "blockfp4" | "mxfp4")`, options spelled
  after the name (`"nvfp4+rot+k8"`) or given as a `KVCacheOptions`.
- `FP4KVPool`: an engine's pool, an `nn.Module` holding every layer's cache (`FP4KVPoolLayer`) as buffers.
- `torch_fp4kv.hf`: `FP4Cache`, the cache for transformers models.
- `torch_fp4kv.checkpoint_scales`: the KV scales of quantized checkpoints (llm-compressor,
  ModelOpt) read as a calibration, and a calibration written as them (needs safetensors).
- `torch_fp4kv.sglang`: SGLang's FP4 KV cache interface under SGLang's names and signatures, for porting.

Former names, kept as aliases for one release: FP4KVCache (FP4KVPool), FP4KVLayerCache
(FP4KVPoolLayer), NVFP4KVMethod / BlockFP4KVMethod / MXFP4KVMethod / TableFP4KVMethod
(NVFP4Method / BlockFP4Method / MXFP4Method / TableFP4Method).
"""

from . import ops
from .layer_cache import FP4KVLayerCache, FP4KVPoolLayer
from .methods import (
    FP4_KV_CACHE_QUANT_REGISTRY,
    AttentionRead,
    BlockFP4KVMethod,
    BlockFP4Method,
    FP4KVBuffers,
    FP4KVCacheQuantMethod,
    MXFP4KVMethod,
    MXFP4Method,
    NVFP4FourOverSixMethod,
    NVFP4KVMethod,
    NVFP4Method,
    TableFP4KVMethod,
    TableFP4Method,
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
from .pool import FP4KVCache, FP4KVPool

__all__ = [
    "AttentionRead",
    "FORMATS",
    "FP4_KV_CACHE_QUANT_REGISTRY",
    "BlockFP4KVMethod",
    "BlockFP4Method",
    "FP4KVBuffers",
    "FP4KVCache",
    "FP4KVCacheQuantMethod",
    "FP4KVCacheRecipe",
    "FP4KVLayerCache",
    "FP4KVPool",
    "FP4KVPoolLayer",
    "KVCacheOptions",
    "MXFP4KVMethod",
    "MXFP4Method",
    "NVFP4FourOverSixMethod",
    "NVFP4KVMethod",
    "NVFP4Method",
    "TableFP4KVMethod",
    "TableFP4Method",
    "decode_attention",
    "dequantize",
    "extend_attention",
    "gather_dequantize",
    "get_fp4_kv_cache_quant_method",
    "quantize",
    "quantize_and_store",
    "register_fp4_kv_cache_quant_method",
]
