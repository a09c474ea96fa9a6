"""FlashInfer's NVFP4 KV kernels behind our kernel signatures (optional dependency).

Only TORCH_FP4KV_BACKEND=flashinfer calls into here (and the benchmark, to compare with ours):
`quantize` needs SM100/SM120, where the selection table lists it unverified, and `dequantize` runs
from SM80.
Both take the same bytes as eager.py: FlashInfer's dequantize computes (e2m1 * s) * g as we do;
the input contract's rules (an unusable global scale gives NaN, outputs saturate at the dtype's
largest finite value) are applied around its calls.
"""

from __future__ import annotations

import flashinfer
import torch

from .eager import usable_global_scale
from .formats import FP4Format


def _global_scale_tensor(global_scale, like: torch.Tensor) -> torch.Tensor:
    return usable_global_scale(global_scale, like).reshape(1)


def quantize(x, fmt: FP4Format, global_scale=None):
    d = x.shape[-1]
    data, scales = flashinfer.nvfp4_kv_quantize(x.reshape(-1, d).contiguous(), _global_scale_tensor(global_scale, x))
    return data.view(*x.shape[:-1], d // 2), scales.view(*x.shape[:-1], d // fmt.block_size)


def dequantize(data, scales, fmt: FP4Format, global_scale=None, dtype=torch.bfloat16):
    half_d = data.shape[-1]
    out = flashinfer.nvfp4_kv_dequantize(
        data.reshape(-1, half_d).contiguous(),
        scales.view(torch.uint8).reshape(-1, scales.shape[-1]).contiguous(),
        _global_scale_tensor(global_scale, data),
        output_dtype=dtype,
    )
    largest = torch.finfo(dtype).max
    return out.clamp_(-largest, largest).view(*data.shape[:-1], half_d * 2)
