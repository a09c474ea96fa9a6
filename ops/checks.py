"""Argument checks shared by the real and the fake kernels.

Every op checks all of its arguments before anything is written, and each error names the
argument. The checks read only metadata (dtype, shape, device), so they also run on fake tensors
while torch.compile traces, and never synchronize with the device.

What the checks cannot see, because it lives in tensor values on the device, every backend
handles by one rule instead (README, "Input contract"): slots outside the cache are skipped on
store and read as zeros; page ids outside the cache read as zero keys and values; duplicate slots
in one store: the last token wins; a global scale that is not finite and > 0 gives NaN.
With `TORCH_FP4KV_DEBUG=1` the real kernels also check the index values (slots, page ids,
seq_lens, cu_seqlens_q; debug.py) and raise a ValueError naming the first bad one before anything
is written: a host sync at every call, what an engine author turns on while integrating.
Layouts: activations, `loc`, `seq_lens`, `block_table` and the packed inputs of dequantize and
gather_dequantize may have any strides; cache buffers that are written (quantize_and_store) or read
by decode_attention must be contiguous.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .formats import FP4Format, KVRecipe, ScaleRule, get_format, get_kv_recipe
from .paged_kv import PagedKV

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
OUTPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
LOC_DTYPES = (torch.int32, torch.int64)


class ArgNames(NamedTuple):
    """What the checks call the arguments an adapter renames (the SGLang port: `k_buffer` for
    k_data, ...), so that its errors name the arguments its caller passed. The defaults are the
    ops' own names."""

    k_data: str = "k_data"
    v_data: str = "v_data"
    k_scales: str = "k_scales"
    v_scales: str = "v_scales"
    k: str = "k"
    v: str = "v"
    k_global_scale: str = "k_global_scale"
    v_global_scale: str = "v_global_scale"
    x: str = "x"
    data: str = "data"
    scales: str = "scales"


OP_NAMES = ArgNames()


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def dtype_in(x: torch.Tensor, name: str, allowed) -> None:
    if x.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {_names(allowed)}; got {_names([x.dtype])}")


def rank(x: torch.Tensor, name: str, expected: int, layout: str) -> None:
    if x.dim() != expected:
        raise ValueError(f"{name} must be {expected}-D {layout}; got shape {tuple(x.shape)}")


def same_device(x: torch.Tensor, name: str, reference: torch.Tensor, reference_name: str) -> None:
    if x.device != reference.device:
        raise ValueError(f"{name} is on {x.device} but {reference_name} is on {reference.device}")


