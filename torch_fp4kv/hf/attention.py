"""The "fp4kv" attention implementation, registered with transformers' AttentionInterface.

With an `FP4Cache` the keys and values it receives are `FP4KVChunk`s, and the cache layer stores
and attends (decode reads FP4 with `fp4kv.decode_attention`). Without a cache (`use_cache=False`)
it is plain causal attention over the chunk.

Masks: transformers builds 4D masks over cache positions, which this cache does not use (padding
is never stored, sliding layers are rings). The mask function registered for "fp4kv" hands the
attention only which of the new tokens are real, `[B, T]` bool; the cache remembers the rest. So a
2D attention mask in a decode step needs only its last columns, and may be left out.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import ops
from ..methods import get_fp4_kv_cache_quant_method
from .cache import ATTENTION_NAME, FP4KVChunk, layer_calibration
from .positional import positional_attention


def new_tokens_mask(batch_size: int, q_length: int, *args, attention_mask=None, **kwargs):
    """The "fp4kv" mask: which of the `q_length` new tokens are real ([B, q_length] bool), from the
    2D padding mask's last columns; None when there is no mask (every token is real)."""
    if attention_mask is None:
        return None
    return attention_mask[:, -q_length:].to(torch.bool)


def fp4kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    sliding_window=None, softcap=None, **kwargs):
    """transformers attention signature: query [B, Hq, T, D]; returns ([B, T, Hq, D], None)."""
    if dropout:
        raise ValueError(f"dropout: the fp4kv attention is for inference; got {dropout}")
    if softcap is not None:
        raise ValueError("softcap: attention logit soft-capping is not supported by fp4kv.decode_attention")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: the fp4kv attention takes a 2D padding mask; got shape "
                         f"{tuple(attention_mask.shape)}")
    scaling = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
    if isinstance(key, FP4KVChunk):
        out = key.layer.attend(query, key.states, value.states, attention_mask, scaling)
    elif key.shape[-2] != query.shape[-2]:
        raise TypeError(f"the fp4kv attention needs an FP4Cache or no cache (use_cache=False); got "
                        f"{key.shape[-2]} keys for {query.shape[-2]} queries, as from a cache of full-precision keys")
    else:
        real = attention_mask
        if real is None:
            real = torch.ones(query.shape[0], query.shape[2], dtype=torch.bool, device=query.device)
        positions = real.cumsum(1) - 1
        out = positional_attention(query, key, value, positions, real, positions, real, scaling, sliding_window)
    return out.transpose(1, 2).contiguous(), None


def roundtrip(states: torch.Tensor, recipe: str) -> torch.Tensor:
    """`states` quantized to `recipe` and back, as a cache would hold them (global scale 1)."""
    data, scales = ops.quantize(states, recipe)
    return ops.dequantize(data, scales, recipe, dtype=states.dtype)


def _layer_cache(recipe: str, heads: int, head_dim: int, device, calibration, **options):
    """A one-slot, one-layer FP4KVLayerCache carrying the options and a layer's calibration: its
    `roundtrip` is what the FP4Cache layer would give back."""
    method = get_fp4_kv_cache_quant_method(recipe, **options)
    method.create_buffers(1, heads, head_dim, 1, device)
    if calibration:
        method.load_scales_from_model(calibration)
    return method.layer(0)


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


def roundtrip_attention(recipe: str, *, rotate: bool = False, smooth_k: bool = False, k_fp8: bool = False,
                        calibration: dict | None = None, sink_tokens: int = 0, recent_tokens: int = 0) -> str:
    """Register, and name, an attention implementation that rounds every key and value through
    `recipe` before transformers' SDPA attention: what an FP4 cache holds, without a cache. With
    options (`FP4Cache`'s), the round trip goes through them, each layer with its calibration; with
    `sink_tokens`/`recent_tokens`, each query attends those keys in full precision instead
    (mixed_precision_attention)."""
    ops.get_format(recipe, "recipe")
    options = {"rotate": rotate, "smooth_k": smooth_k, "k_fp8": k_fp8}
    k_recipe = ops.FP8_E4M3.name if k_fp8 else recipe
    layers: dict[int, object] = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        if not (rotate or smooth_k or calibration):
            k, v = roundtrip(key, k_recipe), roundtrip(value, recipe)
        else:
            index = module.layer_idx
            if index not in layers:
                layers[index] = _layer_cache(recipe, key.shape[1], key.shape[3], key.device,
                                             layer_calibration(calibration, index), **options)
            k, v = layers[index].roundtrip(key.transpose(1, 2), value.transpose(1, 2))  # [B, T, H, D]
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        if not (sink_tokens or recent_tokens):
            return sdpa_attention_forward(module, query, k, v, attention_mask, **kwargs)
        if attention_mask is not None:
            attention_mask = attention_mask[:, :, :, : key.shape[-2]]  # as sdpa_attention_forward
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        out = mixed_precision_attention(query, key, value, k, v, attention_mask, scaling, sink_tokens, recent_tokens)
        return out, None

    name = (f"{ATTENTION_NAME}_roundtrip_{recipe}" + "".join(f"_{n}" for n, on in options.items() if on)
            + (f"_sink{sink_tokens}_recent{recent_tokens}" if sink_tokens or recent_tokens else ""))
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


@torch.no_grad()
def calibrate(model, input_ids: torch.Tensor, recipe: str = "nvfp4", *, rotate: bool = False,
              smooth_k: bool = False, k_fp8: bool = False) -> dict[str, torch.Tensor]:
    """Run `model` over `input_ids` [B, T] (no padding) with an observer on every layer's real
    post-RoPE keys and values, and return the calibration state dict of `recipe` with these
    options (`layers.{i}.k_mean` when smoothing, `k_scale`/`v_scale` of what is quantized where
    the formats have global scales: NVFP4 amax / (448 * 6), FP8 keys amax / 448): for
    `FP4Cache(..., calibration=)` and `torch.save`."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(module, query, key, value, attention_mask, **kwargs):
        seen[module.layer_idx] = (key.transpose(1, 2).float(), value.transpose(1, 2).float())  # [B, T, H, D]
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
    _, _, heads, head_dim = seen[0][0].shape
    method = get_fp4_kv_cache_quant_method(recipe, rotate=rotate, smooth_k=smooth_k, k_fp8=k_fp8)
    method.create_buffers(1, heads, head_dim, len(seen), input_ids.device)
    for index, (k, v) in sorted(seen.items()):
        method.calibrate(index, k, v)
    return method.calibration_state_dict()


def register() -> None:
    """Make attn_implementation="fp4kv" available (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, fp4kv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, new_tokens_mask)
