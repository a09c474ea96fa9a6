"""SGLang's FP4 tensor utilities (`sglang.srt.layers.quantization.kvfp4_tensor`), over fp4kv ops.

Same names, signatures, shapes and dtypes as SGLang's; the bytes are this library's formats
(`nvfp4` is FlashInfer's `nvfp4_kv_quantize` layout, `blockfp4` SGLang's block-16 recipe).
"""

from __future__ import annotations

import enum

import torch

from .. import ops
from ..ops import checks
from ..ops.checks import ArgNames, check_rank, check_tensor
from ..ops.formats import E2M1_MAX

__all__ = ["E2M1_MAX", "BlockFP4KVQuantizeUtil", "FP4KVCacheRecipe", "FP4MXBlock16KVQuantizeUtil", "KVFP4QuantizeUtil",
           "NVFP4KVQuantizeUtil"]


class FP4KVCacheRecipe(enum.Enum):
    """SGLang's recipe enum, values as SGLang numbers them.

    SGLang's MXFP4 member is its block-16 recipe (this library's `blockfp4`), not OCP MXFP4,
    which has 32-element blocks (this library's `mxfp4`).
    """

    MXFP4 = 1
    NVFP4 = 2


def as_global_scale(value, name: str, device: torch.device) -> torch.Tensor:
    """A global scale as the ops take it: a Python number becomes a float32 [1] tensor on
    `device` (as SGLang converts it), a 0-d tensor gains its one dimension. None is refused:
    NVFP4 has no meaningful default once a layer has been calibrated."""
    if value is None:
        raise ValueError(f"{name}: NVFP4 needs the layer's global scale (a float32 tensor of one element)")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor([float(value)], dtype=torch.float32, device=device)
    check_tensor(value, name)
    return value.unsqueeze(0) if value.dim() == 0 else value


# The utilities' argument names, for the ops' checks.
QUANTIZE_NAMES = ArgNames(x="tensor")
NVFP4_DEQUANTIZE_NAMES = ArgNames(data="quant_tensor", scales="block_scales")
BLOCK_FP4_DEQUANTIZE_NAMES = ArgNames(data="quant_tensor", scales="scale_factors")
NVFP4, BLOCK_FP4 = ops.get_format("nvfp4"), ops.get_format("blockfp4")


def _batched(x, name: str, layout: str) -> None:
    check_tensor(x, name)
    check_rank(x, name, 3, layout)


class NVFP4KVQuantizeUtil:
    """NVFP4: E2M1 codes, FP8 E4M3 scale per 16 elements, FP32 global scale (dequantized value =
    code * block scale * global scale)."""

    @staticmethod
    def quantize(tensor: torch.Tensor, global_scale) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, M, N] -> (fp4 data uint8 [B, M, N/2], block scales float8_e4m3fn [B, M, N/16],
        global scale as a float32 tensor)."""
        _batched(tensor, "tensor", "[B, M, N]")
        global_scale = as_global_scale(global_scale, "global_scale", tensor.device)
        checks.check_quantize_args(tensor, NVFP4.name, global_scale, QUANTIZE_NAMES)
        data, scales = ops.quantize(tensor, NVFP4.name, global_scale)
        return data, scales.view(torch.float8_e4m3fn), global_scale

    @staticmethod
    def dequantize(quant_tensor: torch.Tensor, block_scales: torch.Tensor, global_scale, layer_id=None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """(data [B, M, N/2], block scales [B, M, N/16] uint8 or float8_e4m3fn) -> [B, M, N] in dtype
        (default bf16). Takes SGLang's two calls: `dequantize(data, scales, global_scale, dtype)`
        and PR #21954's `dequantize(data, scales, global_scale, layer_id, dtype)`, whose layer_id
        is unused (the global scale already is the layer's), as in SGLang."""
        if isinstance(layer_id, torch.dtype):  # the shorter call: the fourth argument is the dtype
            if dtype is not None:
                raise TypeError(f"dequantize got dtype twice: {layer_id} and dtype={dtype}")
            layer_id, dtype = None, layer_id
        if layer_id is not None and (not isinstance(layer_id, int) or isinstance(layer_id, bool)):
            raise TypeError(f"layer_id must be an int, got {type(layer_id).__name__}")
        dtype = torch.bfloat16 if dtype is None else dtype
        _batched(quant_tensor, "quant_tensor", "[B, M, N/2]")
        global_scale = as_global_scale(global_scale, "global_scale", quant_tensor.device)
        checks.check_dequantize_args(quant_tensor, block_scales, NVFP4.name, global_scale, dtype, NVFP4_DEQUANTIZE_NAMES)
        return ops.dequantize(quant_tensor, block_scales, NVFP4.name, global_scale, dtype)


class BlockFP4KVQuantizeUtil:
    """SGLang's block-16 FP4 (`blockfp4`): one E8M0 scale byte per 16 elements, no global scale.
    Scales come flattened per row, [B, M*N/16], as SGLang stores them."""

    @staticmethod
    def batched_quantize(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, M, N] -> (data uint8 [B, M, N/2], scale factors uint8 [B, M*N/16])."""
        _batched(tensor, "tensor", "[B, M, N]")
        checks.check_quantize_args(tensor, BLOCK_FP4.name, None, QUANTIZE_NAMES)
        data, scales = ops.quantize(tensor, BLOCK_FP4.name)
        return data, scales.flatten(1)

    @staticmethod
    def batched_dequantize(quant_tensor: torch.Tensor, scale_factors: torch.Tensor,
                           dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """(data [B, M, N/2], scale factors [B, M*N/16]) -> [B, M, N] in dtype."""
        _batched(quant_tensor, "quant_tensor", "[B, M, N/2]")
        scales = unflatten_scales(scale_factors, "scale_factors", quant_tensor, "quant_tensor", BLOCK_FP4)
        checks.check_dequantize_args(quant_tensor, scales, BLOCK_FP4.name, None, dtype, BLOCK_FP4_DEQUANTIZE_NAMES)
        return ops.dequantize(quant_tensor, scales, BLOCK_FP4.name, None, dtype)


# SGLang's names for the block-16 utility: before its NVFP4 support was added, and today's.
KVFP4QuantizeUtil = BlockFP4KVQuantizeUtil
FP4MXBlock16KVQuantizeUtil = BlockFP4KVQuantizeUtil


def unflatten_scales(scales, name: str, data: torch.Tensor, data_name: str, fmt: ops.FP4Format) -> torch.Tensor:
    """SGLang's per-row scales [rows, M*N/16] as the ops take them, [rows, M, N/16] (a view,
    so writes through it land in `scales`). `data` is the matching packed data [rows, M, N/2],
    checked here first: the scales are judged against it."""
    checks.check_packed_data(data, fmt, data_name)
    check_tensor(scales, name)
    rows, heads = data.shape[0], data.shape[1]
    width = heads * fmt.scales_width(fmt.head_dim_of(data.shape[-1]))
    if tuple(scales.shape) != (rows, width):
        raise ValueError(f"{name} must be 2-D [{rows}, {heads} * N/{fmt.block_size}] = {(rows, width)} to match "
                         f"{data_name} {tuple(data.shape)}; got shape {tuple(scales.shape)}")
    if not scales.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is read and written through a view)")
    return scales.view(rows, heads, width // heads)