def count(value, name: str, minimum: int) -> None:
    """A count that sizes something (slots, heads, layers, tokens): an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def head_dim(d: int, fmt: FP4Format, name: str) -> None:
    if d % fmt.head_dim_multiple() != 0 or d == 0:
        raise ValueError(
            f"{name}: head_dim {d} is not a positive multiple of the {fmt.name} block size {fmt.head_dim_multiple()}"
        )


def recipe(value) -> FP4Format:
    return get_format(value, "recipe")


def kv_recipe(value) -> KVRecipe:
    return get_kv_recipe(value, "recipe")


def global_scale(g, name: str, fmt: FP4Format, reference: torch.Tensor, reference_name: str) -> None:
    """A global scale is a float32 device tensor of one element, never a Python number.

    A Python float would be baked into compiled graphs as a constant and force recompiles.
    """
    if g is None:
        return
    if not isinstance(g, torch.Tensor):
        raise TypeError(
            f"{name} must be a float32 tensor of shape [1] on the data's device (got {type(g).__name__}); "
            "a Python number would be baked into compiled graphs"
        )
    if not fmt.has_global_scale:
        raise ValueError(f"{name}: recipe {fmt.name!r} has no global scale; pass None")
    dtype_in(g, name, (torch.float32,))
    if g.shape not in ((1,), ()):
        raise ValueError(f"{name} must have shape [1] (or be 0-D); got shape {tuple(g.shape)}")
    same_device(g, name, reference, reference_name)


def activation(x, name: str, fmt: FP4Format) -> None:
    tensor(x, name)
    dtype_in(x, name, ACTIVATION_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (head_dim last)")
    head_dim(x.shape[-1], fmt, name)


def packed_data(data, fmt: FP4Format, data_name: str) -> None:
    """data [..., D/2] (FP4) or [..., D] (FP8) uint8, for a valid head_dim D."""
    tensor(data, data_name)
    dtype_in(data, data_name, (torch.uint8,))
    if data.dim() < 1:
        raise ValueError(f"{data_name} must have at least one dimension (packed head_dim last)")
    head_dim(fmt.head_dim_of(data.shape[-1]), fmt, data_name)


def packed(data, scales, fmt: FP4Format, data_name: str, scales_name: str) -> None:
    """data [..., D/2] (FP4) or [..., D] (FP8) uint8, and scales [..., D/block] uint8 (or
    float8_e4m3fn for nvfp4; [..., 0] for FP8). The data is checked first: scales are judged
    against it."""
    packed_data(data, fmt, data_name)
    tensor(scales, scales_name)
    scale_dtypes = (torch.uint8, torch.float8_e4m3fn) if fmt.scale_rule is ScaleRule.E4M3_AMAX_OVER_6G else (torch.uint8,)
    dtype_in(scales, scales_name, scale_dtypes)
    same_device(scales, scales_name, data, data_name)
    expected = (*data.shape[:-1], fmt.scales_width(fmt.head_dim_of(data.shape[-1])))
    if tuple(scales.shape) != expected:
        raise ValueError(f"{scales_name} must have shape {expected} to match {data_name}; got {tuple(scales.shape)}")


def output_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"dtype must be one of {_names(OUTPUT_DTYPES)}; got {_names([dtype])}")


def loc(loc_, reference: torch.Tensor, reference_name: str, num_tokens: int | None = None) -> None:
    tensor(loc_, "loc")
    dtype_in(loc_, "loc", LOC_DTYPES)
    rank(loc_, "loc", 1, "[T] slot indices")
    if num_tokens is not None and loc_.shape[0] != num_tokens:
        raise ValueError(f"loc has {loc_.shape[0]} slots but there are {num_tokens} tokens")
    same_device(loc_, "loc", reference, reference_name)


def cache_data(data, fmt: FP4Format, data_name: str) -> None:
    """A cache's data buffer [slots, H, D/2] (FP8: [slots, H, D]) uint8."""
    tensor(data, data_name)
    rank(data, data_name, 3, f"[slots, H, {fmt.data_layout}]")
    packed_data(data, fmt, data_name)


def cache(data, scales, fmt: FP4Format, data_name: str, scales_name: str) -> None:
    """A cache is data [slots, H, D/2] (FP8: [slots, H, D]) and scales [slots, H, D/block], contiguous."""
    cache_data(data, fmt, data_name)
    packed(data, scales, fmt, data_name, scales_name)
    for x, name in ((data, data_name), (scales, scales_name)):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous (cache buffers are written in place)")


def cache_tokens(x, name: str, data: torch.Tensor, data_name: str, fmt: FP4Format) -> None:
    """x [..., H, D], an activation of the heads and head_dim that a checked cache data buffer
    [slots, H, D/2] (FP8: [slots, H, D]) holds, on its device."""
    activation(x, name, fmt)
    if x.dim() < 2:
        raise ValueError(f"{name} must be [..., H, D]; got shape {tuple(x.shape)}")
    expected = (x.shape[-2], fmt.data_width(x.shape[-1]))
    if tuple(data.shape[1:]) != expected:
        raise ValueError(f"{name} of [H, D] = {tuple(x.shape[-2:])} does not fit {data_name} of "
                         f"[H, {fmt.data_layout}] = {tuple(data.shape[1:])} ({fmt.name} needs {expected})")
    same_device(x, name, data, data_name)


def kv_cache(k_data, k_scales, v_data, v_scales, kv: KVRecipe, names: ArgNames = OP_NAMES) -> None:
    """One layer's K and V caches: each valid in its format, the same slots, heads and head_dim,
    all on k_data's device."""
    cache(k_data, k_scales, kv.k, names.k_data, names.k_scales)
    cache(v_data, v_scales, kv.v, names.v_data, names.v_scales)
    for other, name in ((v_data, names.v_data), (k_scales, names.k_scales), (v_scales, names.v_scales)):
        same_device(other, name, k_data, names.k_data)
    k_shape = (*k_data.shape[:2], kv.k.head_dim_of(k_data.shape[2]))
    v_shape = (*v_data.shape[:2], kv.v.head_dim_of(v_data.shape[2]))
    if v_shape != k_shape:
        raise ValueError(f"{names.v_data} has shape {tuple(v_data.shape)} but {names.k_data} has "
                         f"{tuple(k_data.shape)}: [slots, H, D] = {v_shape} in {kv.v.name} against {k_shape} in "
                         f"{kv.k.name}")


