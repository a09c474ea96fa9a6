"""FlashInfer's NVFP4 KV kernels behind our kernel signatures (optional dependency).

Only what backends.py selects calls into here: `quantize` on SM100/SM120, and `dequantize` where
forced with TORCH_FP4KV_BACKEND=flashinfer (and by the benchmark, to compare with ours).
Both take the same bytes as eager.py: FlashInfer's dequantize computes (e2m1 * s) * g as we do.
"""

from __future__ import annotations

import flashinfer
import torch

from .formats import FP4Format


def _scale_or_one(global_scale, device) -> torch.Tensor:
    return global_scale if global_scale is not None else torch.ones(1, dtype=torch.float32, device=device)


def quantize(x, fmt: FP4Format, global_scale=None):
    d = x.shape[-1]
    data, scales = flashinfer.nvfp4_kv_quantize(x.reshape(-1, d).contiguous(), _scale_or_one(global_scale, x.device))
    return data.view(*x.shape[:-1], d // 2), scales.view(*x.shape[:-1], d // fmt.block_size)


def dequantize(data, scales, fmt: FP4Format, global_scale=None, dtype=torch.bfloat16):
    half_d = data.shape[-1]
    out = flashinfer.nvfp4_kv_dequantize(
        data.reshape(-1, half_d).contiguous(),
        scales.view(torch.uint8).reshape(-1, scales.shape[-1]).contiguous(),
        _scale_or_one(global_scale, data.device),
        output_dtype=dtype,
    )
    return out.view(*data.shape[:-1], half_d * 2)
