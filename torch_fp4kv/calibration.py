"""Calibration of layer caches, and the state dicts that carry it.

A calibration state dict holds, per layer i: `layers.{i}.k_mean` [H, D], K's per-head,
per-channel mean (caches that smooth K); `layers.{i}.k_channel_scale` [H, D], the K channel
scales λ (caches that scale K channels); `layers.{i}.k_scale` / `layers.{i}.v_scale` [1], the
global scales of what is quantized, where the formats have them (ModelOpt's names). Keys may
carry a prefix (`model.layers.3.self_attn.k_mean`): the layer is the number after `layers.`.
Methods (methods.py) and transformers' FP4Cache and calibration (hf/) read and write it here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from . import ops
from .layer_cache import FP4KVPoolLayer

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# state-dict entry -> the layer cache buffer it sets
ENTRY_BUFFERS = {"k_mean": "k_mean", "k_channel_scale": "k_channel_scale", "k_scale": "k_global_scale",
                 "v_scale": "v_global_scale"}
# The floor of both maxima in the channel-scale rule: a channel no sample uses gets a finite λ.
_CHANNEL_FLOOR = 1e-6


def layer_index(prefix: str, order: int) -> int:
    """The layer a key prefix names (the number after `layers.`), else `order`."""
    match = _LAYER_INDEX.search(prefix + ".")
    return int(match.group(1)) if match else order


def entries_by_layer(state: Mapping, name: str) -> dict[int, object]:
    """Entries `<prefix>.<name>` of a state dict by layer (prefixes without `layers.N` by their order)."""
    prefixes = sorted({key[: -len(name) - 1] for key in state if key.endswith("." + name)})
    return {layer_index(prefix, order): state[f"{prefix}.{name}"] for order, prefix in enumerate(prefixes)}


def layer_calibration(state: Mapping | None, layer_idx: int) -> dict | None:
    """Layer `layer_idx`'s entries of a calibration state dict, renamed `layers.0.*`: the state
    dict of that one layer. None if it has none."""
    if not state:
        return None
    found = {}
    for name in ENTRY_BUFFERS:
        entries = entries_by_layer(state, name)
        if layer_idx in entries:
            found[f"layers.0.{name}"] = entries[layer_idx]
    return found or None


def calibrate_layer(layer: FP4KVPoolLayer, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None) -> None:
    """Calibrate a layer cache from sample K/V [..., H, D] and, when it scales K channels, the
    queries q [..., Hq, D] that met them (e.g. a pass over text), in place: K's per-head,
    per-channel mean μ when it smooths K; the channel scales λ = sqrt(max|k - μ| / max|q|) per
    KV head and channel (maxima over the tokens, q's over the head's group of query heads; both
    floored at 1e-6); then each global scale its formats have: amax of what is quantized (after
    smoothing, scaling and rotation) over the format's `calibration_amax` (NVFP4 448 * 6, FP8 keys
    448), so the largest value lands at the top of the format's range.

    The λ rule is SmoothAttention's balance at exponent 1/2 with the queries in it: a channel's
    rounding error reaches the scores times |q|, so channels that queries weigh little take the
    coarser rounding. It beat the exponent rule without queries (λ = max|k - μ|^0.3) in the window
    protocol's KL on both SmolLM2 and Gemma 3 (docs/accuracy.md). Runs on the device, no host
    sync. The samples are checked before anything is set."""
    layer.check_tokens(k, v)
    for x, name in ((k, "k"), (v, "v")):
        if x.shape[:-2].numel() == 0:  # a mean and an amax need a sample
            raise ValueError(f"{name} holds no tokens to calibrate on; got shape {tuple(x.shape)}")
    scales_k = layer.k_channel_scale is not None
    q_amax = query_amax(q, k.shape[-2], k.shape[-1], k.device) if scales_k or q is not None else None
    if layer.k_mean is not None:
        layer.k_mean.copy_(k.detach().float().reshape(-1, *layer.k_mean.shape).mean(0))
    if scales_k:
        k_amax = (k.detach().float() - layer.k_mean).reshape(-1, *layer.k_mean.shape).abs().amax(0)
        layer.k_channel_scale.copy_((k_amax.clamp(min=_CHANNEL_FLOOR) / q_amax.clamp(min=_CHANNEL_FLOOR)).sqrt())
    if layer.transformed:
        k, v = layer.encode_k(k.detach()), layer.encode_v(v.detach())
    kv_recipe = ops.get_kv_recipe(layer.recipe)
    tiny = torch.finfo(torch.float32).tiny
    for target, x, fmt in ((layer.k_global_scale, k, kv_recipe.k), (layer.v_global_scale, v, kv_recipe.v)):
        if target is not None:
            target.copy_((x.detach().abs().amax().float() / fmt.calibration_amax).clamp(min=tiny).reshape(1))


def query_amax(q, heads: int, head_dim: int, device) -> torch.Tensor:
    """max |q| [heads, head_dim] over the tokens of q [..., Hq, D] and each KV head's group of
    Hq / heads query heads, float32; q is checked first (a ValueError or TypeError names it)."""
    if q is None:
        raise ValueError("q: a cache that scales K channels calibrates on the queries too; got None")
    if not isinstance(q, torch.Tensor) or not q.is_floating_point():
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype if isinstance(q, torch.Tensor) else type(q)}")
    if q.dim() < 2 or q.shape[-1] != head_dim or q.shape[-2] % heads or q.shape[:-2].numel() == 0:
        raise ValueError(f"q must be [..., Hq, {head_dim}] with Hq a multiple of the {heads} KV heads and at least "
                         f"one token; got shape {tuple(q.shape)}")
    if q.device != torch.device(device):
        raise ValueError(f"q is on {q.device}, the keys on {device}")
    return q.detach().float().abs().reshape(-1, heads, q.shape[-2] // heads, head_dim).amax((0, 2))


def calibration_state_dict(layers: Sequence[FP4KVPoolLayer]) -> dict[str, torch.Tensor]:
    """What the layers' calibration holds, keyed `layers.{i}.<entry>` (copies)."""
    state = {}
    for i, layer in enumerate(layers):
        for name, buffer in ENTRY_BUFFERS.items():
            tensor = getattr(layer, buffer)
            if tensor is not None:
                state[f"layers.{i}.{name}"] = tensor.detach().clone()
    return state


