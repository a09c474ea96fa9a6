"""Argument checks shared by the real and the fake kernels.

Every op checks all of its arguments before anything is written, and each error names the
argument. The checks read only metadata (dtype, shape, device), so they also run on fake tensors
while torch.compile traces, and never synchronize with the device.

What the checks cannot see, because it lives in tensor values on the device, every backend
handles by one rule instead (README, "Input contract"): slots outside the cache are skipped on
store and read as zeros; page ids outside the cache read as zero keys and values; duplicate slots
in one store: the last token wins; a global scale that is not finite and > 0 gives NaN.
Layouts: activations, `loc`, `seq_lens`, `block_table` and the packed inputs of dequantize and
gather_dequantize may have any strides; cache buffers that are written (quantize_and_store) or read
by decode_attention must be contiguous.
"""

from __future__ import annotations

import torch

from .formats import FP4Format, ScaleRule, get_format
from .paged_kv import PagedKV

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
OUTPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
LOC_DTYPES = (torch.int32, torch.int64)


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


def head_dim(d: int, fmt: FP4Format, name: str) -> None:
    if d % fmt.block_size != 0 or d == 0:
        raise ValueError(
            f"{name}: head_dim {d} is not a positive multiple of the {fmt.name} block size {fmt.block_size}"
        )


def recipe(value) -> FP4Format:
    return get_format(value, "recipe")


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


