"""SGLang-style utility names, so code written against SGLang's FP4 KV helpers ports unchanged."""

from __future__ import annotations

import torch

from .ops import dequantize, quantize


class NVFP4KVQuantizeUtil:
    """NVFP4 with FlashInfer's layout: data [..., D/2] uint8, scales [..., D/16] uint8 (E4M3 bits)."""

    @staticmethod
    def quantize(tensor: torch.Tensor, global_scale: torch.Tensor | None = None):
        return quantize(tensor, "nvfp4", global_scale)

    @staticmethod
    def dequantize(data, scales, global_scale: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16):
        return dequantize(data, scales, "nvfp4", global_scale, dtype)


class BlockFP4KVQuantizeUtil:
    """Block-16 FP4 with E8M0 scales (SGLang's FP4MXBlock16): [B, M, N] -> [B, M, N/2] + [B, M, N/16]."""

    @staticmethod
    def batched_quantize(tensor: torch.Tensor):
        if tensor.dim() != 3:
            raise ValueError(f"tensor must be 3-D [B, M, N]; got shape {tuple(tensor.shape)}")
        return quantize(tensor, "blockfp4")

    @staticmethod
    def batched_dequantize(quant_tensor, scale_factors, dtype: torch.dtype = torch.bfloat16):
        if quant_tensor.dim() != 3:
            raise ValueError(f"quant_tensor must be 3-D [B, M, N/2]; got shape {tuple(quant_tensor.shape)}")
        return dequantize(quant_tensor, scale_factors, "blockfp4", None, dtype)


KVFP4QuantizeUtil = BlockFP4KVQuantizeUtil
