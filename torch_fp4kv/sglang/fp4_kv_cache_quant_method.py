"""SGLang's FP4 KV cache strategies (`sglang.srt.layers.quantization.fp4_kv_cache_quant_method`,
as introduced by SGLang PR #21954), over fp4kv ops; kv_cache_quant_method.py gives them today's
SGLang names.

SGLang's split of work: the pool owns the buffers and hands a method one layer's tensors; the
method quantizes into them and dequantizes gathered slots for prefill. The buffers, their shapes
and `compute_cell_size` are SGLang's; the bytes are this library's formats.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import ClassVar, Optional

import torch
from torch import Tensor

from .. import ops
from ..calibration import entries_by_layer, global_scale_value
from ..ops import checks
from ..ops.checks import ArgNames, check_rank, check_tensor
from ..ops.formats import E2M1_MAX
from .kvfp4_tensor import as_global_scale, unflatten_scales

__all__ = [
    "FP4_KV_CACHE_QUANT_REGISTRY",
    "BlockFP4KVMethod",
    "FP4KVCacheQuantMethod",
    "NVFP4KVMethod",
    "get_fp4_kv_cache_quant_method",
]

# Prefill reads earlier tokens as FP8 E4M3, the input of FlashInfer's FP8 prefill kernels.
PREFILL_DTYPE = torch.float8_e4m3fn

# SGLang's argument names, for the ops' checks.
STORE_NAMES = ArgNames(k_data="k_buffer", v_data="v_buffer", k_scales="k_scale_buffer", v_scales="v_scale_buffer",
                       k="cache_k", v="cache_v", k_global_scale="k_scale", v_global_scale="v_scale")
PREV_KV_NAMES = {prefix: ArgNames(data=f"{prefix}_fp4", scales=f"{prefix}_scales") for prefix in "kv"}


class FP4KVCacheQuantMethod(abc.ABC):
    """SGLang's abstract FP4 KV cache strategy."""

    name: str
    # The PR's SCALE_BLOCK_SIZE is today's `scale_block_size` (kv_cache_quant_method.py), which SGLang
    # reads off the class: one class attribute under both names, whichever a subclass sets.
    SCALE_BLOCK_SIZE: int = 1
    scale_block_size: int = 1

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "scale_block_size" in cls.__dict__:
            cls.SCALE_BLOCK_SIZE = cls.scale_block_size
        else:
            cls.scale_block_size = cls.SCALE_BLOCK_SIZE

    def needs_dequant_workspace(self) -> bool:
        """Whether the pool allocates the FP8 workspaces dq_k_buffer / dq_v_buffer for prefill."""
        return False

    def needs_global_scale(self) -> bool:
        """Whether the method keeps a per-layer FP32 global scale."""
        return False

    @abc.abstractmethod
    def create_buffers(self, size: int, head_num: int, head_dim: int, layer_num: int, device) -> dict:
        """The pool's tensors: per-layer lists k_buffer, v_buffer, k_scale_buffer, v_scale_buffer;
        shared dq_k_buffer, dq_v_buffer; and store_dtype."""

    @abc.abstractmethod
    def quantize_and_store(self, k_buffer: Tensor, v_buffer: Tensor, k_scale_buffer: Optional[Tensor],
                           v_scale_buffer: Optional[Tensor], loc: Tensor, cache_k: Tensor, cache_v: Tensor,
                           k_scale=None, v_scale=None) -> None:
        """Quantize cache_k, cache_v [T, H, D] into one layer's buffers at slots loc [T]."""

    @abc.abstractmethod
    def dequantize_prev_kv(self, k_fp4: Tensor, k_scales: Tensor, v_fp4: Tensor, v_scales: Tensor,
                           layer_id: int) -> tuple[Tensor, Tensor]:
        """Already-gathered packed K/V and their scales -> (k, v) [T, H, D] for prefill."""

    def compute_cell_size(self, head_num: int, head_dim: int, num_layers: int, kv_size: int) -> int:
        """Bytes per token slot of the pool, times kv_size (the storage element size, 1 for FP4).
        Not abstract, as in SGLang: a method that never sizes a pool need not say."""
        raise NotImplementedError(f"{type(self).__name__} does not compute a cell size")

    def load_scales_from_model(self, model_runner, sm_version: Optional[int] = None) -> None:
        """Load per-layer global scales from the model (nothing to load by default)."""