def packed(data, scales, fmt: FP4Format, data_name: str, scales_name: str) -> None:
    """data [..., D/2] uint8 and scales [..., D/block] uint8 (or float8_e4m3fn for nvfp4)."""
    tensor(data, data_name)
    tensor(scales, scales_name)
    dtype_in(data, data_name, (torch.uint8,))
    scale_dtypes = (torch.uint8, torch.float8_e4m3fn) if fmt.scale_rule is ScaleRule.E4M3_AMAX_OVER_6G else (torch.uint8,)
    dtype_in(scales, scales_name, scale_dtypes)
    if data.dim() < 1:
        raise ValueError(f"{data_name} must have at least one dimension (packed head_dim last)")
    same_device(scales, scales_name, data, data_name)
    d = data.shape[-1] * 2
    head_dim(d, fmt, data_name)
    expected = (*data.shape[:-1], d // fmt.block_size)
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


def cache(data, scales, fmt: FP4Format, prefix: str) -> None:
    """A cache is data [slots, H, D/2] and scales [slots, H, D/block], contiguous."""
    data_name, scales_name = f"{prefix}_data", f"{prefix}_scales"
    tensor(data, data_name)
    rank(data, data_name, 3, "[slots, H, D/2]")
    packed(data, scales, fmt, data_name, scales_name)
    for x, name in ((data, data_name), (scales, scales_name)):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous (cache buffers are written in place)")


def kv_cache(k_data, k_scales, v_data, v_scales, fmt: FP4Format) -> None:
    """One layer's K and V caches: each valid, both alike, all on k_data's device."""
    cache(k_data, k_scales, fmt, "k")
    cache(v_data, v_scales, fmt, "v")
    for other, name in ((v_data, "v_data"), (k_scales, "k_scales"), (v_scales, "v_scales")):
        same_device(other, name, k_data, "k_data")
    if v_data.shape != k_data.shape:
        raise ValueError(f"v_data has shape {tuple(v_data.shape)} but k_data has {tuple(k_data.shape)}")


# ---- one check per op -------------------------------------------------------------------------


def quantize_args(x, recipe_, g) -> FP4Format:
    fmt = recipe(recipe_)
    activation(x, "x", fmt)
    global_scale(g, "global_scale", fmt, x, "x")
    return fmt


def dequantize_args(data, scales, recipe_, g, dtype) -> FP4Format:
    fmt = recipe(recipe_)
    packed(data, scales, fmt, "data", "scales")
    global_scale(g, "global_scale", fmt, data, "data")
    output_dtype(dtype)
    return fmt


def quantize_and_store_args(k_data, v_data, k_scales, v_scales, loc_, k, v, recipe_, kg, vg) -> FP4Format:
    fmt = recipe(recipe_)
    kv_cache(k_data, k_scales, v_data, v_scales, fmt)
    for x, name in ((k, "k"), (v, "v")):
        activation(x, name, fmt)
        rank(x, name, 3, "[T, H, D]")
        same_device(x, name, k_data, "k_data")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}")
    if v.dtype != k.dtype:
        raise TypeError(f"v has dtype {_names([v.dtype])} but k has {_names([k.dtype])}; pass both in one dtype")
    expected = (k.shape[1], k.shape[2] // 2)
    if tuple(k_data.shape[1:]) != expected:
        raise ValueError(f"k_data has [H, D/2] = {tuple(k_data.shape[1:])} but k needs {expected}")
    loc(loc_, k_data, "k_data", num_tokens=k.shape[0])
    global_scale(kg, "k_global_scale", fmt, k_data, "k_data")
    global_scale(vg, "v_global_scale", fmt, k_data, "k_data")
    return fmt


def gather_dequantize_args(data, scales, loc_, recipe_, g, dtype) -> FP4Format:
    fmt = recipe(recipe_)
    tensor(data, "data")
    rank(data, "data", 3, "[slots, H, D/2]")
    packed(data, scales, fmt, "data", "scales")
    loc(loc_, data, "data")
    global_scale(g, "global_scale", fmt, data, "data")
    output_dtype(dtype)
    return fmt


DECODE_HEAD_DIMS = (64, 128, 256)
MAX_PAGE_SIZE = 128


def decode_attention_args(out, q, kv: PagedKV, recipe_, sm_scale, lse=None) -> FP4Format:
    k_data, k_scales, v_data, v_scales, block_table, seq_lens, page_size, kg, vg = kv
    fmt = recipe(recipe_)
    tensor(q, "q")
    dtype_in(q, "q", (torch.bfloat16, torch.float16))
    rank(q, "q", 3, "[B, Hq, D]")
    kv_cache(k_data, k_scales, v_data, v_scales, fmt)
    same_device(k_data, "k_data", q, "q")
    batch, hq, d = q.shape
    hkv = k_data.shape[1]
    if d not in DECODE_HEAD_DIMS:
        raise ValueError(f"q: head_dim {d} is not one of {DECODE_HEAD_DIMS}")
    if k_data.shape[2] * 2 != d:
        raise ValueError(f"k_data holds head_dim {k_data.shape[2] * 2} but q has {d}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q has {hq} heads, not a multiple of the cache's {hkv} KV heads")
    tensor(block_table, "block_table")
    dtype_in(block_table, "block_table", (torch.int32,))
    rank(block_table, "block_table", 2, "[B, max_pages]")
    tensor(seq_lens, "seq_lens")
    dtype_in(seq_lens, "seq_lens", (torch.int32,))
    rank(seq_lens, "seq_lens", 1, "[B]")
    for x, name in ((block_table, "block_table"), (seq_lens, "seq_lens")):
        same_device(x, name, q, "q")
        if x.shape[0] != batch:
            raise ValueError(f"{name} has {x.shape[0]} rows but q has batch {batch}")
    if not isinstance(page_size, (int, torch.SymInt)) or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be an int in [1, {MAX_PAGE_SIZE}]; got {page_size!r}")
    if k_data.shape[0] % page_size:
        raise ValueError(f"k_data has {k_data.shape[0]} slots, not a whole number of pages of {page_size}")
    if not isinstance(sm_scale, float):
        raise TypeError(f"sm_scale must be a float, got {type(sm_scale).__name__}")
    global_scale(kg, "k_global_scale", fmt, q, "q")
    global_scale(vg, "v_global_scale", fmt, q, "q")
    tensor(out, "out")
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}; "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if lse is not None:
        tensor(lse, "lse")
        dtype_in(lse, "lse", (torch.float32,))
        if lse.shape != q.shape[:2] or lse.device != q.device:
            raise ValueError(f"lse must be a float32 tensor of shape {tuple(q.shape[:2])} on {q.device}; "
                             f"got {tuple(lse.shape)} on {lse.device}")
        if not lse.is_contiguous():
            raise ValueError("lse must be contiguous")
    return fmt
