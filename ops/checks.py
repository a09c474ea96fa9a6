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

from .formats import Element, FP4Format, KVRecipe, ScaleRule, get_format, get_kv_recipe
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


def check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_dtype(x: torch.Tensor, name: str, allowed) -> None:
    if x.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {_names(allowed)}; got {_names([x.dtype])}")


def check_rank(x: torch.Tensor, name: str, expected: int, layout: str) -> None:
    if x.dim() != expected:
        raise ValueError(f"{name} must be {expected}-D {layout}; got shape {tuple(x.shape)}")


def check_same_device(x: torch.Tensor, name: str, reference: torch.Tensor, reference_name: str) -> None:
    if x.device != reference.device:
        raise ValueError(f"{name} is on {x.device} but {reference_name} is on {reference.device}")


def check_count(value, name: str, minimum: int) -> None:
    """A count that sizes something (slots, heads, layers, tokens): an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_head_dim(d: int, fmt: FP4Format, name: str) -> None:
    if d % fmt.head_dim_multiple() != 0 or d == 0:
        raise ValueError(
            f"{name}: head_dim {d} is not a positive multiple of the {fmt.name} block size {fmt.head_dim_multiple()}"
        )


def check_recipe(value) -> FP4Format:
    return get_format(value, "recipe")


def check_kv_recipe(value) -> KVRecipe:
    return get_kv_recipe(value, "recipe")


def check_global_scale(g, name: str, fmt: FP4Format, reference: torch.Tensor, reference_name: str) -> None:
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
    check_dtype(g, name, (torch.float32,))
    if g.shape not in ((1,), ()):
        raise ValueError(f"{name} must have shape [1] (or be 0-D); got shape {tuple(g.shape)}")
    check_same_device(g, name, reference, reference_name)


def check_activation(x, name: str, fmt: FP4Format) -> None:
    check_tensor(x, name)
    check_dtype(x, name, ACTIVATION_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (head_dim last)")
    check_head_dim(x.shape[-1], fmt, name)


def check_packed_data(data, fmt: FP4Format, data_name: str) -> None:
    """data [..., D/2] (FP4) or [..., D] (FP8) uint8, for a valid head_dim D."""
    check_tensor(data, data_name)
    check_dtype(data, data_name, (torch.uint8,))
    if data.dim() < 1:
        raise ValueError(f"{data_name} must have at least one dimension (packed head_dim last)")
    check_head_dim(fmt.head_dim_of(data.shape[-1]), fmt, data_name)


def check_packed(data, scales, fmt: FP4Format, data_name: str, scales_name: str) -> None:
    """data [..., D/2] (FP4) or [..., D] (FP8) uint8, and scales [..., D/block] uint8 (or
    float8_e4m3fn for nvfp4; [..., 0] for FP8). The data is checked first: scales are judged
    against it."""
    check_packed_data(data, fmt, data_name)
    check_tensor(scales, scales_name)
    scale_dtypes = (torch.uint8, torch.float8_e4m3fn) if fmt.scale_rule is ScaleRule.E4M3_AMAX_OVER_6G else (torch.uint8,)
    check_dtype(scales, scales_name, scale_dtypes)
    check_same_device(scales, scales_name, data, data_name)
    expected = (*data.shape[:-1], fmt.scales_width(fmt.head_dim_of(data.shape[-1])))
    if tuple(scales.shape) != expected:
        raise ValueError(f"{scales_name} must have shape {expected} to match {data_name}; got {tuple(scales.shape)}")


def check_output_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"dtype must be one of {_names(OUTPUT_DTYPES)}; got {_names([dtype])}")


def check_loc(loc, reference: torch.Tensor, reference_name: str, num_tokens: int | None = None) -> None:
    check_tensor(loc, "loc")
    check_dtype(loc, "loc", LOC_DTYPES)
    check_rank(loc, "loc", 1, "[T] slot indices")
    if num_tokens is not None and loc.shape[0] != num_tokens:
        raise ValueError(f"loc has {loc.shape[0]} slots but there are {num_tokens} tokens")
    check_same_device(loc, "loc", reference, reference_name)


def check_cache_data(data, fmt: FP4Format, data_name: str) -> None:
    """A cache's data buffer [slots, H, D/2] (FP8: [slots, H, D]) uint8."""
    check_tensor(data, data_name)
    check_rank(data, data_name, 3, f"[slots, H, {fmt.data_layout}]")
    check_packed_data(data, fmt, data_name)
    # The Triton kernels read packed FP4 rows as 32-bit words and FP8 rows as 16-bit ones, from the
    # buffer's start: a view of a pool that starts between two words cannot be read that way. (Not
    # while torch.compile traces, which cannot trace a storage offset: the op's kernel checks it.)
    if torch.compiler.is_compiling():
        return
    word = 2 if fmt.element is Element.E4M3 else 4
    offset = data.storage_offset() * data.element_size()
    if offset % word:
        raise ValueError(f"{data_name} starts {offset} bytes into its storage, not a multiple of {word} bytes "
                         f"({fmt.name} rows are read as {8 * word}-bit words); views of a pool whole slots in qualify")


