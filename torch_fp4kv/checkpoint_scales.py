"""The per-layer KV cache scales of quantized checkpoints, read as this library's calibration and
written from it, so a model calibrated here loads in vLLM or SGLang and the other way round.

What a checkpoint holds: llm-compressor / compressed-tensors (and auto-round's export to it) and
NVIDIA ModelOpt store one K and one V scale per attention layer, `<...>.layers.{i}.self_attn.k_scale`
/ `v_scale` (ModelOpt also `self_attn.k_proj.k_scale` / `v_proj.v_scale`), and name their format in
config.json's `quantization_config`: compressed-tensors' `kv_cache_scheme`
(`{"type": "float", "num_bits": 8 | 4, "strategy": "tensor", ...}`), ModelOpt's
`kv_cache_quant_algo` (`"FP8"` | `"NVFP4"`, also in hf_quant_config.json). vLLM loads them into each
attention layer (`_k_scale`, `_v_scale`), SGLang into `k_scale` / `v_scale`.

How a checkpoint scale becomes a global scale here. A `k_scale` is a dequantization multiplier
calibrated on the layer's amax, `scale = amax / bound`, bound 448 * 6 for NVFP4 (ModelOpt's export;
what vLLM and SGLang read as the NVFP4 global scale) and 448 for FP8 E4M3 (ModelOpt; compressed-
tensors' per-tensor FP8 math). This library's global scales are the same numbers: DESIGN.md's
NVFP4 row dequantizes `x = e2m1 * s * g` and calibrates `g = amax / (448 * 6)`, FP8 keys
`x = e4m3 * g` with `g = amax / 448`; the bound is the format table's `calibration_amax`. So a scale
keeps its value when the checkpoint's format is the recipe's and otherwise carries its amax over,
`g = scale * bound_checkpoint / bound_recipe`: an FP8 checkpoint's scales / 6 for NVFP4 K and V, an
NVFP4 checkpoint's K scale * 6 for `+k8`'s FP8 keys. compressed-tensors' own NVFP4 scheme
(`"strategy": "tensor_group"`, group 16) stores `k_global_scale` = 448 * 6 / amax, the quantizing
multiplier: here its reciprocal. (For `num_bits: 4` with `"strategy": "tensor"`, compressed-tensors'
generic FP4 math would give amax / 6; the engines that serve NVFP4 KV read `k_scale` as ModelOpt's
amax / (448 * 6), and so do these functions.)

blockfp4 and mxfp4 have no global scale: their E8M0 block scales are powers of two taken from each
block's own amax, so a per-layer factor has no place in the format (and a non-power-of-two one
would break it). A tensor kept in one of them takes no checkpoint scale (`blockfp4+k8` takes only
K's), and a recipe with no global scale at all is refused. `+rot` / `+smooth` are refused too: they
store rotated or mean-subtracted K/V, whose range a checkpoint's scales (calibrated on the raw K/V)
do not describe, and they need calibrated K means a checkpoint lacks: calibrate with `hf.calibrate`.

Every scale is checked before anything is returned or written: a missing layer, a per-head or
other non-scalar shape, a value that is not finite or not > 0 is a ValueError naming the tensor.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .calibration import entries_by_layer
from .methods import table_format
from .ops import FP4Format, KVRecipe, get_format, get_kv_recipe
from .options import KVCacheOptions

__all__ = ["CheckpointKVFormat", "load_kv_scales", "save_kv_scales"]

CONFIG_FILE = "config.json"
MODELOPT_CONFIG_FILE = "hf_quant_config.json"
INDEX_FILE = "model.safetensors.index.json"
SCALES_FILE = "kv_cache_scales.safetensors"  # what save_kv_scales writes beside the weights
# A scale tensor's name: the layer after `layers.`, the tensor (k or v) and the name's ending.
_SCALE_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.+\.)?(k|v)(_scale|_global_scale)$")
# An attention projection's tensor: the attention module is the name before the projection.
_PROJECTION_NAME = re.compile(r"^(.*(?:^|\.)layers\.(\d+)\.[^.]+)\.(?:k_proj|qkv_proj)\.")


@dataclass(frozen=True)
class CheckpointKVFormat:
    """How a checkpoint stores a layer's K and V scale: the format it calibrates (a format table
    name), the tensors' name ending (`k_scale` or `k_global_scale`), and whether the number is
    the dequantizing multiplier amax / bound or its reciprocal bound / amax."""

    fmt: str
    suffix: str = "_scale"
    reciprocal: bool = False

    @property
    def bound(self) -> float:
        return get_format(self.fmt).calibration_amax

    def amax(self, scale: torch.Tensor) -> torch.Tensor:
        """The amax a stored scale was calibrated on (float64)."""
        return self.bound / scale if self.reciprocal else scale * self.bound


# compressed-tensors' kv_cache_scheme (type, num_bits, strategy, dynamic) -> what its scale tensors
# are. Static per-tensor scales; NVFP4's groups take their block scales per token ("local").
COMPRESSED_TENSORS_SCHEMES = {
    ("float", 8, "tensor", False): CheckpointKVFormat("fp8_e4m3"),
    ("float", 4, "tensor", False): CheckpointKVFormat("nvfp4"),
    ("float", 4, "tensor_group", "local"): CheckpointKVFormat("nvfp4", "_global_scale", reciprocal=True),
}
# ModelOpt's kv_cache_quant_algo -> what its scale tensors are.
MODELOPT_ALGOS = {"FP8": CheckpointKVFormat("fp8_e4m3"), "NVFP4": CheckpointKVFormat("nvfp4")}
# The formats save_kv_scales writes (and scales_format names), with their kv_cache_scheme's num_bits.
EXPORT_NUM_BITS = {"fp8_e4m3": 8, "nvfp4": 4}


def load_kv_scales(source, recipe: str = "nvfp4", *, scales_format: str | None = None,
                   layers: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's KV scales as the calibration state dict of `recipe` (`layers.{i}.k_scale` /
    `v_scale`, float32 [1]: the global scales of the recipe's formats that have one; module
    docstring: how they map), for `FP4Cache(..., calibration=)`, a table method's
    `load_scales_from_model` and `torch_fp4kv.sglang`'s.

    source: a checkpoint folder (config.json and its *.safetensors; only the scale tensors are
    read), or a loaded model whose modules hold `k_scale` / `v_scale` (the layer is the number after
    `layers.` in the module's name; its `config.quantization_config` names the format).
    scales_format: the format the checkpoint's scales calibrate, "nvfp4" or "fp8_e4m3" (dequantizing
    multipliers amax / bound); by default read from the checkpoint's quantization config.
    layers: the layers that must have scales, by default every decoder layer of its config; scales
    of other layers (a draft head's, say) are left out."""
    targets = _global_scale_formats(_kv_recipe(recipe), recipe)
    if isinstance(source, nn.Module):
        config, folder = _model_config(source), None
    elif isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        config = _read_json(folder / CONFIG_FILE, "source")
    else:
        raise TypeError(f"source must be a checkpoint folder or an nn.Module, got {type(source).__name__}")
    stored = _stored_format(scales_format, config, folder)
    found = _module_scales(source, stored) if folder is None else _file_scales(folder, stored)
    state = {}
    for layer in _required_layers(layers, config):
        for tensor, fmt in targets.items():
            if (layer, tensor) not in found:
                covered = sorted(i for i, t in found if t == tensor)
                raise ValueError(f"the checkpoint has no {tensor}{stored.suffix} for layer {layer} (its "
                                 f"{tensor}{stored.suffix} tensors cover layers {covered})")
            name, value = found[layer, tensor]
            amax = stored.amax(_checked_scale(value, name))
            state[f"layers.{layer}.{tensor}_scale"] = (amax / fmt.calibration_amax).float().reshape(1)
    return state


