"""The eval's "window" protocol: attention implementations that simulate an FP4 cache without one.

Every key and value is rounded through the recipe (with its options, through a layer cache of
them) right before transformers' SDPA attention, so one forward pass scores a whole window as a
cache would have held it; with sinks and a recent window, each query attends those keys in full
precision instead (`mixed_precision_attention`). `torch_fp4kv.accuracy` runs it beside the real
cache ("decode").
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import ops
from ..calibration import layer_entries, load_calibration
from ..layer_cache import FP4KVPoolLayer
from ..options import KVCacheOptions
from .cache import ATTENTION_NAME


def roundtrip(states: torch.Tensor, recipe: str) -> torch.Tensor:
    """`states` quantized to `recipe` and back, as a cache would hold them (global scale 1)."""
    data, scales = ops.quantize(states, recipe)
    return ops.dequantize(data, scales, recipe, dtype=states.dtype)


def mixed_precision_attention(query, key, value, fp4_key, fp4_value, attention_mask, scaling: float,
                              sink_tokens: int, recent_tokens: int) -> torch.Tensor:
    """Attention (eager, float32) in which a query at position t (the last Tq of the Tk keys' positions)
    attends key j in full precision (`key`, `value` [B, Hkv, Tk, D]) where j < sink_tokens or
    t - j < recent_tokens, and through its FP4 round trip (`fp4_key`, `fp4_value`) otherwise: what
    `FP4Cache(sink_tokens=, recent_tokens=)` holds for a decode step at t. attention_mask: SDPA's
    (bool [B, 1, Tq, Tk], True where attended) or None for causal. Returns [B, Tq, Hq, D]."""
    group = query.shape[1] // key.shape[1]
    tq, tk = query.shape[2], key.shape[2]
    key, value, fp4_key, fp4_value = (repeat_kv(x, group).float() for x in (key, value, fp4_key, fp4_value))
    t = torch.arange(tk - tq, tk, device=query.device)[:, None]
    j = torch.arange(tk, device=query.device)[None, :]
    full = (j < sink_tokens) | (t - j < recent_tokens)  # [Tq, Tk]
    q = query.float()
    scores = torch.where(full, q @ key.transpose(-1, -2), q @ fp4_key.transpose(-1, -2)) * scaling
    visible = j <= t if attention_mask is None else attention_mask
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
    out = (weights * full) @ value + (weights * ~full) @ fp4_value
    return out.to(query.dtype).transpose(1, 2).contiguous()


def roundtrip_attention(recipe: str, *, rotate: bool | None = None, smooth_k: bool | None = None,
                        channel_scale_k: bool | None = None, k_fp8: bool | None = None,
                        calibration: dict | None = None, sink_tokens: int | None = None,
                        recent_tokens: int | None = None) -> str:
    """Register, and name, an attention implementation that rounds every key and value through
    `recipe` (an FP4 format, optionally with options: `"nvfp4+rot+smooth+sink4+recent128"`, or the
    option keywords as `FP4Cache` takes them) before transformers' SDPA attention: what an FP4
    cache holds, without a cache. With rotate / smooth_k / channel_scale_k / a calibration, the
    round trip goes through a layer cache of those options, each layer with its calibration; keys
    come back restored (channel scales multiplied back in, mean added), so q·restored k is the
    cache's (λq)·stored k plus softmax's constant q·μ. With sinks / a recent window, each query
    attends those keys in full precision instead."""
    fmt, options = KVCacheOptions.resolve(recipe, rotate=rotate, smooth_k=smooth_k, channel_scale_k=channel_scale_k,
                                          k_fp8=k_fp8, sink_tokens=sink_tokens, recent_tokens=recent_tokens)
    kv_recipe = ops.get_kv_recipe(options.kv_recipe(ops.get_format(fmt, "recipe").name))
    layers: dict[int, FP4KVPoolLayer] = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        if not (options.rotate or options.smooth_k or calibration):
            k, v = roundtrip(key, kv_recipe.k.name), roundtrip(value, kv_recipe.v.name)
        else:
            index = module.layer_idx
            if index not in layers:
                layers[index] = FP4KVPoolLayer.allocate(fmt, options.method_options, 1, key.shape[1], key.shape[3],
                                                        key.device)
                state = layer_entries(calibration, index)
                if state:
                    load_calibration([layers[index]], state, [index])
            k, v = layers[index].roundtrip(key.transpose(1, 2), value.transpose(1, 2))  # [B, T, H, D]
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        if not options.full_precision:
            return sdpa_attention_forward(module, query, k, v, attention_mask, **kwargs)
        if attention_mask is not None:
            attention_mask = attention_mask[:, :, :, : key.shape[-2]]  # as sdpa_attention_forward
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        out = mixed_precision_attention(query, key, value, k, v, attention_mask, scaling, options.sink_tokens,
                                        options.recent_tokens)
        return out, None

    name = f"{ATTENTION_NAME}_roundtrip_{options.spell(fmt)}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