def check_cache(data, scales, fmt: FP4Format, data_name: str, scales_name: str) -> None:
    """A cache is data [slots, H, D/2] (FP8: [slots, H, D]) and scales [slots, H, D/block], contiguous."""
    check_cache_data(data, fmt, data_name)
    check_packed(data, scales, fmt, data_name, scales_name)
    for x, name in ((data, data_name), (scales, scales_name)):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous (cache buffers are written in place)")


def check_cache_tokens(x, name: str, data: torch.Tensor, data_name: str, fmt: FP4Format) -> None:
    """x [..., H, D], an activation of the heads and head_dim that a checked cache data buffer
    [slots, H, D/2] (FP8: [slots, H, D]) holds, on its device."""
    check_activation(x, name, fmt)
    if x.dim() < 2:
        raise ValueError(f"{name} must be [..., H, D]; got shape {tuple(x.shape)}")
    expected = (x.shape[-2], fmt.data_width(x.shape[-1]))
    if tuple(data.shape[1:]) != expected:
        raise ValueError(f"{name} of [H, D] = {tuple(x.shape[-2:])} does not fit {data_name} of "
                         f"[H, {fmt.data_layout}] = {tuple(data.shape[1:])} ({fmt.name} needs {expected})")
    check_same_device(x, name, data, data_name)


def check_kv_cache(k_data, k_scales, v_data, v_scales, kv_recipe: KVRecipe, names: ArgNames = OP_NAMES) -> None:
    """One layer's K and V caches: each valid in its format, the same slots, heads and head_dim,
    all on k_data's device."""
    check_cache(k_data, k_scales, kv_recipe.k, names.k_data, names.k_scales)
    check_cache(v_data, v_scales, kv_recipe.v, names.v_data, names.v_scales)
    for other, name in ((v_data, names.v_data), (k_scales, names.k_scales), (v_scales, names.v_scales)):
        check_same_device(other, name, k_data, names.k_data)
    k_shape = (*k_data.shape[:2], kv_recipe.k.head_dim_of(k_data.shape[2]))
    v_shape = (*v_data.shape[:2], kv_recipe.v.head_dim_of(v_data.shape[2]))
    if v_shape != k_shape:
        raise ValueError(f"{names.v_data} has shape {tuple(v_data.shape)} but {names.k_data} has "
                         f"{tuple(k_data.shape)}: [slots, H, D] = {v_shape} in {kv_recipe.v.name} against {k_shape} in "
                         f"{kv_recipe.k.name}")


# ---- one check per op -------------------------------------------------------------------------


def check_quantize_args(x, recipe, g, names: ArgNames = OP_NAMES) -> FP4Format:
    fmt = check_recipe(recipe)
    check_activation(x, names.x, fmt)
    check_global_scale(g, "global_scale", fmt, x, names.x)
    return fmt


def check_dequantize_args(data, scales, recipe, g, dtype, names: ArgNames = OP_NAMES) -> FP4Format:
    fmt = check_recipe(recipe)
    check_packed(data, scales, fmt, names.data, names.scales)
    check_global_scale(g, "global_scale", fmt, data, names.data)
    check_output_dtype(dtype)
    return fmt


