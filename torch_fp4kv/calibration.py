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
    """Entries `<prefix>.<name>` of a state dict by layer (prefixes without `layers.N` by their
    order); two entries for one layer (a vision tower's beside the decoder's, say) are a ValueError."""
    prefixes = sorted({key[: -len(name) - 1] for key in state if key.endswith("." + name)})
    found, keys = {}, {}
    for order, prefix in enumerate(prefixes):
        layer = layer_index(prefix, order)
        if layer in found:
            raise ValueError(f"the state dict has two {name} entries for layer {layer}: {keys[layer]} and {prefix}.{name}")
        found[layer], keys[layer] = state[f"{prefix}.{name}"], f"{prefix}.{name}"
    return found


def entries_for_layers(state: Mapping, name: str, layer_ids: Sequence[int]) -> dict[int, object]:
    """entries_by_layer for a cache whose layers are `layer_ids`: none, or one for each of them and
    no other (a calibration that covers some layers would leave the rest at their defaults)."""
    found = entries_by_layer(state, name)
    extra = sorted(set(found) - set(layer_ids))
    if extra:
        raise ValueError(f"{name} found for layer {extra[0]}, but the cache's layers are {_span(layer_ids)}")
    missing = sorted(set(layer_ids) - set(found))
    if found and missing:
        raise ValueError(f"{name} found for layers {_span(sorted(found))} but not for layer {missing[0]}: "
                         "each layer needs its own")
    return found


def _span(layer_ids: Sequence[int]) -> str:
    ids = list(layer_ids)
    return f"{ids[0]}..{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2 else str(ids)


def layer_entries(state: Mapping | None, layer_idx: int) -> dict:
    """Layer `layer_idx`'s entries of a calibration state dict, keyed `layers.{layer_idx}.<entry>`."""
    found = {}
    for name in ENTRY_BUFFERS:
        entries = entries_by_layer(state or {}, name)
        if layer_idx in entries:
            found[f"layers.{layer_idx}.{name}"] = entries[layer_idx]
    return found


def layer_calibration(state: Mapping | None, layer_idx: int) -> dict | None:
    """Layer `layer_idx`'s entries of a calibration state dict, renamed `layers.0.*`: the state
    dict of that one layer. None if it has none."""
    found = {f"layers.0.{key.rsplit('.', 1)[1]}": value for key, value in layer_entries(state, layer_idx).items()}
    return found or None


def check_calibration(state: Mapping, layer_num: int, kept: Sequence[str]) -> None:
    """Check a calibration state dict for a cache of `layer_num` layers that keeps the entries
    `kept` (names of ENTRY_BUFFERS) before any layer exists: each kept entry for every layer or
    none, global scales finite and > 0, K means finite and K channel scales finite and > 0 (their
    shapes are checked when a layer loads them). Errors name the layer."""
    for name in kept:
        for i, value in entries_for_layers(state, name, range(layer_num)).items():
            label = f"layer {i}'s {name}"
            if name in ("k_scale", "v_scale"):
                global_scale_value(value, label)
                continue
            checked_values(float32(value, label), label, positive=name == "k_channel_scale")


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
    sync. The samples are checked before anything is set; rows holding a NaN or an infinity are
    left out (finite_rows), and what no kept row reaches stays as it was."""
    layer.check_tokens(k, v)
    for x, name in ((k, "k"), (v, "v")):
        if x.shape[:-2].numel() == 0:  # a mean and an amax need a sample
            raise ValueError(f"{name} holds no tokens to calibrate on; got shape {tuple(x.shape)}")
    scales_k = layer.k_channel_scale is not None
    q_amax = query_amax(q, k.shape[-2], k.shape[-1], k.device) if scales_k or q is not None else None
    k, k_rows = finite_rows(k)
    v, v_rows = finite_rows(v)
    k_count = k_rows.sum(0)  # [H, 1]: a head no kept row reaches keeps its mean and channel scales
    if layer.k_mean is not None:
        layer.k_mean.copy_(torch.where(k_count > 0, k.sum(0) / k_count.clamp(min=1), layer.k_mean))
    if scales_k:
        k_amax = torch.where(k_rows, (k - layer.k_mean).abs(), 0.0).amax(0)
        scale = (k_amax.clamp(min=_CHANNEL_FLOOR) / q_amax.clamp(min=_CHANNEL_FLOOR)).sqrt()
        layer.k_channel_scale.copy_(torch.where(k_count > 0, scale, layer.k_channel_scale))
    if layer.transformed:
        k, v = layer.encode_k(k), layer.encode_v(v)
    kv_recipe = ops.get_kv_recipe(layer.recipe)
    for target, x, rows, fmt in ((layer.k_global_scale, k, k_rows, kv_recipe.k),
                                 (layer.v_global_scale, v, v_rows, kv_recipe.v)):
        if target is not None:
            set_global_scale(target, x, rows, fmt)


def finite_rows(x: torch.Tensor, token_dims: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples x [..., *token] (a token's last `token_dims` dimensions: [H, D], or [R] for a latent)
    as float32 [N, *token] with every row (last dimension) that holds a NaN or an infinity zeroed,
    and which rows are kept ([N, ..., 1]). Such a row (an overflowed activation) is left out of
    every statistic: a scale must stay finite, and checking for it would sync the host."""
    x = x.detach().float().reshape(-1, *x.shape[x.dim() - token_dims:])
    rows = torch.isfinite(x).all(-1, keepdim=True)
    return torch.where(rows, x, 0.0), rows


