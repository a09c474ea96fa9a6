"""The Python entry points: check arguments, then call `torch.ops.fp4kv.*`.

The dispatcher parses arguments against the schema before any Python kernel runs, so a Python
float passed as a global scale would surface as a RuntimeError about casting. These wrappers run
the same checks as the kernels first, giving the TypeError/ValueError that names the argument, and
accept an `FP4KVCacheRecipe` where the schema takes a string. They trace under torch.compile like
any Python code (metadata checks only).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks


def quantize(x: Tensor, recipe: str, global_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """x [..., D] (bf16/fp16/fp32) -> (data uint8 [..., D/2], scales uint8 [..., D/block])."""
    fmt = checks.quantize_args(x, recipe, global_scale)
    return torch.ops.fp4kv.quantize(x, fmt.name, global_scale)


def dequantize(
    data: Tensor,
    scales: Tensor,
    recipe: str,
    global_scale: Optional[Tensor] = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """(data [..., D/2], scales [..., D/block]) -> [..., D] in dtype (bf16/fp16/fp32/float8_e4m3fn)."""
    fmt = checks.dequantize_args(data, scales, recipe, global_scale, dtype)
    return torch.ops.fp4kv.dequantize(data, scales, fmt.name, global_scale, dtype)


def quantize_and_store(
    k_data: Tensor,
    v_data: Tensor,
    k_scales: Tensor,
    v_scales: Tensor,
    loc: Tensor,
    k: Tensor,
    v: Tensor,
    recipe: str,
    k_global_scale: Optional[Tensor] = None,
    v_global_scale: Optional[Tensor] = None,
) -> None:
    """Quantize k, v [T, H, D] into cache slots loc [T] in place; slots outside the cache are skipped."""
    fmt = checks.quantize_and_store_args(
        k_data, v_data, k_scales, v_scales, loc, k, v, recipe, k_global_scale, v_global_scale
    )
    torch.ops.fp4kv.quantize_and_store(
        k_data, v_data, k_scales, v_scales, loc, k, v, fmt.name, k_global_scale, v_global_scale
    )


def gather_dequantize(
    data: Tensor,
    scales: Tensor,
    loc: Tensor,
    recipe: str,
    global_scale: Optional[Tensor] = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Dequantize cache slots loc [T] -> [T, H, D]; slots outside the cache read as zeros."""
    fmt = checks.gather_dequantize_args(data, scales, loc, recipe, global_scale, dtype)
    return torch.ops.fp4kv.gather_dequantize(data, scales, loc, fmt.name, global_scale, dtype)
