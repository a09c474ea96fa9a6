"""Quantization strategies for an FP4 KV cache, shaped like SGLang's `FP4KVCacheQuantMethod`.

An engine's KV pool asks a method for its buffers, then calls it to store new tokens and to read
earlier ones back. Each method is one row of the format table (`torch_fp4kv.ops.FORMATS`) plus
what is particular to it (NVFP4's per-layer global scales and FP8 prefill workspace).
"""

from __future__ import annotations

import abc
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from .layer_cache import FP4KVLayerCache, hadamard
from .ops import K_FP8_SUFFIX, FP4Format, FP4KVCacheRecipe, KVRecipe, get_format, get_kv_recipe


class AttentionRead(enum.Enum):
    """How an attention kernel reads a cache: the engine allocates a workspace only for DEQUANTIZED."""

    NATIVE_FP4 = "native_fp4"  # fp4kv.decode_attention / extend_attention read the packed cache itself
    DEQUANTIZED = "dequantized"  # dequantize_prev_kv into a workspace, then a BF16/FP8 kernel


@dataclass
class FP4KVBuffers:
    """Everything one KV pool allocates. Lists are indexed by layer."""

    k_data: list[torch.Tensor]  # uint8 [size, H, D/2] (k_fp8: K [size, H, D])
    v_data: list[torch.Tensor]
    k_scales: list[torch.Tensor]  # uint8 [size, H, D/block] (k_fp8: K [size, H, 0])
    v_scales: list[torch.Tensor]
    store_dtype: torch.dtype
    # float32 [1] per layer, updated in place (CUDA graphs keep their addresses); None if unused.
    k_global_scales: list[torch.Tensor] | None = None
    v_global_scales: list[torch.Tensor] | None = None
    # One layer's K and V dequantized for prefill kernels ([size, H, D]); None if unused.
    dequant_workspace: tuple[torch.Tensor, torch.Tensor] | None = None
    # float32 [D, D] normalized Hadamard shared by every layer (rotate=True); None if unused.
    rotation: torch.Tensor | None = None
    # float32 [H, D] per layer, K's calibrated channel means (smooth_k=True); None if unused.
    k_means: list[torch.Tensor] | None = None