def save_kv_scales(calibration: Mapping, recipe: str, folder, *, scales_format: str | None = None) -> Path:
    """Write `calibration` (`hf.calibrate(model, ids, recipe)`'s state dict) into the transformers
    model saved in `folder` as the KV scales vLLM and SGLang load: `kv_cache_scales.safetensors`
    with each attention layer's `k_scale` / `v_scale` (float32 [1], dequantizing multipliers; the
    attention module's name is the one the checkpoint's own k_proj / qkv_proj tensors use), listed
    in model.safetensors.index.json when the folder has one, and config.json's
    `quantization_config.kv_cache_scheme` (added to a compressed-tensors config, or a new one).
    Returns the scales file's path.

    scales_format: the checkpoint's KV format, "nvfp4" (`num_bits: 4`) or "fp8_e4m3"
    (`num_bits: 8`); by default the recipe's, when K and V share it (`+k8` keeps K in FP8 and V in
    NVFP4, which one kv_cache_scheme cannot say: choose). Every layer of the model's config needs
    both scales, and the calibration no others; everything is checked before anything is written."""
    kv = _kv_recipe(recipe)
    targets = _global_scale_formats(kv, recipe)
    if "v" not in targets:
        raise ValueError(f"recipe {recipe!r} keeps V in {kv.v.name}, which has no global scale: there is no "
                         "v_scale to write")
    if scales_format is None and kv.k.name != kv.v.name:
        raise ValueError(f"recipe {recipe!r} keeps K in {kv.k.name} and V in {kv.v.name}; pass scales_format "
                         f"({' or '.join(EXPORT_NUM_BITS)}) for the checkpoint's one KV format")
    stored = _export_format(scales_format or kv.k.name)
    folder = Path(folder)
    config = _read_json(folder / CONFIG_FILE, "folder")
    quant_config = dict(config.get("quantization_config") or {"quant_method": "compressed-tensors",
                                                                "config_groups": {}, "format": "dense",
                                                                "quantization_status": "compressed"})
    if quant_config.get("quant_method") != "compressed-tensors":
        raise ValueError(f"folder: config.json's quantization_config is {quant_config.get('quant_method')!r}; "
                         "a kv_cache_scheme is read only from a compressed-tensors config")
    layers = _required_layers(None, config)
    attention = _attention_modules(folder)
    tensors = {}
    for tensor, fmt in targets.items():
        given = entries_by_layer(calibration, f"{tensor}_scale")
        if sorted(given) != layers:
            raise ValueError(f"calibration has {tensor}_scale for layers {sorted(given)}; the model's config has "
                             f"layers {layers}")
        for layer in layers:
            if layer not in attention:
                raise ValueError(f"folder: no k_proj / qkv_proj tensor for layer {layer}, so the name of its "
                                 "attention module is unknown")
            name = f"layers.{layer}.{tensor}_scale"
            amax = _checked_scale(given[layer], name) * fmt.calibration_amax
            tensors[f"{attention[layer]}.{tensor}_scale"] = (amax / stored.bound).float().reshape(1)
    quant_config["kv_cache_scheme"] = {"num_bits": EXPORT_NUM_BITS[stored.fmt], "type": "float",
                                       "strategy": "tensor", "dynamic": False, "symmetric": True}
    path = folder / SCALES_FILE
    save_file(tensors, path, metadata={"format": "pt"})
    _list_in_index(folder, tensors)
    config["quantization_config"] = quant_config
    _write_json(folder / CONFIG_FILE, config)
    return path


