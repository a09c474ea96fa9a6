"""SGLang's KV cache strategies under the names SGLang gives them today
(`sglang.srt.layers.quantization.kv_cache_quant_method`): code written against that module runs
once its import points here. The classes are those of fp4_kv_cache_quant_method.py (SGLang PR
#21954's names), renamed where the behaviour is the same:

- `KVCacheQuantMethod` is `FP4KVCacheQuantMethod` (`scale_block_size` spells `SCALE_BLOCK_SIZE`);
- `NVFP4Method(num_layers, device, sm_version=120, native_prefill=False)` is `NVFP4KVMethod`;
- `MXFP4Method()` is `BlockFP4KVMethod` named "mxfp4": SGLang's block-16 FP4 with E8M0 scales
  (this library's `blockfp4`), not OCP MXFP4 (block 32, this library's `mxfp4`);
- `KV_CACHE_QUANT_REGISTRY` ({"nvfp4", "mxfp4"}, what `--fp4-kv-cache-recipe` picks) and
  `get_kv_cache_quant_method(name, **kwargs)`.

`NVFP4Method` and `MXFP4Method` here are SGLang's classes, not `torch_fp4kv.NVFP4Method` /
`torch_fp4kv.MXFP4Method` (the library's own; its MXFP4 is OCP's). SGLang's `NoneMethod` (BF16 /
FP8 pools, which do all their own work) has no counterpart here.
"""

from __future__ import annotations

from .fp4_kv_cache_quant_method import BlockFP4KVMethod, FP4KVCacheQuantMethod, NVFP4KVMethod, instantiate

__all__ = ["KV_CACHE_QUANT_REGISTRY", "KVCacheQuantMethod", "MXFP4Method", "NVFP4Method",
           "get_kv_cache_quant_method"]

KVCacheQuantMethod = FP4KVCacheQuantMethod
NVFP4Method = NVFP4KVMethod


class MXFP4Method(BlockFP4KVMethod):
    """SGLang's block-16 FP4 under today's name: BlockFP4KVMethod's buffers and bytes, `name` "mxfp4"."""

    name = "mxfp4"


KV_CACHE_QUANT_REGISTRY: dict[str, type[KVCacheQuantMethod]] = {
    "nvfp4": NVFP4Method,
    "mxfp4": MXFP4Method,
}


def get_kv_cache_quant_method(name: str, **kwargs) -> KVCacheQuantMethod:
    """Instantiate the method registered as `name` (kwargs go to its constructor)."""
    return instantiate(KV_CACHE_QUANT_REGISTRY, name, kwargs)