# ---- one check per op -------------------------------------------------------------------------


def quantize_args(x, recipe_, g, names: ArgNames = OP_NAMES) -> FP4Format:
    fmt = recipe(recipe_)
    activation(x, names.x, fmt)
    global_scale(g, "global_scale", fmt, x, names.x)
    return fmt


def dequantize_args(data, scales, recipe_, g, dtype, names: ArgNames = OP_NAMES) -> FP4Format:
    fmt = recipe(recipe_)
    packed(data, scales, fmt, names.data, names.scales)
    global_scale(g, "global_scale", fmt, data, names.data)
    output_dtype(dtype)
    return fmt


def store_data_args(k_data, v_data, k, v, kv: KVRecipe, names: ArgNames = OP_NAMES) -> None:
    """k, v [T, H, D] and the data buffers they go into, each buffer judged by its tensor and
    before any scales are: a buffer that does not fit is named, not the scales that match it."""
    for x, name, fmt in ((k, names.k, kv.k), (v, names.v, kv.v)):
        activation(x, name, fmt)
        rank(x, name, 3, "[T, H, D]")
    if v.shape != k.shape:
        raise ValueError(f"{names.v} has shape {tuple(v.shape)} but {names.k} has {tuple(k.shape)}")
    if v.dtype != k.dtype:
        raise TypeError(f"{names.v} has dtype {_names([v.dtype])} but {names.k} has {_names([k.dtype])}; "
                        "pass both in one dtype")
    for data, data_name, x, name, fmt in ((k_data, names.k_data, k, names.k, kv.k),
                                          (v_data, names.v_data, v, names.v, kv.v)):
        cache_data(data, fmt, data_name)
        cache_tokens(x, name, data, data_name, fmt)
    if v_data.shape[0] != k_data.shape[0]:
        raise ValueError(f"{names.v_data} has shape {tuple(v_data.shape)} but {names.k_data} has "
                         f"{tuple(k_data.shape)}: {v_data.shape[0]} slots against {k_data.shape[0]}")


def quantize_and_store_args(k_data, v_data, k_scales, v_scales, loc_, k, v, recipe_, kg, vg,
                            names: ArgNames = OP_NAMES) -> KVRecipe:
    kv = kv_recipe(recipe_)
    store_data_args(k_data, v_data, k, v, kv, names)
    kv_cache(k_data, k_scales, v_data, v_scales, kv, names)
    loc(loc_, k_data, names.k_data, num_tokens=k.shape[0])
    global_scale(kg, names.k_global_scale, kv.k, k_data, names.k_data)
    global_scale(vg, names.v_global_scale, kv.v, k_data, names.k_data)
    return kv


def gather_dequantize_args(data, scales, loc_, recipe_, g, dtype) -> FP4Format:
    fmt = recipe(recipe_)
    tensor(data, "data")
    rank(data, "data", 3, f"[slots, H, {fmt.data_layout}]")
    packed(data, scales, fmt, "data", "scales")
    loc(loc_, data, "data")
    global_scale(g, "global_scale", fmt, data, "data")
    output_dtype(dtype)
    return fmt


DECODE_HEAD_DIMS = (64, 128, 256)
MAX_PAGE_SIZE = 128