# ---- the recipe side ------------------------------------------------------------------------------


def _kv_recipe(recipe: str) -> KVRecipe:
    """The recipe's K and V formats; +rot / +smooth are refused (module docstring)."""
    method, options = KVCacheOptions.parse(recipe)
    if options.rotate or options.smooth_k:
        raise ValueError(f"recipe {recipe!r}: +rot / +smooth store transformed K/V, whose range a checkpoint's "
                         "scales (calibrated on the raw K/V) do not describe; calibrate with torch_fp4kv.hf.calibrate")
    return get_kv_recipe(options.kv_recipe(table_format(method)))


def _global_scale_formats(kv: KVRecipe, recipe: str) -> dict[str, FP4Format]:
    """The recipe's tensors ("k", "v") whose format has a global scale, with that format."""
    formats = {tensor: fmt for tensor, fmt in (("k", kv.k), ("v", kv.v)) if fmt.has_global_scale}
    if not formats:
        raise ValueError(f"recipe {recipe!r} has no global scale (its E8M0 block scales come from each block's "
                         "own amax), so a checkpoint's per-layer k_scale / v_scale have nothing to set")
    return formats


def _required_layers(layers, config: Mapping) -> list[int]:
    if layers is not None:
        chosen = list(layers)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in chosen):
            raise TypeError(f"layers must hold ints >= 0, got {chosen!r}")
        return sorted(set(chosen))
    count = _text_config(config).get("num_hidden_layers")
    if not isinstance(count, int):
        raise ValueError("the checkpoint's config names no num_hidden_layers; pass layers")
    return list(range(count))


