"""torch_fp4kv.ops: FP4 KV-cache formats and the `torch.ops.fp4kv` operators.

This layer never imports from the rest of torch_fp4kv; importing it registers the ops.
"""

from . import library, mla_library  # noqa: F401  (register torch.ops.fp4kv.*)
from .backends import ENV_VAR as BACKEND_ENV_VAR, Backend, select_backend
from .debug import ENV_VAR as DEBUG_ENV_VAR, debug_checks
from .formats import (FORMATS, FP8_E4M3, K_FP8_SUFFIX, KV_RECIPES, LATENT_RECIPES, TENSOR_FORMATS, FP4Format,
                      FP4KVCacheRecipe, KVRecipe, LatentRecipe, ScaleChoice, ScaleRule, get_format, get_kv_recipe,
                      get_latent_recipe)
from .api import decode_attention, dequantize, extend_attention, gather_dequantize, quantize, quantize_and_store
from .mla_api import mla_decode_attention, mla_gather_dequantize, mla_store

__all__ = [
    "BACKEND_ENV_VAR",
    "Backend",
    "DEBUG_ENV_VAR",
    "FORMATS",
    "FP8_E4M3",
    "K_FP8_SUFFIX",
    "KV_RECIPES",
    "KVRecipe",
    "LATENT_RECIPES",
    "LatentRecipe",
    "TENSOR_FORMATS",
    "FP4Format",
    "FP4KVCacheRecipe",
    "ScaleChoice",
    "ScaleRule",
    "debug_checks",
    "decode_attention",
    "dequantize",
    "extend_attention",
    "gather_dequantize",
    "mla_decode_attention",
    "mla_gather_dequantize",
    "mla_store",
    "get_format",
    "get_kv_recipe",
    "get_latent_recipe",
    "quantize",
    "quantize_and_store",
    "select_backend",
]