class FP4KVCacheQuantMethod(abc.ABC):
    """One way of keeping a KV cache in FP4. Create buffers first; the method keeps them."""

    def __init__(self) -> None:
        self.buffers: FP4KVBuffers | None = None

    @abc.abstractmethod
    def create_buffers(self, size: int, head_num: int, head_dim: int, layer_num: int, device) -> FP4KVBuffers:
        """Allocate the cache for `size` token slots of `layer_num` layers."""

    @abc.abstractmethod
    def quantize_and_store(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize k, v [T, H, D] into layer `layer_id` at slots `loc` [T]."""

    @abc.abstractmethod
    def dequantize_prev_kv(self, layer_id: int, loc: torch.Tensor, dtype: torch.dtype | None = None):
        """Read slots `loc` of layer `layer_id` back as (k, v) [T, H, D] for a prefill kernel."""

    @abc.abstractmethod
    def compute_cell_size(self, head_num: int, head_dim: int, layer_num: int) -> int:
        """Exact bytes per token slot of the buffers `create_buffers` allocates."""

    def needs_dequant_workspace(self) -> bool:
        return False

    def needs_global_scale(self) -> bool:
        return False

    def attention_read(self, phase: str) -> AttentionRead:
        """How attention reads this cache in `phase`: "prefill", "decode", or "extend" (new tokens
        over a cached prefix: chunked prefill, prefix-cache hits, speculative verification)."""
        if phase not in ("prefill", "decode", "extend"):
            raise ValueError(f"phase must be 'prefill', 'decode' or 'extend', got {phase!r}")
        return AttentionRead.DEQUANTIZED

    def load_scales_from_model(self, source) -> int:
        """Load per-layer scales from a model or state dict; returns how many layers were set."""
        return 0


class TableFP4KVMethod(FP4KVCacheQuantMethod):
    """A method driven entirely by one row of the format table; subclasses name the recipe."""

    recipe: ClassVar[FP4KVCacheRecipe]
    # Dtype `dequantize_prev_kv` returns by default; a workspace is allocated when it is FP8.
    prev_kv_dtype: ClassVar[torch.dtype] = torch.bfloat16

    def __init__(self, rotate: bool = False, smooth_k: bool = False, k_fp8: bool = False) -> None:
        """rotate: store each head's K and V rotated by a normalized Hadamard matrix (head_dim a
        power of two). smooth_k: subtract a per-layer, per-head, per-channel K mean before storing
        (zeros until `calibrate` or `load_scales_from_model` sets it). Both run in PyTorch around
        the ops (FP4KVLayerCache), on every backend. k_fp8: keep K in FP8 E4M3 under a per-layer
        global scale (the ops' "<recipe>+k8"; V stays in the recipe): keys are the half whose
        rounding costs small models the most accuracy."""
        super().__init__()
        for name, value in (("rotate", rotate), ("smooth_k", smooth_k), ("k_fp8", k_fp8)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        self.rotate, self.smooth_k, self.k_fp8 = rotate, smooth_k, k_fp8

    @property
    def fmt(self) -> FP4Format:
        """The recipe's FP4 format (V's, and K's unless k_fp8)."""
        return get_format(self.recipe)

    @property
    def kv_recipe(self) -> KVRecipe:
        """K's and V's formats, named as the ops take them ("nvfp4" or "nvfp4+k8")."""
        return get_kv_recipe(self.fmt.name + (K_FP8_SUFFIX if self.k_fp8 else ""))

    def needs_global_scale(self) -> bool:
        return self.kv_recipe.k.has_global_scale or self.kv_recipe.v.has_global_scale

    def needs_dequant_workspace(self) -> bool:
        return self.prev_kv_dtype == torch.float8_e4m3fn

    def attention_read(self, phase: str) -> AttentionRead:
        """Decode and extend read FP4 directly (fp4kv.decode_attention, fp4kv.extend_attention);
        prefill reads a dequantized copy."""
        read = super().attention_read(phase)
        return AttentionRead.NATIVE_FP4 if phase in ("decode", "extend") else read

    def decode_attention(self, layer_id: int, q, block_table, seq_lens, page_size: int,
                         sm_scale: float | None = None, out=None, lse=None):
        """Decode attention of q [B, Hq, D] over layer `layer_id`'s paged FP4 cache, read directly;
        `lse` [B, Hq] float32 receives its log-sum-exp (FP4KVLayerCache.decode)."""
        return self.layer(layer_id).decode(q, block_table, seq_lens, page_size, sm_scale, out, lse)

    def extend_attention(self, layer_id: int, q, cu_seqlens_q, block_table, seq_lens, page_size: int,
                         sm_scale: float | None = None, out=None):
        """Attention of new tokens q [T, Hq, D] (rows cu_seqlens_q[b]:cu_seqlens_q[b + 1], their K/V
        stored already) over layer `layer_id`'s paged FP4 cache, causal, read directly."""
        return self.layer(layer_id).extend(q, cu_seqlens_q, block_table, seq_lens, page_size, sm_scale, out)

    def compute_cell_size(self, head_num: int, head_dim: int, layer_num: int) -> int:
        cell = layer_num * self.kv_recipe.bytes_per_token(head_num, head_dim)
        if self.needs_dequant_workspace():
            cell += 2 * head_num * head_dim * self.prev_kv_dtype.itemsize  # shared by all layers
        return cell

    def create_buffers(self, size: int, head_num: int, head_dim: int, layer_num: int, device) -> FP4KVBuffers:
        fmt, kv = self.fmt, self.kv_recipe
        if head_dim < 1 or head_dim % fmt.block_size:
            raise ValueError(f"head_dim must be a positive multiple of {fmt.block_size} (the {fmt.name} block size); "
                             f"got {head_dim}")
        for name, value in (("size", size), ("head_num", head_num), ("layer_num", layer_num)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

        def per_layer(last_dim: int) -> list[torch.Tensor]:
            return [torch.zeros(size, head_num, last_dim, dtype=torch.uint8, device=device) for _ in range(layer_num)]

        def scalars() -> list[torch.Tensor]:
            return [torch.ones(1, dtype=torch.float32, device=device) for _ in range(layer_num)]

        if self.rotate and head_dim & (head_dim - 1):
            raise ValueError(f"head_dim must be a power of two with rotate=True; got {head_dim}")
        workspace = None
        if self.needs_dequant_workspace():
            workspace = tuple(torch.zeros(size, head_num, head_dim, dtype=self.prev_kv_dtype, device=device) for _ in "kv")
        b = self.buffers = FP4KVBuffers(
            k_data=per_layer(kv.k.data_width(head_dim)),
            v_data=per_layer(kv.v.data_width(head_dim)),
            k_scales=per_layer(kv.k.scales_width(head_dim)),
            v_scales=per_layer(kv.v.scales_width(head_dim)),
            store_dtype=torch.uint8,
            k_global_scales=scalars() if kv.k.has_global_scale else None,
            v_global_scales=scalars() if kv.v.has_global_scale else None,
            dequant_workspace=workspace,
            rotation=hadamard(head_dim, device=device) if self.rotate else None,
            k_means=[torch.zeros(head_num, head_dim, device=device) for _ in range(layer_num)] if self.smooth_k else None,
        )
        k_g, v_g = b.k_global_scales or [None] * layer_num, b.v_global_scales or [None] * layer_num
        means = b.k_means or [None] * layer_num
        self._layers = [FP4KVLayerCache(kv.name, b.k_data[i], b.v_data[i], b.k_scales[i], b.v_scales[i], k_g[i], v_g[i],
                                        b.rotation, means[i])
                        for i in range(layer_num)]
        return b

    def _buffers(self) -> FP4KVBuffers:
        if self.buffers is None:
            raise RuntimeError(f"{type(self).__name__}: call create_buffers() first")
        return self.buffers

    def layer(self, layer_id: int) -> FP4KVLayerCache:
        """Layer `layer_id`'s cache as a module over the method's own buffers (no copies)."""
        self._buffers()
        if not 0 <= layer_id < len(self._layers):  # no negative indexing: -1 is an engine's bug, not "the last"
            raise IndexError(f"layer_id {layer_id} is out of range for {len(self._layers)} layers")
        return self._layers[layer_id]

    def global_scales(self, layer_id: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The layer's (K, V) global scales: the tensors its stores and reads use, which the scale
        setters write in place (taken from the layer module, so they follow it if it moves)."""
        layer = self.layer(layer_id)
        return layer.k_global_scale, layer.v_global_scale

    def quantize_and_store(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.layer(layer_id).store(loc, k, v)

    def calibrate(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Calibrate a layer from sample K/V [..., H, D] (e.g. a pass over text), in place: K's
        per-head, per-channel mean when smoothing, then each global scale the formats have, amax
        of what is quantized (after smoothing and rotation) over the format's `calibration_amax`
        (NVFP4 448 * 6, FP8 keys 448), so the largest value lands at the top of the format's range.
        Runs on the device, no host sync. The samples are checked before anything is set."""
        layer = self.layer(layer_id)
        layer.check_tokens(k, v)
        for x, name in ((k, "k"), (v, "v")):
            if x.shape[:-2].numel() == 0:  # a mean and an amax need a sample
                raise ValueError(f"{name} holds no tokens to calibrate on; got shape {tuple(x.shape)}")
        if self.smooth_k:
            layer.k_mean.copy_(k.detach().float().reshape(-1, *layer.k_mean.shape).mean(0))
        if layer.transformed:
            k, v = layer.encode_k(k.detach()), layer.encode_v(v.detach())
        tiny = torch.finfo(torch.float32).tiny
        for target, x, fmt in zip(self.global_scales(layer_id), (k, v), (self.kv_recipe.k, self.kv_recipe.v)):
            if target is not None:
                target.copy_((x.detach().abs().amax().float() / fmt.calibration_amax).clamp(min=tiny).reshape(1))

    def set_k_mean(self, layer_id: int, k_mean) -> None:
        """Write a layer's K mean [H, D] in place (needs smooth_k=True)."""
        value = self._k_mean_value(layer_id, k_mean)
        self.layer(layer_id).k_mean.copy_(value)

    def _k_mean_value(self, layer_id: int, k_mean) -> torch.Tensor:
        """k_mean as a float32 tensor of the layer's K mean shape [H, D], checked before it is written."""
        mean = self.layer(layer_id).k_mean
        if mean is None:
            raise ValueError(f"{type(self).__name__} was created without smooth_k=True: it keeps no K mean")
        k_mean = _float32(k_mean, "k_mean")
        if k_mean.shape != mean.shape:
            raise ValueError(f"k_mean must have shape {tuple(mean.shape)} ([H, D]); got {tuple(k_mean.shape)}")
        return k_mean

    def calibration_state_dict(self) -> dict[str, torch.Tensor]:
        """What `calibrate` set, keyed `layers.{i}.k_mean` / `layers.{i}.k_scale` / `layers.{i}.v_scale`
        (ModelOpt's scale names): `torch.save` it, and give it to `load_scales_from_model` later."""
        state = {}
        for i in range(len(self._buffers().k_data)):
            layer = self.layer(i)
            for key, tensor in (("k_scale", layer.k_global_scale), ("v_scale", layer.v_global_scale),
                                ("k_mean", layer.k_mean)):
                if tensor is not None:
                    state[f"layers.{i}.{key}"] = tensor.detach().clone()
        return state

    def load_scales_from_model(self, source) -> int:
        """Load per-layer calibration from a state dict (ModelOpt-style keys such as
        `model.layers.3.self_attn.k_mean`; the layer is the number after `layers.`): `k_mean`
        entries [H, D] when smoothing, and `k_scale` entries where K alone has a global scale (FP8
        keys beside blockfp4/mxfp4). NVFP4 reads `k_scale`/`v_scale` as its two global scales, from
        a model's attention modules too. Every entry is checked before any is written, so a bad one
        changes nothing. Returns how many layers were set."""
        updates = self._scale_updates(source)
        for (layer_id, buffer), value in updates.items():
            getattr(self.layer(layer_id), buffer).copy_(value)
        return len({layer_id for layer_id, _ in updates})

    def _scale_updates(self, source) -> dict[tuple[int, str], torch.Tensor]:
        """What load_scales_from_model writes, by (layer, layer-cache buffer), each value checked."""
        if not isinstance(source, Mapping):
            return {}
        updates = {}
        if self.smooth_k:
            means = _per_layer(source, "k_mean")
            self._check_layers(means)
            updates.update({(i, "k_mean"): self._k_mean_value(i, mean) for i, mean in means.items()})
        if self.kv_recipe.k.has_global_scale and not self.kv_recipe.v.has_global_scale:
            k_scales = _per_layer(source, "k_scale")
            self._check_layers(k_scales)
            updates.update({(i, "k_global_scale"): _global_scale_value(scale, f"layer {i}'s k_scale")
                            for i, scale in k_scales.items()})
        return updates

    def _check_layers(self, found: Mapping[int, object]) -> None:
        layer_num = len(self._buffers().k_data)
        for layer_id in found:
            if not 0 <= layer_id < layer_num:
                raise ValueError(f"scales found for layer {layer_id}, but the cache has {layer_num} layers")

    def dequantize_prev_kv(self, layer_id: int, loc: torch.Tensor, dtype: torch.dtype | None = None):
        """(k, v) [T, H, D] of slots `loc`. In the method's FP8 workspace when it has one and
        `dtype` is left at the default; otherwise freshly allocated in `dtype`."""
        dtype = dtype or self.prev_kv_dtype
        k, v = self.layer(layer_id).read(loc, dtype)
        b = self._buffers()
        if b.dequant_workspace is None or dtype != self.prev_kv_dtype:
            return k, v
        k_ws, v_ws = b.dequant_workspace
        if loc.shape[0] > k_ws.shape[0]:
            raise ValueError(f"loc has {loc.shape[0]} slots but the dequant workspace holds {k_ws.shape[0]}")
        k_ws[: loc.shape[0]].copy_(k)
        v_ws[: loc.shape[0]].copy_(v)
        return k_ws[: loc.shape[0]], v_ws[: loc.shape[0]]


class NVFP4KVMethod(TableFP4KVMethod):
    """NVFP4: E4M3 block scales plus per-layer FP32 global scales for K and V (default 1.0).

    Prefill reads earlier tokens through an FP8 E4M3 workspace (the input of FP8 prefill kernels).
    """

    recipe = FP4KVCacheRecipe.NVFP4
    prev_kv_dtype = torch.float8_e4m3fn

    def set_global_scales(self, layer_id: int, k_scale, v_scale) -> None:
        """Write a layer's global scales in place (tensors stay where CUDA graphs captured them);
        both are checked before either is written."""
        values = _global_scale_value(k_scale, "k_scale"), _global_scale_value(v_scale, "v_scale")
        for target, value in zip(self.global_scales(layer_id), values):
            target.copy_(value)

    def _scale_updates(self, source) -> dict[tuple[int, str], torch.Tensor]:
        """`k_scale`/`v_scale` as each layer's global scales, from an `nn.Module` (attention
        modules holding both attributes, in module order) or a state dict, besides the entries
        every table method reads."""
        pairs = _scales_from_module(source) if isinstance(source, nn.Module) else _scales_from_state_dict(source)
        self._check_layers(pairs)
        updates = super()._scale_updates(source)
        for layer_id, (k_scale, v_scale) in pairs.items():
            updates[layer_id, "k_global_scale"] = _global_scale_value(k_scale, f"layer {layer_id}'s k_scale")
            updates[layer_id, "v_global_scale"] = _global_scale_value(v_scale, f"layer {layer_id}'s v_scale")
        return updates


def _float32(value, name: str) -> torch.Tensor:
    """A number, nested list or tensor as a float32 tensor; anything else is a TypeError naming it."""
    try:
        return torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}") from error


def _global_scale_value(value, name: str) -> torch.Tensor:
    """A global scale (a number or a one-element tensor) as float32 [1], checked before it is written."""
    scale = _float32(value, name)
    if scale.numel() != 1:
        raise ValueError(f"{name} must have one element; got shape {tuple(scale.shape)}")
    return scale.reshape(1)


def _scales_from_module(model: nn.Module) -> dict[int, tuple]:
    holders = [m for m in model.modules() if hasattr(m, "k_scale") and hasattr(m, "v_scale")]
    return {i: (m.k_scale, m.v_scale) for i, m in enumerate(holders)}


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _scales_from_state_dict(state: Mapping) -> dict[int, tuple]:
    if not isinstance(state, Mapping):
        raise TypeError(f"source must be an nn.Module or a state dict, got {type(state).__name__}")
    found: dict[int, dict[str, object]] = {}
    prefixes = sorted({key[: -len(".k_scale")] for key in state if key.endswith(".k_scale")})
    for order, prefix in enumerate(prefixes):
        if f"{prefix}.v_scale" not in state:
            raise ValueError(f"state dict has {prefix}.k_scale but no {prefix}.v_scale")
        match = _LAYER_INDEX.search(prefix + ".")
        layer_id = int(match.group(1)) if match else order
        found[layer_id] = {"k": state[f"{prefix}.k_scale"], "v": state[f"{prefix}.v_scale"]}
    return {layer: (s["k"], s["v"]) for layer, s in found.items()}


def _per_layer(state: Mapping, name: str) -> dict[int, object]:
    """Entries `<prefix>.<name>` of a state dict by layer (the number after `layers.`)."""
    prefixes = sorted({key[: -len(name) - 1] for key in state if key.endswith("." + name)})
    found = {}
    for order, prefix in enumerate(prefixes):
        match = _LAYER_INDEX.search(prefix + ".")
        found[int(match.group(1)) if match else order] = state[f"{prefix}.{name}"]
    return found


class BlockFP4KVMethod(TableFP4KVMethod):
    """Block-16 FP4 with power-of-two (E8M0) scales and no global scale: SGLang's FP4MXBlock16."""

    recipe = FP4KVCacheRecipe.BLOCKFP4


class MXFP4KVMethod(TableFP4KVMethod):
    """OCP MX v1.0 MXFP4: block-32 FP4 with E8M0 scales."""

    recipe = FP4KVCacheRecipe.MXFP4


FP4_KV_CACHE_QUANT_REGISTRY: dict[str, type[FP4KVCacheQuantMethod]] = {
    "nvfp4": NVFP4KVMethod,
    "blockfp4": BlockFP4KVMethod,
    "mxfp4": MXFP4KVMethod,
}


def register_fp4_kv_cache_quant_method(name: str) -> Callable[[type], type]:
    """Class decorator that adds a third-party method to the registry under `name`."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")

    def register(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, FP4KVCacheQuantMethod)):
            raise TypeError(f"{cls!r} is not an FP4KVCacheQuantMethod subclass")
        if name in FP4_KV_CACHE_QUANT_REGISTRY:
            raise ValueError(f"an FP4 KV cache method named {name!r} is already registered")
        FP4_KV_CACHE_QUANT_REGISTRY[name] = cls
        return cls

    return register


def get_fp4_kv_cache_quant_method(name: str, **kwargs) -> FP4KVCacheQuantMethod:
    """Instantiate the method registered as `name` (kwargs go to its constructor)."""
    try:
        cls = FP4_KV_CACHE_QUANT_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown FP4 KV cache method {name!r}; valid: {sorted(FP4_KV_CACHE_QUANT_REGISTRY)}") from None
    return cls(**kwargs)
