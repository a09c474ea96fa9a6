"""Calibrate an FP4 KV cache on a transformers model: one pass over text with an observer on every
layer's queries, keys and values, giving the calibration state dict (torch_fp4kv.calibration) that
`FP4Cache(..., calibration=)` and `get_fp4_kv_cache_quant_method(...).load_scales_from_model` load,
and `torch_fp4kv.checkpoint_scales.save_kv_scales` writes into a checkpoint for vLLM and SGLang.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..calibration import calibrate_layer, calibration_state_dict
from ..layer_cache import FP4KVPoolLayer
from ..methods import table_format
from ..options import KVCacheOptions
from .cache import ATTENTION_NAME


@torch.no_grad()
def calibrate(model, input_ids: torch.Tensor, recipe: str = "nvfp4", *, rotate: bool | None = None,
              smooth_k: bool | None = None, channel_scale_k: bool | None = None,
              k_fp8: bool | None = None) -> dict[str, torch.Tensor]:
    """Run `model` over `input_ids` [B, T] (no padding) with an observer on every layer's real
    post-RoPE queries, keys and values, and return the calibration state dict of `recipe` with its
    options (spelled in it, `"nvfp4+rot+smooth+chscale"`, or as keywords; sinks and a recent window
    change nothing here): `layers.{i}.k_mean` when smoothing, `k_channel_scale` when scaling K
    channels (`calibrate_layer`'s rule, from K and each KV head's queries), `k_scale`/`v_scale` of
    what is quantized where the
    formats have global scales (NVFP4 amax / (448 * 6), FP8 keys amax / 448). For
    `FP4Cache(..., calibration=)` and `torch.save`."""
    method, options = KVCacheOptions.resolve(recipe, rotate=rotate, smooth_k=smooth_k,
                                             channel_scale_k=channel_scale_k, k_fp8=k_fp8)
    fmt = table_format(method)
    seen: dict[int, tuple[torch.Tensor, ...]] = {}

    def observe(module, query, key, value, attention_mask, **kwargs):
        seen[module.layer_idx] = tuple(x.transpose(1, 2).float() for x in (key, value, query))  # [B, T, H, D]
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    name = f"{ATTENTION_NAME}_observe"
    AttentionInterface.register(name, observe)
    AttentionMaskInterface.register(name, sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        model(input_ids, use_cache=False)
    finally:
        model.set_attn_implementation(before)
    layers = []
    for _, (k, v, q) in sorted(seen.items()):
        layers.append(FP4KVPoolLayer.allocate(fmt, options.method_options, 1, k.shape[-2], k.shape[-1],
                                              input_ids.device))
        calibrate_layer(layers[-1], k, v, q if options.channel_scale_k else None)
    return calibration_state_dict(layers)