def _text_config(config: Mapping) -> Mapping:
    """The decoder's config: the config itself, or its text_config (multimodal models)."""
    return config if "num_hidden_layers" in config else (config.get("text_config") or {})


# ---- the checkpoint side --------------------------------------------------------------------------


def _stored_format(scales_format: str | None, config: Mapping, folder: Path | None) -> CheckpointKVFormat:
    """What the checkpoint's scale tensors are: `scales_format` if given, else from its config
    (compressed-tensors' kv_cache_scheme, or ModelOpt's kv_cache_quant_algo in config.json or
    hf_quant_config.json)."""
    if scales_format is not None:
        return _export_format(scales_format)
    quant_config = config.get("quantization_config") or {}
    if quant_config.get("kv_cache_scheme"):
        return _scheme_format(quant_config["kv_cache_scheme"])
    modelopt = quant_config.get("quantization", quant_config)
    if not modelopt.get("kv_cache_quant_algo") and folder is not None and (folder / MODELOPT_CONFIG_FILE).is_file():
        modelopt = _read_json(folder / MODELOPT_CONFIG_FILE, "source").get("quantization", {})
    algo = modelopt.get("kv_cache_quant_algo")
    if algo is None:
        raise ValueError("the checkpoint's quantization config names no KV cache format (no kv_cache_scheme or "
                         "kv_cache_quant_algo); pass scales_format")
    if algo not in MODELOPT_ALGOS:
        raise ValueError(f"the checkpoint's kv_cache_quant_algo {algo!r} is not one of {sorted(MODELOPT_ALGOS)}")
    return MODELOPT_ALGOS[algo]


def _export_format(name: str) -> CheckpointKVFormat:
    if name not in EXPORT_NUM_BITS:
        raise ValueError(f"scales_format must be one of {sorted(EXPORT_NUM_BITS)}, got {name!r}")
    return CheckpointKVFormat(name)


def _scheme_format(scheme: Mapping) -> CheckpointKVFormat:
    """The format of compressed-tensors' kv_cache_scheme: static, symmetric, one scale per tensor."""
    fields = (scheme.get("type"), scheme.get("num_bits"), scheme.get("strategy") or "tensor",
              scheme.get("dynamic") or False)
    kind = tuple(getattr(field, "value", field) for field in fields)  # compressed-tensors' enums: their values
    if kind not in COMPRESSED_TENSORS_SCHEMES:
        raise ValueError(f"kv_cache_scheme {dict(scheme)} is not supported: (type, num_bits, strategy, dynamic) must "
                         f"be one of {list(COMPRESSED_TENSORS_SCHEMES)} (one static scale per layer and tensor; "
                         "per-head or per-channel scales have no place in this cache)")
    if kind[2] == "tensor_group" and scheme.get("group_size") != get_format("nvfp4").block_size:
        raise ValueError(f"kv_cache_scheme {dict(scheme)}: NVFP4 groups are 16 elements")
    if scheme.get("symmetric") is False:
        raise ValueError(f"kv_cache_scheme {dict(scheme)} is asymmetric: zero points have no place in this cache")
    return COMPRESSED_TENSORS_SCHEMES[kind]


def _scale_key(name: str, stored: CheckpointKVFormat) -> tuple[int, str] | None:
    """(layer, "k" or "v") of a scale tensor's name in the checkpoint's convention, else None."""
    match = _SCALE_NAME.search(name)
    if match is None or match.group(3) != stored.suffix:
        return None
    return int(match.group(1)), match.group(2)