def set_global_scale(target: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, fmt) -> None:
    """target [1] <- the global scale that puts the amax of x's kept rows (finite_rows) at the top of
    fmt's range (calibration_amax), at least the smallest normal float32 (an all-zero sample gives a
    usable scale); unchanged when no row is kept."""
    amax = torch.where(rows, x.abs(), 0.0).amax()
    scale = (amax / fmt.calibration_amax).clamp(min=torch.finfo(torch.float32).tiny).reshape(1)
    target.copy_(torch.where(rows.any(), scale, target))


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
    q, rows = finite_rows(q)
    return torch.where(rows, q.abs(), 0.0).reshape(-1, heads, q.shape[-2] // heads, head_dim).amax((0, 2))


def calibration_state_dict(layers: Sequence[FP4KVPoolLayer]) -> dict[str, torch.Tensor]:
    """What the layers' calibration holds, keyed `layers.{i}.<entry>` (copies)."""
    state = {}
    for i, layer in enumerate(layers):
        for name, buffer in ENTRY_BUFFERS.items():
            tensor = getattr(layer, buffer)
            if tensor is not None:
                state[f"layers.{i}.{name}"] = tensor.detach().clone()
    return state


def calibration_updates(layers: Sequence[FP4KVPoolLayer], state: Mapping,
                        layer_ids: Sequence[int] | None = None) -> dict[tuple[int, str], torch.Tensor]:
    """What loading `state` writes, by (position in `layers`, buffer), each value checked: the
    entries whose buffer the layers keep (K means when smoothing, K channel scales when scaling,
    each global scale the formats have), for all of the layers or none; others are ignored.
    `layer_ids`: the layer number each of `layers` has in the state dict's keys (0, 1, ... by default)."""
    layer_ids = list(range(len(layers))) if layer_ids is None else list(layer_ids)
    position = {layer_id: p for p, layer_id in enumerate(layer_ids)}
    updates = {}
    for name, buffer in ENTRY_BUFFERS.items():
        if getattr(layers[0], buffer) is None:
            continue
        for i, value in entries_for_layers(state, name, layer_ids).items():
            layer, label = layers[position[i]], f"layer {i}'s {name}"
            if name == "k_mean":
                value = k_mean_value(layer, value, label)
            elif name == "k_channel_scale":
                value = k_channel_scale_value(layer, value, label)
            else:
                value = global_scale_value(value, label)
            updates[position[i], buffer] = value
    return updates


def write_updates(layers: Sequence[FP4KVPoolLayer], updates: Mapping[tuple[int, str], torch.Tensor]) -> int:
    """Write checked updates in place (tensors stay where CUDA graphs captured them); returns how
    many layers were set."""
    for (i, buffer), value in updates.items():
        getattr(layers[i], buffer).copy_(value)
    return len({i for i, _ in updates})


def load_calibration(layers: Sequence[FP4KVPoolLayer], state: Mapping, layer_ids: Sequence[int] | None = None) -> int:
    """Load a calibration state dict into layer caches (layer i from `layers.{i}.*`, i from
    `layer_ids` as calibration_updates takes it); every entry is checked before any is written.
    Returns how many layers were set."""
    return write_updates(layers, calibration_updates(layers, state, layer_ids))


def float32(value, name: str) -> torch.Tensor:
    """A number, nested list or tensor as a float32 tensor; anything else is a TypeError naming it."""
    try:
        return torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}") from error


def global_scale_value(value, name: str) -> torch.Tensor:
    """A global scale (a number or a one-element tensor) as float32 [1], finite and > 0 (it
    multiplies every dequantized value, and calibration never gives another), checked before it is
    written."""
    scale = float32(value, name)
    if scale.numel() != 1:
        raise ValueError(f"{name} must have one element; got shape {tuple(scale.shape)}")
    if not (torch.isfinite(scale).all() and scale.item() > 0):
        raise ValueError(f"{name} is {scale.item()}: a global scale must be finite and > 0")
    return scale.reshape(1)


def k_mean_value(layer: FP4KVPoolLayer, k_mean, name: str = "k_mean") -> torch.Tensor:
    """k_mean as a float32 tensor of the layer's K mean shape [H, D], checked before it is written."""
    if layer.k_mean is None:
        raise ValueError(f"{name}: the cache was created without smooth_k=True: it keeps no K mean")
    value = float32(k_mean, name)
    if value.shape != layer.k_mean.shape:
        raise ValueError(f"{name} must have shape {tuple(layer.k_mean.shape)} ([H, D]); got {tuple(value.shape)}")
    return checked_values(value, name)


def k_channel_scale_value(layer: FP4KVPoolLayer, k_channel_scale, name: str = "k_channel_scale") -> torch.Tensor:
    """K channel scales as a float32 tensor of the layer's shape [H, D], each finite and > 0 (they
    divide K), checked before it is written."""
    if layer.k_channel_scale is None:
        raise ValueError(f"{name}: the cache was created without channel_scale_k=True: it keeps no K channel scales")
    value = float32(k_channel_scale, name)
    if value.shape != layer.k_channel_scale.shape:
        raise ValueError(f"{name} must have shape {tuple(layer.k_channel_scale.shape)} ([H, D]); "
                         f"got {tuple(value.shape)}")
    return checked_values(value, name, positive=True)  # they divide K


def checked_values(value: torch.Tensor, name: str, positive: bool = False) -> torch.Tensor:
    """value, each element finite (and > 0 where `positive`), else a ValueError naming it: a NaN or
    inf calibration entry would reach every stored key."""
    ok = torch.isfinite(value) & (value > 0) if positive else torch.isfinite(value)
    if not bool(ok.all()):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''} everywhere; got min "
                         f"{value.min().item()}, max {value.max().item()}")
    return value
