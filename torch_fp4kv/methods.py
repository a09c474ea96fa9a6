"""Quantization strategies for an FP4 KV cache, shaped like SGLang's `FP4KVCacheQuantMethod`.

An engine's KV pool asks a method for its buffers, then calls it to store new tokens and to read
earlier ones back. Each method is one row of the format table (`torch_fp4kv.ops.FORMATS`) plus
what is particular to it (NVFP4's per-layer global scales and FP8 prefill workspace). Its layer
caches (`FP4KVPoolLayer`, one per layer) own the tensors; `buffers` lists them.

`torch_fp4kv.sglang` has classes of the same shape under SGLang's own names and signatures
(`sglang.NVFP4KVMethod(num_layers, device)`, buffers handed in per call): a port for SGLang code.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from .calibration import (calibrate_layer, calibration_state_dict, calibration_updates, global_scale_value,
                          k_channel_scale_value, k_mean_value, layer_index, write_updates)
from .layer_cache import DeviceOnlyBuffers, FP4KVPoolLayer
from .ops import FP4Format, FP4KVCacheRecipe, KVRecipe, checks, get_format, get_kv_recipe
from .options import KVCacheOptions


class AttentionRead(enum.Enum):
    """How an attention kernel reads a cache: the engine allocates a workspace only for DEQUANTIZED."""

    NATIVE_FP4 = "native_fp4"  # fp4kv.decode_attention / extend_attention read the packed cache itself
    DEQUANTIZED = "dequantized"  # dequantize_prev_kv into a workspace, then a BF16/FP8 kernel


@dataclass
class FP4KVBuffers:
    """Everything one KV pool allocates, as lists indexed by layer: a view of the layer caches,
    which own the tensors (read it again after moving them)."""

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
    # float32 [D, D] normalized Hadamard (rotate=True; every layer holds the same one); None if unused.
    rotation: torch.Tensor | None = None
    # float32 [H, D] per layer, K's calibrated channel means (smooth_k=True); None if unused.
    k_means: list[torch.Tensor] | None = None
    # float32 [H, D] per layer, K's calibrated channel scales (channel_scale_k=True); None if unused.
    k_channel_scales: list[torch.Tensor] | None = None


class DequantWorkspace(DeviceOnlyBuffers):
    """K and V [slots, H, D] that `dequantize_prev_kv` fills for prefill kernels, shared by every
    layer. A module so that the pool's `.to()` moves it with the layers; it keeps its dtype (the
    kernels' input). Not part of a state dict."""

    DEVICE_ONLY = ("k", "v")

    def __init__(self, slots: int, heads: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        for name in self.DEVICE_ONLY:
            self.register_buffer(name, torch.zeros(slots, heads, head_dim, dtype=dtype, device=device),
                                 persistent=False)


class FP4KVCacheQuantMethod(abc.ABC):
    """One way of keeping a KV cache in FP4. Create buffers first; the method keeps them."""

    # What create_buffers allocated (table methods compute it from their layer caches).
    buffers: FP4KVBuffers | None = None

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


class TableFP4Method(FP4KVCacheQuantMethod):
    """A method driven entirely by one row of the format table; subclasses name the recipe.

    `TableFP4KVMethod` is this class's former name, kept as an alias for one release."""

    recipe: ClassVar[FP4KVCacheRecipe]
    # Dtype `dequantize_prev_kv` returns by default; a workspace is allocated when it is FP8.
    prev_kv_dtype: ClassVar[torch.dtype] = torch.bfloat16

    def __init__(self, rotate: bool | None = None, smooth_k: bool | None = None, k_fp8: bool | None = None, *,
                 channel_scale_k: bool | None = None, options: KVCacheOptions | None = None) -> None:
        """`options` (KVCacheOptions), or its fields as keywords (None: as `options` has it; a
        keyword that contradicts it is a ValueError). rotate: store each head's K and V rotated by
        a normalized Hadamard matrix (head_dim a power of two). smooth_k: subtract a per-layer,
        per-head, per-channel K mean before storing (zeros until `calibrate` or
        `load_scales_from_model` sets it). channel_scale_k (needs smooth_k): divide each K channel
        by a per-layer, per-head, per-channel scale after the mean and multiply queries by it
        (ones until calibrated; `calibrate` needs the queries). All three run in PyTorch around the
        ops (FP4KVPoolLayer), on every backend. k_fp8: keep K in FP8 E4M3 under a per-layer global scale (the ops'
        "<recipe>+k8"; V stays in the recipe): keys are the half whose rounding costs small models
        the most accuracy. A method keeps every token in FP4: sink_tokens / recent_tokens are
        FP4Cache's."""
        self.options = (options or KVCacheOptions()).merged(rotate=rotate, smooth_k=smooth_k, k_fp8=k_fp8,
                                                            channel_scale_k=channel_scale_k)
        if self.options.full_precision:
            raise ValueError(f"options: a method keeps every token in FP4; sink_tokens / recent_tokens are "
                             f"FP4Cache's (got {self.options})")
        self._layers: list[FP4KVPoolLayer] | None = None
        self.workspace: DequantWorkspace | None = None

    @property
    def fmt(self) -> FP4Format:
        """The recipe's FP4 format (V's, and K's unless k_fp8)."""
        return get_format(self.recipe)

    @property
    def kv_recipe(self) -> KVRecipe:
        """K's and V's formats, named as the ops take them ("nvfp4" or "nvfp4+k8")."""
        return get_kv_recipe(self.options.kv_recipe(self.fmt.name))

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
        `lse` [B, Hq] float32 receives its log-sum-exp (FP4KVPoolLayer.decode_attention)."""
        return self.layer(layer_id).decode_attention(q, block_table, seq_lens, page_size, sm_scale, out, lse)

    def extend_attention(self, layer_id: int, q, cu_seqlens_q, block_table, seq_lens, page_size: int,
                         sm_scale: float | None = None, out=None):
        """Attention of new tokens q [T, Hq, D] (rows cu_seqlens_q[b]:cu_seqlens_q[b + 1], their K/V
        stored already) over layer `layer_id`'s paged FP4 cache, causal, read directly."""
        return self.layer(layer_id).extend_attention(q, cu_seqlens_q, block_table, seq_lens, page_size, sm_scale, out)

    def compute_cell_size(self, head_num: int, head_dim: int, layer_num: int) -> int:
        """Bytes per token slot of what create_buffers allocates: every layer's K and V, plus the
        FP8 prefill workspace's row where the method keeps one (sizes checked as there)."""
        for name, value in (("head_num", head_num), ("layer_num", layer_num)):
            checks.check_count(value, name, minimum=1)
        kv_recipe = FP4KVPoolLayer.kv_recipe_of(self.fmt.name, self.options, head_num, head_dim)
        cell = layer_num * kv_recipe.bytes_per_token(head_num, head_dim)
        if self.needs_dequant_workspace():
            cell += 2 * head_num * head_dim * self.prev_kv_dtype.itemsize  # shared by all layers
        return cell

    def create_buffers(self, size: int, head_num: int, head_dim: int, layer_num: int, device) -> FP4KVBuffers:
        """One FP4KVPoolLayer per layer (FP4KVPoolLayer.allocate), and the FP8 prefill workspace when
        the method has one; returns them as `buffers` lists."""
        for name, value in (("size", size), ("head_num", head_num), ("layer_num", layer_num)):
            checks.check_count(value, name, minimum=1)
        self._layers = [FP4KVPoolLayer.allocate(self.fmt.name, self.options, size, head_num, head_dim, device)
                        for _ in range(layer_num)]
        if self.needs_dequant_workspace():
            self.workspace = DequantWorkspace(size, head_num, head_dim, self.prev_kv_dtype, device)
        return self.buffers

    @property
    def buffers(self) -> FP4KVBuffers | None:
        """Every layer's tensors as lists, read from the layer caches that own them (so after a
        pool's `.to()` they are the moved tensors); None before create_buffers."""
        if self._layers is None:
            return None
        layers = self._layers

        def each(name: str) -> list[torch.Tensor] | None:
            tensors = [getattr(layer, name) for layer in layers]
            return None if tensors[0] is None else tensors

        return FP4KVBuffers(
            k_data=each("k_data"), v_data=each("v_data"), k_scales=each("k_scales"), v_scales=each("v_scales"),
            store_dtype=torch.uint8, k_global_scales=each("k_global_scale"), v_global_scales=each("v_global_scale"),
            dequant_workspace=None if self.workspace is None else (self.workspace.k, self.workspace.v),
            rotation=layers[0].rotation, k_means=each("k_mean"), k_channel_scales=each("k_channel_scale"))

    def _created_layers(self) -> list[FP4KVPoolLayer]:
        if self._layers is None:
            raise RuntimeError(f"{type(self).__name__}: call create_buffers() first")
        return self._layers

    def layer(self, layer_id: int) -> FP4KVPoolLayer:
        """Layer `layer_id`'s cache: the module that owns its tensors, which every call goes through."""
        layers = self._created_layers()
        if not 0 <= layer_id < len(layers):  # no negative indexing: -1 is an engine's bug, not "the last"
            raise IndexError(f"layer_id {layer_id} is out of range for {len(layers)} layers")
        return layers[layer_id]

    def global_scales(self, layer_id: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The layer's (K, V) global scales: the tensors its stores and reads use, which the scale
        setters write in place."""
        layer = self.layer(layer_id)
        return layer.k_global_scale, layer.v_global_scale

    def quantize_and_store(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.layer(layer_id).store(loc, k, v)

    def calibrate(self, layer_id: int, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None) -> None:
        """Calibrate a layer from sample K/V [..., H, D] and queries [..., Hq, D] in place
        (calibration.calibrate_layer: K's mean when smoothing, its channel scales from K and q when
        scaling, the global scales of what is quantized)."""
        calibrate_layer(self.layer(layer_id), k, v, q)

    def set_k_mean(self, layer_id: int, k_mean) -> None:
        """Write a layer's K mean [H, D] in place (needs smooth_k=True)."""
        layer = self.layer(layer_id)
        value = k_mean_value(layer, k_mean)
        layer.k_mean.copy_(value)

    def set_k_channel_scale(self, layer_id: int, k_channel_scale) -> None:
        """Write a layer's K channel scales [H, D] (finite, > 0) in place (needs channel_scale_k=True)."""
        layer = self.layer(layer_id)
        value = k_channel_scale_value(layer, k_channel_scale)
        layer.k_channel_scale.copy_(value)

    def calibration_state_dict(self) -> dict[str, torch.Tensor]:
        """What `calibrate` set, keyed `layers.{i}.k_mean` / `layers.{i}.k_channel_scale` /
        `layers.{i}.k_scale` / `layers.{i}.v_scale`
        (ModelOpt's scale names): `torch.save` it, and give it to `load_scales_from_model` later."""
        return calibration_state_dict(self._created_layers())

    def load_scales_from_model(self, source) -> int:
        """Load per-layer calibration from a state dict (calibration.py: ModelOpt-style keys such as
        `model.layers.3.self_attn.k_mean`): `k_mean` entries [H, D] when smoothing,
        `k_channel_scale` entries [H, D] when scaling K channels, and `k_scale` /
        `v_scale` entries for the global scales the formats have. NVFP4 reads them from a model's
        attention modules too. Every entry is checked before any is written, so a bad one changes
        nothing. Returns how many layers were set."""
        return write_updates(self._created_layers(), self._scale_updates(source))

    def _scale_updates(self, source) -> dict[tuple[int, str], torch.Tensor]:
        """What load_scales_from_model writes, by (layer, layer-cache buffer), each value checked."""
        if not isinstance(source, Mapping):
            return {}
        return calibration_updates(self._created_layers(), source)

    def dequantize_prev_kv(self, layer_id: int, loc: torch.Tensor, dtype: torch.dtype | None = None):
        """(k, v) [T, H, D] of slots `loc`. In the method's FP8 workspace when it has one and
        `dtype` is left at the default; otherwise freshly allocated in `dtype`."""
        k, v = self.layer(layer_id).read(loc, dtype or self.prev_kv_dtype)
        if self.workspace is None or dtype is not None:
            return k, v
        k_ws, v_ws = self.workspace.k, self.workspace.v
        if loc.shape[0] > k_ws.shape[0]:
            raise ValueError(f"loc has {loc.shape[0]} slots but the dequant workspace holds {k_ws.shape[0]}")
        k_ws[: loc.shape[0]].copy_(k)
        v_ws[: loc.shape[0]].copy_(v)
        return k_ws[: loc.shape[0]], v_ws[: loc.shape[0]]


class NVFP4Method(TableFP4Method):
    """NVFP4: E4M3 block scales plus per-layer FP32 global scales for K and V (default 1.0).

    Prefill reads earlier tokens through an FP8 E4M3 workspace (the input of FP8 prefill kernels).
    Not `torch_fp4kv.sglang.NVFP4KVMethod`, the SGLang port (constructed with num_layers and
    device, handed one layer's buffers per call). `NVFP4KVMethod` is this class's former name,
    kept as an alias for one release.
    """

    recipe = FP4KVCacheRecipe.NVFP4
    prev_kv_dtype = torch.float8_e4m3fn

    def set_global_scales(self, layer_id: int, k_scale, v_scale) -> None:
        """Write a layer's global scales in place (tensors stay where CUDA graphs captured them);
        both are checked before either is written."""
        values = global_scale_value(k_scale, "k_scale"), global_scale_value(v_scale, "v_scale")
        for target, value in zip(self.global_scales(layer_id), values):
            target.copy_(value)

    def _scale_updates(self, source) -> dict[tuple[int, str], torch.Tensor]:
        """From an `nn.Module`: the `k_scale`/`v_scale` its modules hold, the layer from a module's
        name (the number after `layers.`, else module order); a model whose config has a
        `quantization_config` goes through `checkpoint_scales.load_kv_scales`, which converts the
        scales from the KV format it names. From a state dict: every entry a table method reads,
        each `k_scale` with its `v_scale`."""
        if isinstance(source, nn.Module):
            source = self._module_scales(source)
        if not isinstance(source, Mapping):
            raise TypeError(f"source must be an nn.Module or a state dict, got {type(source).__name__}")
        for key in source:
            if key.endswith(".k_scale") and f"{key.removesuffix('.k_scale')}.v_scale" not in source:
                raise ValueError(f"state dict has {key} but no {key.removesuffix('.k_scale')}.v_scale")
        return super()._scale_updates(source)

    def _module_scales(self, model: nn.Module) -> dict:
        if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
            # Imported here: checkpoint_scales resolves recipe names through this module's registry.
            from .checkpoint_scales import load_kv_scales
            return load_kv_scales(model, self.options.spell(self.recipe.value), layers=range(len(self._created_layers())))
        holders = [(name, module) for name, module in model.named_modules()
                   if hasattr(module, "k_scale") and hasattr(module, "v_scale")]
        state = {}
        for order, (name, module) in enumerate(holders):
            if layer_index(name, -1) < 0:  # no `layers.N`: its module order (sorted names would put 10 before 2)
                name = f"layers.{order}"
            state[f"{name}.k_scale"], state[f"{name}.v_scale"] = module.k_scale, module.v_scale
        return state


class NVFP4FourOverSixMethod(NVFP4Method):
    """NVFP4 whose quantizer gives each block the better of two scales, amax / 6 and amax / 4
    (vLLM's `nvfp4_4over6`, formats.ScaleChoice): NVFP4's bytes and global scales, read by every
    NVFP4 reader as they are."""

    recipe = FP4KVCacheRecipe.NVFP4_4OVER6


class BlockFP4Method(TableFP4Method):
    """Block-16 FP4 with power-of-two (E8M0) scales and no global scale: SGLang's FP4MXBlock16.

    Not `torch_fp4kv.sglang.BlockFP4KVMethod`, the SGLang port. `BlockFP4KVMethod` is this class's
    former name, kept as an alias for one release."""

    recipe = FP4KVCacheRecipe.BLOCKFP4


class MXFP4Method(TableFP4Method):
    """OCP MX v1.0 MXFP4: block-32 FP4 with E8M0 scales. `MXFP4KVMethod` is this class's former
    name, kept as an alias for one release."""

    recipe = FP4KVCacheRecipe.MXFP4


# Former names, kept as aliases for one release.
TableFP4KVMethod = TableFP4Method
NVFP4KVMethod = NVFP4Method
BlockFP4KVMethod = BlockFP4Method
MXFP4KVMethod = MXFP4Method

FP4_KV_CACHE_QUANT_REGISTRY: dict[str, type[FP4KVCacheQuantMethod]] = {
    "nvfp4": NVFP4Method,
    "nvfp4_4over6": NVFP4FourOverSixMethod,
    "blockfp4": BlockFP4Method,
    "mxfp4": MXFP4Method,
}


def register_fp4_kv_cache_quant_method(name: str) -> Callable[[type], type]:
    """Class decorator that adds a third-party method to the registry under `name`."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if "+" in name:  # the factory reads what follows a "+" as options
        raise ValueError(f"name must not contain '+' (get_fp4_kv_cache_quant_method reads options after it); got {name!r}")

    def register(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, FP4KVCacheQuantMethod)):
            raise TypeError(f"{cls!r} is not an FP4KVCacheQuantMethod subclass")
        if name in FP4_KV_CACHE_QUANT_REGISTRY:
            raise ValueError(f"an FP4 KV cache method named {name!r} is already registered")
        FP4_KV_CACHE_QUANT_REGISTRY[name] = cls
        return cls

    return register


def _registered(name: str) -> type[FP4KVCacheQuantMethod]:
    try:
        return FP4_KV_CACHE_QUANT_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown FP4 KV cache method {name!r}; "
                         f"valid: {sorted(FP4_KV_CACHE_QUANT_REGISTRY)}") from None


def get_fp4_kv_cache_quant_method(name: str, **kwargs) -> FP4KVCacheQuantMethod:
    """Instantiate the method registered as `name`, which may spell options after it
    (`nvfp4+rot+k8`: KVCacheOptions' grammar; they reach a table method as `options`); kwargs go to
    its constructor."""
    method, options = KVCacheOptions.parse(name)
    cls = _registered(method)
    if options == KVCacheOptions():
        return cls(**kwargs)
    if not issubclass(cls, TableFP4Method):
        raise ValueError(f"name: {method!r} takes no options; got {name!r}")
    return cls(options=options, **kwargs)


def table_format(name: str) -> str:
    """The FP4 format that the table method registered as `name` (no options) stores: what its
    layer caches are allocated with."""
    cls = _registered(name)
    if not issubclass(cls, TableFP4Method):
        raise ValueError(f"recipe {name!r} is not a table-driven method (it must provide per-layer caches)")
    return get_format(cls.recipe).name