class _TableMethod(FP4KVCacheQuantMethod):
    """What both recipes share, read off the format table row `recipe`: buffer shapes, sizes, the
    op calls. Both keep an FP8 prefill workspace, as SGLang's do (NVFP4 unless native_prefill)."""

    SCALE_BLOCK_SIZE = 16
    # The format table row this method stores (`name` is SGLang's label for it).
    recipe: ClassVar[str]
    # SGLang keeps NVFP4 scales per head, [size, H, D/16], block-FP4 ones per token, [size, H*D/16].
    scales_per_token: ClassVar[bool]

    @property
    def fmt(self) -> ops.FP4Format:
        """The format table row named `recipe`."""
        return ops.get_format(self.recipe)

    def needs_dequant_workspace(self) -> bool:
        return True

    def _check_sizes(self, head_num: int, head_dim: int, layer_num: int, layer_num_name: str = "layer_num") -> None:
        for name, value in (("head_num", head_num), (layer_num_name, layer_num)):
            checks.check_count(value, name, minimum=1)
        checks.check_count(head_dim, "head_dim", minimum=1)
        checks.check_head_dim(head_dim, self.fmt, "head_dim")

    def create_buffers(self, size: int, head_num: int, head_dim: int, layer_num: int, device) -> dict:
        checks.check_count(size, "size", minimum=1)
        self._check_sizes(head_num, head_dim, layer_num)
        blocks = head_dim // self.SCALE_BLOCK_SIZE
        scale_shape = (size, head_num * blocks) if self.scales_per_token else (size, head_num, blocks)

        def per_layer(*shape) -> list[Tensor]:
            return [torch.zeros(shape, dtype=torch.uint8, device=device) for _ in range(layer_num)]

        def workspace() -> Optional[Tensor]:
            if not self.needs_dequant_workspace():
                return None
            return torch.zeros(size, head_num, head_dim, dtype=PREFILL_DTYPE, device=device)

        return {
            "k_buffer": per_layer(size, head_num, head_dim // 2),
            "v_buffer": per_layer(size, head_num, head_dim // 2),
            "k_scale_buffer": per_layer(*scale_shape),
            "v_scale_buffer": per_layer(*scale_shape),
            "dq_k_buffer": workspace(),
            "dq_v_buffer": workspace(),
            "store_dtype": torch.uint8,
        }

    def compute_cell_size(self, head_num: int, head_dim: int, num_layers: int, kv_size: int) -> int:
        """Every layer's packed K+V and scales, plus one FP8 K+V workspace row shared by all layers
        when the method keeps the workspace (SGLang's NVFP4Method counts it even with
        native_prefill; this counts what create_buffers allocates)."""
        self._check_sizes(head_num, head_dim, num_layers, "num_layers")
        checks.check_count(kv_size, "kv_size", minimum=1)
        fp4_bytes = num_layers * self.fmt.bytes_per_token(head_num, head_dim)
        workspace_bytes = 2 * head_num * head_dim * PREFILL_DTYPE.itemsize if self.needs_dequant_workspace() else 0
        return (fp4_bytes + workspace_bytes) * kv_size

    def _op_scales(self, scales, name: str, data, data_name: str) -> Tensor:
        """A scale tensor as the ops take it, [..., H, D/16]; writes through it reach `scales`."""
        return unflatten_scales(scales, name, data, data_name, self.fmt) if self.scales_per_token else scales

    def _store_global_scales(self, k_scale, v_scale, device) -> tuple[Optional[Tensor], Optional[Tensor]]:
        return None, None  # block-FP4 has no global scale; SGLang ignores k_scale / v_scale here

    def _layer_global_scales(self, layer_id: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        return None, None

    def quantize_and_store(self, k_buffer, v_buffer, k_scale_buffer, v_scale_buffer, loc, cache_k, cache_v,
                           k_scale=None, v_scale=None) -> None:
        """Slots outside the buffers (e.g. -1 padding) are skipped; every argument is checked first,
        under SGLang's names, the K/V buffers before the scale buffers that are judged against them."""
        kv_recipe = ops.get_kv_recipe(self.recipe)
        checks.check_store_data_args(k_buffer, v_buffer, cache_k, cache_v, kv_recipe, STORE_NAMES)
        k_scales = self._op_scales(k_scale_buffer, "k_scale_buffer", k_buffer, "k_buffer")
        v_scales = self._op_scales(v_scale_buffer, "v_scale_buffer", v_buffer, "v_buffer")
        k_g, v_g = self._store_global_scales(k_scale, v_scale, k_buffer.device)
        checks.check_quantize_and_store_args(k_buffer, v_buffer, k_scales, v_scales, loc, cache_k, cache_v, self.recipe,
                                             k_g, v_g, STORE_NAMES)
        ops.quantize_and_store(k_buffer, k_scales, v_buffer, v_scales, loc, cache_k, cache_v, self.recipe, k_g, v_g)

    def dequantize_prev_kv(self, k_fp4, k_scales, v_fp4, v_scales, layer_id: int) -> tuple[Tensor, Tensor]:
        """(k, v) [T, H, D] in FP8 E4M3, rounded once from float32."""
        k_g, v_g = self._layer_global_scales(layer_id)
        read = []
        for data, scales, g, prefix in ((k_fp4, k_scales, k_g, "k"), (v_fp4, v_scales, v_g, "v")):
            names = PREV_KV_NAMES[prefix]
            check_rank(check_tensor(data, names.data), names.data, 3, "[T, H, D/2]")
            scales = self._op_scales(scales, names.scales, data, names.data)
            checks.check_dequantize_args(data, scales, self.recipe, g, PREFILL_DTYPE, names)
            read.append(ops.dequantize(data, scales, self.recipe, g, PREFILL_DTYPE))
        return read[0], read[1]


class NVFP4KVMethod(_TableMethod):
    """NVFP4: FP8 E4M3 block scales plus per-layer FP32 global scales for K and V
    (`k_scales_gpu`, `v_scales_gpu`, indexed by global layer id, default 1.0).

    SGLang's class under SGLang's signature, `NVFP4KVMethod(num_layers, device, sm_version)`, handed
    one layer's buffers per call; `torch_fp4kv.NVFP4Method` is the library's own, whose layer
    caches own their buffers. `native_prefill=True` (today's SGLang NVFP4Method): no FP8 prefill
    workspace (dq_k_buffer / dq_v_buffer are None; dequantize_prev_kv still returns FP8 tensors)."""

    name = recipe = "nvfp4"
    scales_per_token = False

    def __init__(self, num_layers: int, device, sm_version: int = 120, native_prefill: bool = False):
        checks.check_count(num_layers, "num_layers", minimum=1)
        if not isinstance(native_prefill, bool):
            raise TypeError(f"native_prefill must be a bool, got {native_prefill!r}")
        self.num_layers = num_layers
        self.device = device
        self.sm_version = sm_version
        self.native_prefill = native_prefill
        self.k_scales_gpu = torch.ones(num_layers, dtype=torch.float32, device=device)
        self.v_scales_gpu = torch.ones(num_layers, dtype=torch.float32, device=device)

    def needs_global_scale(self) -> bool:
        return True

    def needs_dequant_workspace(self) -> bool:
        return not self.native_prefill

    def _store_global_scales(self, k_scale, v_scale, device):
        return as_global_scale(k_scale, "k_scale", device), as_global_scale(v_scale, "v_scale", device)

    def _layer_global_scales(self, layer_id: int):
        if not 0 <= layer_id < len(self.k_scales_gpu):
            raise ValueError(f"layer_id {layer_id} is outside k_scales_gpu's {len(self.k_scales_gpu)} layers")
        return self.k_scales_gpu[layer_id: layer_id + 1], self.v_scales_gpu[layer_id: layer_id + 1]

    def load_scales_from_model(self, model_runner, sm_version: Optional[int] = None) -> None:
        """Read each attention layer's `k_scale` / `v_scale` (1.0 where absent or None) into
        `k_scales_gpu[layer.layer_id]`, as SGLang does: the layers are those of
        `model_runner.model.model` (`.thinker.model` for Qwen3-Omni-MoE), the attention module
        at `self_attn.attn`, `self_attn.attn_mqa`, `attn` or `attention.attn`. `model_runner` may
        also be a calibration state dict (`torch_fp4kv.checkpoint_scales.load_kv_scales(path,
        "nvfp4")`, `torch_fp4kv.hf.calibrate`): layer i's `k_scale` and `v_scale` (both, for the
        same layers) into `k_scales_gpu[i]`. With sm_version 100 the scales are multiplied by 6:
        TRT-LLM's kernels there expect amax / 448, checkpoints store amax / (6 * 448). The scale
        tensors are reallocated only if a layer id exceeds them."""
        if sm_version is not None:
            self.sm_version = sm_version
        if isinstance(model_runner, Mapping):
            scales = _calibration_scales(model_runner)
        else:
            scales = {layer.layer_id: (_scale_of(layer, "k_scale"), _scale_of(layer, "v_scale"))
                      for layer in _attention_layers(_language_model(model_runner.model))}
        if not scales:
            return
        needed = max(scales) + 1
        if needed > len(self.k_scales_gpu):
            self.k_scales_gpu = torch.ones(needed, dtype=torch.float32, device=self.device)
            self.v_scales_gpu = torch.ones(needed, dtype=torch.float32, device=self.device)
        k_values, v_values = self.k_scales_gpu.tolist(), self.v_scales_gpu.tolist()
        factor = E2M1_MAX if self.sm_version == 100 else 1.0
        for layer_id, (k_scale, v_scale) in scales.items():
            k_values[layer_id] = k_scale * factor
            v_values[layer_id] = v_scale * factor
        self.k_scales_gpu.copy_(torch.tensor(k_values, dtype=torch.float32))
        self.v_scales_gpu.copy_(torch.tensor(v_values, dtype=torch.float32))


def _calibration_scales(state: Mapping) -> dict[int, tuple[float, float]]:
    """Layer -> (k_scale, v_scale) of a calibration state dict, each checked to be one number."""
    k_scales, v_scales = entries_by_layer(state, "k_scale"), entries_by_layer(state, "v_scale")
    if set(k_scales) != set(v_scales):
        raise ValueError(f"model_runner: the calibration has k_scale for layers {sorted(k_scales)} but v_scale for "
                         f"layers {sorted(v_scales)}")
    return {i: (float(global_scale_value(k_scales[i], f"layer {i}'s k_scale")),
                float(global_scale_value(v_scales[i], f"layer {i}'s v_scale"))) for i in k_scales}


def _language_model(model):
    """SGLang's `resolve_language_model`: the module that holds `.layers`."""
    if type(model).__name__ == "Qwen3OmniMoeForConditionalGeneration":
        return model.thinker.model
    return model.model


def _attention_layers(language_model) -> list:
    """Each decoder layer's attention module, where SGLang's model classes keep it."""
    found = []
    for layer in language_model.layers:
        if hasattr(layer, "self_attn"):
            if hasattr(layer.self_attn, "attn"):
                found.append(layer.self_attn.attn)
            elif hasattr(layer.self_attn, "attn_mqa"):
                found.append(layer.self_attn.attn_mqa)
        elif hasattr(layer, "attn"):
            found.append(layer.attn)
        elif hasattr(layer, "attention") and hasattr(layer.attention, "attn"):
            found.append(layer.attention.attn)
    return found


def _scale_of(attention, name: str) -> float:
    """An attention layer's k_scale or v_scale: 1.0 where it has none (SGLang's default), else one
    number finite and > 0 (a ValueError names the layer)."""
    value = getattr(attention, name, None)
    return 1.0 if value is None else float(global_scale_value(value, f"layer {attention.layer_id}'s {name}"))


class BlockFP4KVMethod(_TableMethod):
    """SGLang's block-16 FP4 with E8M0 scales, no global scale; scales kept per token. SGLang's
    class and signature; `torch_fp4kv.BlockFP4Method` is the library's own."""

    name = recipe = "blockfp4"
    scales_per_token = True


FP4_KV_CACHE_QUANT_REGISTRY: dict[str, type[FP4KVCacheQuantMethod]] = {
    "nvfp4": NVFP4KVMethod,
    "blockfp4": BlockFP4KVMethod,
}


def get_fp4_kv_cache_quant_method(name: str, **kwargs) -> FP4KVCacheQuantMethod:
    """Instantiate the method registered as `name` (kwargs go to its constructor)."""
    return instantiate(FP4_KV_CACHE_QUANT_REGISTRY, name, kwargs)


def instantiate(registry: Mapping[str, type], name: str, kwargs: Mapping) -> FP4KVCacheQuantMethod:
    """SGLang's factory over one of its registries, with its error for an unknown name."""
    if name not in registry:
        raise ValueError(f"Unknown fp4_kv_cache_recipe: '{name}'. Available: {list(registry)}")
    return registry[name](**kwargs)
