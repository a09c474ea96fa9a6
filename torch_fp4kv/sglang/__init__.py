"""SGLang's FP4 KV cache interface (SGLang PR #21954, and the names SGLang gives it today), over the
same fp4kv ops as the rest.

Code written against SGLang runs unchanged once its imports point here:
`sglang.srt.layers.quantization.fp4_kv_cache_quant_method` -> `torch_fp4kv.sglang.fp4_kv_cache_quant_method`,
`sglang.srt.layers.quantization.kv_cache_quant_method` -> `torch_fp4kv.sglang.kv_cache_quant_method`
(today's names),
`sglang.srt.layers.quantization.kvfp4_tensor` -> `torch_fp4kv.sglang.kvfp4_tensor` (or this package).
Names, signatures, buffer dicts and shapes follow SGLang, so `torch_fp4kv.sglang.NVFP4KVMethod`
is not `torch_fp4kv.NVFP4Method`. Today's SGLang names `NVFP4Method` and `MXFP4Method` clash with the
library's own classes (and SGLang's "mxfp4" is this library's blockfp4), so they live only in
kv_cache_quant_method, where SGLang code imports them from. New code should use the primary API
(`torch_fp4kv.get_fp4_kv_cache_quant_method`, `FP4KVPool`), whose layer caches own their buffers.
"""

from .fp4_kv_cache_quant_method import (
    FP4_KV_CACHE_QUANT_REGISTRY,
    BlockFP4KVMethod,
    FP4KVCacheQuantMethod,
    NVFP4KVMethod,
    get_fp4_kv_cache_quant_method,
)
from .kv_cache_quant_method import KV_CACHE_QUANT_REGISTRY, KVCacheQuantMethod, get_kv_cache_quant_method
from .kvfp4_tensor import (
    E2M1_MAX,
    BlockFP4KVQuantizeUtil,
    FP4KVCacheRecipe,
    FP4MXBlock16KVQuantizeUtil,
    KVFP4QuantizeUtil,
    NVFP4KVQuantizeUtil,
)

__all__ = [
    "E2M1_MAX",
    "FP4_KV_CACHE_QUANT_REGISTRY",
    "KV_CACHE_QUANT_REGISTRY",
    "BlockFP4KVMethod",
    "BlockFP4KVQuantizeUtil",
    "FP4KVCacheQuantMethod",
    "FP4KVCacheRecipe",
    "FP4MXBlock16KVQuantizeUtil",
    "KVCacheQuantMethod",
    "KVFP4QuantizeUtil",
    "NVFP4KVMethod",
    "NVFP4KVQuantizeUtil",
    "get_fp4_kv_cache_quant_method",
    "get_kv_cache_quant_method",
]