def _collect(named_values, stored: CheckpointKVFormat) -> dict[tuple[int, str], tuple[str, object]]:
    """(layer, tensor) -> (name, value) of the scale tensors among (name, value) pairs; two tensors
    for one layer and tensor (a vision tower's beside the decoder's, say) are a ValueError."""
    found = {}
    for name, value in named_values:
        key = _scale_key(name, stored)
        if key is None:
            continue
        if key in found:
            raise ValueError(f"the checkpoint has two {key[1]}{stored.suffix} tensors for layer {key[0]}: "
                             f"{found[key][0]} and {name}")
        found[key] = (name, value)
    return found


def _file_scales(folder: Path, stored: CheckpointKVFormat) -> dict[tuple[int, str], tuple[str, torch.Tensor]]:
    """The scale tensors of the folder's safetensors files (nothing else is read)."""
    named = []
    for path in _weight_files(folder):
        with safe_open(path, framework="pt") as f:
            named += [(name, f.get_tensor(name)) for name in f.keys() if _scale_key(name, stored) is not None]
    return _collect(named, stored)


def _weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files: those its index lists when it has one (what loaders read)."""
    index = folder / INDEX_FILE
    if index.is_file():
        return [folder / name for name in sorted(set(_read_json(index, "folder").get("weight_map", {}).values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} holds no *.safetensors files")
    return files


def _module_scales(model: nn.Module, stored: CheckpointKVFormat) -> dict[tuple[int, str], tuple[str, object]]:
    """The `k_scale` / `v_scale` (or `*_global_scale`) attributes of the model's modules."""
    named = []
    for module_name, module in model.named_modules():
        for tensor in "kv":
            value = getattr(module, f"{tensor}{stored.suffix}", None)
            if value is not None:
                named.append((f"{module_name}.{tensor}{stored.suffix}", value))
    return _collect(named, stored)


def _model_config(model: nn.Module) -> dict:
    """A model's config as a dict (a transformers config's to_dict, quantization_config included)."""
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else dict(config or {})


def _checked_scale(value, name: str) -> torch.Tensor:
    """One finite scale > 0 as a float64 scalar on the CPU; anything else is an error naming it."""
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}") from error
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point scale, got dtype {tensor.dtype}")
    if tensor.numel() != 1:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}: one scale per head or channel, where the cache "
                         "keeps one global scale per layer and tensor")
    scale = tensor.detach().to("cpu", torch.float64).reshape(())
    if not (torch.isfinite(scale) and scale > 0):
        raise ValueError(f"{name} is {scale.item()}: a scale must be finite and > 0")
    return scale


def _attention_modules(folder: Path) -> dict[int, str]:
    """Layer -> the name of its attention module, read off the checkpoint's k_proj / qkv_proj
    tensor names (`model.layers.3.self_attn.k_proj.weight` -> `model.layers.3.self_attn`). KV
    scales the weights already hold are a ValueError (a previous save_kv_scales' file is replaced)."""
    found: dict[int, str] = {}
    for path in _weight_files(folder):
        if path.name == SCALES_FILE:
            continue
        with safe_open(path, framework="pt") as f:
            names = list(f.keys())
        for name in names:
            if _SCALE_NAME.search(name):
                raise ValueError(f"folder: {path.name} already holds KV scales ({name})")
            match = _PROJECTION_NAME.match(name)
            if match:
                attention, layer = match.group(1), int(match.group(2))
                if found.setdefault(layer, attention) != attention:
                    raise ValueError(f"folder: layer {layer} has two attention modules, {found[layer]} and {attention}")
    return found


def _list_in_index(folder: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """List the scales file's tensors in the folder's index, when it has one."""
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        return
    index = _read_json(index_path, "folder")
    weight_map = {name: file for name, file in index.get("weight_map", {}).items() if file != SCALES_FILE}
    index["weight_map"] = {**weight_map, **{name: SCALES_FILE for name in tensors}}
    _write_json(index_path, index)


def _read_json(path: Path, argname: str) -> dict:
    if not path.is_file():
        raise ValueError(f"{argname}: {path} does not exist")
    return json.loads(path.read_text())


def _write_json(path: Path, data: Mapping) -> None:
    """As transformers writes config.json and the index: sorted keys, indent 2."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