def check_store_data_args(k_data, v_data, k, v, kv_recipe: KVRecipe, names: ArgNames = OP_NAMES) -> None:
    """k, v [T, H, D] and the data buffers they go into, each buffer judged by its tensor and
    before any scales are: a buffer that does not fit is named, not the scales that match it."""
    for x, name, fmt in ((k, names.k, kv_recipe.k), (v, names.v, kv_recipe.v)):
        check_activation(x, name, fmt)
        check_rank(x, name, 3, "[T, H, D]")
    if v.shape != k.shape:
        raise ValueError(f"{names.v} has shape {tuple(v.shape)} but {names.k} has {tuple(k.shape)}")
    if v.dtype != k.dtype:
        raise TypeError(f"{names.v} has dtype {_names([v.dtype])} but {names.k} has {_names([k.dtype])}; "
                        "pass both in one dtype")
    for data, data_name, x, name, fmt in ((k_data, names.k_data, k, names.k, kv_recipe.k),
                                          (v_data, names.v_data, v, names.v, kv_recipe.v)):
        check_cache_data(data, fmt, data_name)
        check_cache_tokens(x, name, data, data_name, fmt)
    if v_data.shape[0] != k_data.shape[0]:
        raise ValueError(f"{names.v_data} has shape {tuple(v_data.shape)} but {names.k_data} has "
                         f"{tuple(k_data.shape)}: {v_data.shape[0]} slots against {k_data.shape[0]}")


def check_quantize_and_store_args(k_data, v_data, k_scales, v_scales, loc, k, v, recipe, kg, vg,
                            names: ArgNames = OP_NAMES) -> KVRecipe:
    kv_recipe = check_kv_recipe(recipe)
    check_store_data_args(k_data, v_data, k, v, kv_recipe, names)
    check_kv_cache(k_data, k_scales, v_data, v_scales, kv_recipe, names)
    check_loc(loc, k_data, names.k_data, num_tokens=k.shape[0])
    check_global_scale(kg, names.k_global_scale, kv_recipe.k, k_data, names.k_data)
    check_global_scale(vg, names.v_global_scale, kv_recipe.v, k_data, names.k_data)
    return kv_recipe


def check_gather_dequantize_args(data, scales, loc, recipe, g, dtype) -> FP4Format:
    fmt = check_recipe(recipe)
    check_tensor(data, "data")
    check_rank(data, "data", 3, f"[slots, H, {fmt.data_layout}]")
    check_packed(data, scales, fmt, "data", "scales")
    check_loc(loc, data, "data")
    check_global_scale(g, "global_scale", fmt, data, "data")
    check_output_dtype(dtype)
    return fmt


DECODE_HEAD_DIMS = (64, 128, 256)
MAX_PAGE_SIZE = 128


def check_page_table(block_table, seq_lens, page_size, data, data_name: str, q) -> None:
    """block_table [B, max_pages] and seq_lens [B] int32 (any strides) on q's device, and a
    page_size in [1, MAX_PAGE_SIZE] that divides the cache's slots (data's first axis)."""
    for x, name, dims, layout in ((block_table, "block_table", 2, "[B, max_pages]"), (seq_lens, "seq_lens", 1, "[B]")):
        check_tensor(x, name)
        check_dtype(x, name, (torch.int32,))
        check_rank(x, name, dims, layout)
        check_same_device(x, name, q, "q")
    is_int = isinstance(page_size, (int, torch.SymInt)) and not isinstance(page_size, bool)
    if not is_int or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be an int in [1, {MAX_PAGE_SIZE}]; got {page_size!r}")
    if data.shape[0] % page_size:
        raise ValueError(f"{data_name} has {data.shape[0]} slots, not a whole number of pages of {page_size}")


def check_sm_scale(sm_scale) -> None:
    if not isinstance(sm_scale, float):
        raise TypeError(f"sm_scale must be a float, got {type(sm_scale).__name__}")


def check_lse(lse, q) -> None:
    """lse [B, Hq] float32, contiguous, on q's device (q [B, Hq, ...])."""
    check_tensor(lse, "lse")
    check_dtype(lse, "lse", (torch.float32,))
    if lse.shape != q.shape[:2] or lse.device != q.device:
        raise ValueError(f"lse must be a float32 tensor of shape {tuple(q.shape[:2])} on {q.device}; "
                         f"got {tuple(lse.shape)} on {lse.device}")
    if not lse.is_contiguous():
        raise ValueError("lse must be contiguous")