def _paged_attention_args(out, q, kv: PagedKV, recipe_, sm_scale, q_layout: str) -> KVRecipe:
    """What decode_attention and extend_attention check alike: q (q_layout) against the paged K/V
    cache, block_table's and seq_lens' types, page_size, sm_scale, the global scales, and out (q's
    shape, dtype and device, contiguous). How many entries the metadata has is each op's check."""
    k_data, k_scales, v_data, v_scales, block_table, seq_lens, page_size, kg, vg = kv
    fmt = kv_recipe(recipe_)
    tensor(q, "q")
    dtype_in(q, "q", (torch.bfloat16, torch.float16))
    rank(q, "q", 3, q_layout)
    kv_cache(k_data, k_scales, v_data, v_scales, fmt)
    same_device(k_data, "k_data", q, "q")
    hq, d = q.shape[1], q.shape[2]
    hkv = k_data.shape[1]
    if d not in DECODE_HEAD_DIMS:
        raise ValueError(f"q: head_dim {d} is not one of {DECODE_HEAD_DIMS}")
    if fmt.k.head_dim_of(k_data.shape[2]) != d:
        raise ValueError(f"k_data holds head_dim {fmt.k.head_dim_of(k_data.shape[2])} ({fmt.k.name}) but q has {d}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q has {hq} heads, not a multiple of the cache's {hkv} KV heads")
    for x, name, dims, layout in ((block_table, "block_table", 2, "[B, max_pages]"), (seq_lens, "seq_lens", 1, "[B]")):
        tensor(x, name)
        dtype_in(x, name, (torch.int32,))
        rank(x, name, dims, layout)
        same_device(x, name, q, "q")
    if not isinstance(page_size, (int, torch.SymInt)) or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be an int in [1, {MAX_PAGE_SIZE}]; got {page_size!r}")
    if k_data.shape[0] % page_size:
        raise ValueError(f"k_data has {k_data.shape[0]} slots, not a whole number of pages of {page_size}")
    if not isinstance(sm_scale, float):
        raise TypeError(f"sm_scale must be a float, got {type(sm_scale).__name__}")
    global_scale(kg, "k_global_scale", fmt.k, q, "q")
    global_scale(vg, "v_global_scale", fmt.v, q, "q")
    tensor(out, "out")
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}; "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    return fmt


def decode_attention_args(out, q, kv: PagedKV, recipe_, sm_scale, lse=None) -> KVRecipe:
    """q [B, Hq, D]: one token per sequence, so block_table and seq_lens have B rows; lse, when
    given, [B, Hq] float32."""
    fmt = _paged_attention_args(out, q, kv, recipe_, sm_scale, "[B, Hq, D]")
    batch = q.shape[0]
    for x, name in ((kv.block_table, "block_table"), (kv.seq_lens, "seq_lens")):
        if x.shape[0] != batch:
            raise ValueError(f"{name} has {x.shape[0]} rows but q has batch {batch}")
    if lse is not None:
        tensor(lse, "lse")
        dtype_in(lse, "lse", (torch.float32,))
        if lse.shape != q.shape[:2] or lse.device != q.device:
            raise ValueError(f"lse must be a float32 tensor of shape {tuple(q.shape[:2])} on {q.device}; "
                             f"got {tuple(lse.shape)} on {lse.device}")
        if not lse.is_contiguous():
            raise ValueError("lse must be contiguous")
    return fmt


def extend_attention_args(out, q, cu_seqlens_q, kv: PagedKV, recipe_, sm_scale) -> KVRecipe:
    """q [T, Hq, D] holds every sequence's new tokens, cu_seqlens_q [B+1] int32 (any stride) the
    offsets of each sequence's rows in q; block_table's B rows set B.

    How the offsets relate to T is device data: extend_attention gives every value a result
    instead of checking it (its docstring, rows and positions)."""
    fmt = _paged_attention_args(out, q, kv, recipe_, sm_scale, "[T, Hq, D]")
    tensor(cu_seqlens_q, "cu_seqlens_q")
    dtype_in(cu_seqlens_q, "cu_seqlens_q", (torch.int32,))
    rank(cu_seqlens_q, "cu_seqlens_q", 1, "[B+1]")
    same_device(cu_seqlens_q, "cu_seqlens_q", q, "q")
    batch = kv.block_table.shape[0]
    for x, name, rows, layout in ((kv.seq_lens, "seq_lens", batch, "[B]"),
                                  (cu_seqlens_q, "cu_seqlens_q", batch + 1, "[B+1]")):
        if x.shape[0] != rows:
            raise ValueError(f"{name} has {x.shape[0]} entries but block_table has {batch} rows (needs {layout})")
    return fmt