def calibration_updates(layers: Sequence[FP4KVPoolLayer], state: Mapping) -> dict[tuple[int, str], torch.Tensor]:
    """What loading `state` writes, by (layer, buffer), each value checked: the entries whose buffer
    the layers keep (K means when smoothing, K channel scales when scaling, each global scale the
    formats have); others are ignored."""
    updates = {}
    for name, buffer in ENTRY_BUFFERS.items():
        if getattr(layers[0], buffer) is None:
            continue
        found = entries_by_layer(state, name)
        check_layers(found, len(layers))
        for i, value in found.items():
            if name == "k_mean":
                updates[i, buffer] = k_mean_value(layers[i], value, f"layer {i}'s k_mean")
            elif name == "k_channel_scale":
                updates[i, buffer] = k_channel_scale_value(layers[i], value, f"layer {i}'s k_channel_scale")
            else:
                updates[i, buffer] = global_scale_value(value, f"layer {i}'s {name}")
    return updates


def write_updates(layers: Sequence[FP4KVPoolLayer], updates: Mapping[tuple[int, str], torch.Tensor]) -> int:
    """Write checked updates in place (tensors stay where CUDA graphs captured them); returns how
    many layers were set."""
    for (i, buffer), value in updates.items():
        getattr(layers[i], buffer).copy_(value)
    return len({i for i, _ in updates})


def load_calibration(layers: Sequence[FP4KVPoolLayer], state: Mapping) -> int:
    """Load a calibration state dict into layer caches (layer i from `layers.{i}.*`); every entry
    is checked before any is written. Returns how many layers were set."""
    return write_updates(layers, calibration_updates(layers, state))


def check_layers(found: Mapping[int, object], layer_num: int) -> None:
    for layer_id in found:
        if not 0 <= layer_id < layer_num:
            raise ValueError(f"scales found for layer {layer_id}, but the cache has {layer_num} layers")


def float32(value, name: str) -> torch.Tensor:
    """A number, nested list or tensor as a float32 tensor; anything else is a TypeError naming it."""
    try:
        return torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}") from error


def global_scale_value(value, name: str) -> torch.Tensor:
    """A global scale (a number or a one-element tensor) as float32 [1], checked before it is written."""
    scale = float32(value, name)
    if scale.numel() != 1:
        raise ValueError(f"{name} must have one element; got shape {tuple(scale.shape)}")
    return scale.reshape(1)


def k_mean_value(layer: FP4KVPoolLayer, k_mean, name: str = "k_mean") -> torch.Tensor:
    """k_mean as a float32 tensor of the layer's K mean shape [H, D], checked before it is written."""
    if layer.k_mean is None:
        raise ValueError(f"{name}: the cache was created without smooth_k=True: it keeps no K mean")
    value = float32(k_mean, name)
    if value.shape != layer.k_mean.shape:
        raise ValueError(f"{name} must have shape {tuple(layer.k_mean.shape)} ([H, D]); got {tuple(value.shape)}")
    return value


def k_channel_scale_value(layer: FP4KVPoolLayer, k_channel_scale, name: str = "k_channel_scale") -> torch.Tensor:
    """K channel scales as a float32 tensor of the layer's shape [H, D], each finite and > 0 (they
    divide K), checked before it is written."""
    if layer.k_channel_scale is None:
        raise ValueError(f"{name}: the cache was created without channel_scale_k=True: it keeps no K channel scales")
    value = float32(k_channel_scale, name)
    if value.shape != layer.k_channel_scale.shape:
        raise ValueError(f"{name} must have shape {tuple(layer.k_channel_scale.shape)} ([H, D]); "
                         f"got {tuple(value.shape)}")
    if not bool((torch.isfinite(value) & (value > 0)).all()):
        raise ValueError(f"{name} must be finite and > 0 everywhere (it divides K); got min {value.min().item()}, "
                         f"max {value.max().item()}")
    return value