def check_batch_rows(q, block_table, seq_lens) -> None:
    """One query token per sequence: block_table and seq_lens have q's batch of rows."""
    for x, name in ((block_table, "block_table"), (seq_lens, "seq_lens")):
        if x.shape[0] != q.shape[0]:
            raise ValueError(f"{name} has {x.shape[0]} rows but q has batch {q.shape[0]}")


def _check_paged_attention_args(out, q, kv: PagedKV, recipe, sm_scale, q_layout: str) -> KVRecipe:
    """What decode_attention and extend_attention check alike: q (q_layout) against the paged K/V
    cache, block_table's and seq_lens' types, page_size, sm_scale, the global scales, and out (q's
    shape, dtype and device, contiguous). How many entries the metadata has is each op's check."""
    k_data, k_scales, v_data, v_scales, block_table, seq_lens, page_size, kg, vg = kv
    fmt = check_kv_recipe(recipe)
    check_tensor(q, "q")
    check_dtype(q, "q", (torch.bfloat16, torch.float16))
    check_rank(q, "q", 3, q_layout)
    check_kv_cache(k_data, k_scales, v_data, v_scales, fmt)
    check_same_device(k_data, "k_data", q, "q")
    hq, d = q.shape[1], q.shape[2]
    hkv = k_data.shape[1]
    if d not in DECODE_HEAD_DIMS:
        raise ValueError(f"q: head_dim {d} is not one of {DECODE_HEAD_DIMS}")
    if fmt.k.head_dim_of(k_data.shape[2]) != d:
        raise ValueError(f"k_data holds head_dim {fmt.k.head_dim_of(k_data.shape[2])} ({fmt.k.name}) but q has {d}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q has {hq} heads, not a multiple of the cache's {hkv} KV heads")
    check_page_table(block_table, seq_lens, page_size, k_data, "k_data", q)
    check_sm_scale(sm_scale)
    check_global_scale(kg, "k_global_scale", fmt.k, q, "q")
    check_global_scale(vg, "v_global_scale", fmt.v, q, "q")
    check_tensor(out, "out")
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}; "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    return fmt


def check_decode_attention_args(out, q, kv: PagedKV, recipe, sm_scale, lse=None) -> KVRecipe:
    """q [B, Hq, D]: one token per sequence, so block_table and seq_lens have B rows; lse, when
    given, [B, Hq] float32."""
    fmt = _check_paged_attention_args(out, q, kv, recipe, sm_scale, "[B, Hq, D]")
    check_batch_rows(q, kv.block_table, kv.seq_lens)
    if lse is not None:
        check_lse(lse, q)
    return fmt


def check_extend_attention_args(out, q, cu_seqlens_q, kv: PagedKV, recipe, sm_scale) -> KVRecipe:
    """q [T, Hq, D] holds every sequence's new tokens, cu_seqlens_q [B+1] int32 (any stride) the
    offsets of each sequence's rows in q; block_table's B rows set B.

    How the offsets relate to T is device data: extend_attention gives every value a result
    instead of checking it (its docstring, rows and positions)."""
    fmt = _check_paged_attention_args(out, q, kv, recipe, sm_scale, "[T, Hq, D]")
    check_tensor(cu_seqlens_q, "cu_seqlens_q")
    check_dtype(cu_seqlens_q, "cu_seqlens_q", (torch.int32,))
    check_rank(cu_seqlens_q, "cu_seqlens_q", 1, "[B+1]")
    check_same_device(cu_seqlens_q, "cu_seqlens_q", q, "q")
    batch = kv.block_table.shape[0]
    for x, name, rows, layout in ((kv.seq_lens, "seq_lens", batch, "[B]"),
                                  (cu_seqlens_q, "cu_seqlens_q", batch + 1, "[B+1]")):
        if x.shape[0] != rows:
            raise ValueError(f"{name} has {x.shape[0]} entries but block_table has {batch} rows (needs {layout})")
    return fmt
