"""Paged decode attention (fp4kv.decode_attention), one new token per sequence, beside FlashInfer's
paged decode over BF16 and FP8 caches of the same shape (PyTorch SDPA where FlashInfer rejects
the shape) and, for NVFP4, FlashInfer's own NVFP4-KV decode over the same cache bytes: a
Llama-3-8B grid of batches x contexts, and one row per model shape."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import Backend, get_kv_recipe
from ..ops.backends import select_backend
from ..ops.paged_kv import PagedKV
from ..testing.paged import (FLASHINFER_NVFP4_RECIPES, flashinfer_nvfp4_attention, flashinfer_paged_attention,
                             global_scales, random_cache, shuffled_page_table)
from .common import PeerRatios, cell, has_flashinfer, print_notes, ratio, timer, try_time, us
from .shapes import GRID_SHAPE, MODEL_SHAPES, DecodeShape


@dataclass
class DecodeRow(PeerRatios):
    """Paged decode attention, Hq query heads over Hkv KV heads, one token per sequence."""

    shape: str  # a MODEL_SHAPES name, or str(DecodeShape) for the grid
    recipe: str
    batch: int
    context: int
    fp4_us: float
    fp4_gb_per_s: float  # FP4 cache bytes read per second
    bf16_us: float | None = None
    flashinfer_fp8_us: float | None = None
    # What the BF16 time is: FlashInfer's paged decode, or SDPA where that decode rejects the shape.
    bf16_kernel: str = "flashinfer"
    # Our Triton kernel on the same call, where the op ran the Gluon one (SM90): the gain in one run.
    triton_kernel_us: float | None = None
    # FlashInfer's own NVFP4-KV decode (tensor cores) over the same cache bytes; nvfp4 rows only.
    flashinfer_nvfp4_us: float | None = None
    notes: str = ""  # why a FlashInfer column is empty

    @property
    def x_bf16(self) -> float | None:
        return ratio(self.fp4_us, self.bf16_us)


def _fp4_decode_problem(recipe, batch, context, shape: DecodeShape, device) -> tuple[torch.Tensor, PagedKV]:
    """(q [B, Hq, D], a paged cache of random (finite) FP4 bytes, every sequence at full context)."""
    hq, hkv, d, page = shape
    pages_per_seq = -(-context // page)  # whole pages holding every position, as the FlashInfer peer's
    cache = random_cache(recipe, batch * pages_per_seq * page, hkv, d, device)
    kv = PagedKV(*cache, shuffled_page_table(batch, pages_per_seq, device),
                 torch.full((batch,), context, dtype=torch.int32, device=device), page,
                 *global_scales(recipe, 0.01, device))
    return torch.randn(batch, hq, d, dtype=torch.bfloat16, device=device), kv


def _fp4_decode_time(recipe, q, kv: PagedKV, device, timed) -> tuple[float, float | None]:
    """Our decode: (seconds, seconds of the Triton kernel on the same call where the op runs the
    Gluon one, else None)."""
    d = q.shape[-1]
    out = torch.empty_like(q)
    seconds = timed(lambda: torch.ops.fp4kv.decode_attention(out, q, *kv.op_args(recipe, d ** -0.5)))
    triton_seconds = None
    kv_recipe = get_kv_recipe(recipe)
    if device.type == "cuda" and select_backend("decode_attention", kv_recipe, device, q.dtype) is Backend.TRITON:
        from ..ops import decode, triton_decode

        if decode.hopper_kernel(q, kv, kv_recipe):
            triton_seconds = timed(lambda: triton_decode.decode_attention(out, q, kv, kv_recipe, d ** -0.5))
    return seconds, triton_seconds


def _flashinfer_decode_time(kv_dtype, batch, context, shape: DecodeShape, device, timed, notes) -> float | None:
    """FlashInfer's paged decode on a BF16 or FP8 cache of the same shape; None where it cannot run."""
    hq, hkv, d, page = shape
    q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device=device)
    return try_time(timed, lambda: flashinfer_paged_attention(q, context, hkv, page, kv_dtype), notes,
                    f"FlashInfer decode {shape} {kv_dtype}")


def _sdpa_decode_time(batch, context, shape: DecodeShape, device, timed) -> float:
    """PyTorch SDPA over a contiguous BF16 cache: the BF16 baseline where FlashInfer's decode cannot run."""
    hq, hkv, d, _ = shape
    k, v = (torch.randn(batch, hkv, context, d, dtype=torch.bfloat16, device=device) for _ in "kv")
    q = torch.randn(batch, hq, 1, d, dtype=torch.bfloat16, device=device)
    return timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def _decode_rows(name, shape: DecodeShape, batch, context, recipes, device, timed) -> list[DecodeRow]:
    notes: list[str] = []
    bf16 = fp8 = None
    flashinfer_here = has_flashinfer(device)
    if flashinfer_here:
        bf16 = _flashinfer_decode_time(torch.bfloat16, batch, context, shape, device, timed, notes)
        fp8 = _flashinfer_decode_time(torch.float8_e4m3fn, batch, context, shape, device, timed, notes)
    bf16_kernel = "flashinfer"
    if bf16 is None and device.type == "cuda":
        bf16, bf16_kernel = _sdpa_decode_time(batch, context, shape, device, timed), "sdpa"
    rows = []
    for recipe in recipes:
        q, kv = _fp4_decode_problem(recipe, batch, context, shape, device)
        seconds, triton_seconds = _fp4_decode_time(recipe, q, kv, device, timed)
        flashinfer_nvfp4 = None
        if flashinfer_here and recipe in FLASHINFER_NVFP4_RECIPES:
            flashinfer_nvfp4 = try_time(timed, lambda: flashinfer_nvfp4_attention(q, kv), notes,
                                        f"FlashInfer NVFP4 decode {shape}")
        nbytes = sum(t.numel() for t in (kv.k_data, kv.k_scales, kv.v_data, kv.v_scales))
        rows.append(DecodeRow(name, recipe, batch, context, seconds * 1e6, nbytes / seconds / 1e9, us(bf16), us(fp8),
                              bf16_kernel, us(triton_seconds), us(flashinfer_nvfp4)))
    for row in rows:  # what could not run at this shape, said once for all its rows
        row.notes = "; ".join(notes)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the largest caches take tens of GB
    return rows


def run_decode(batches, contexts, recipes, device: torch.device, shape_names=()) -> list[DecodeRow]:
    """The Llama-3-8B grid (batches x contexts), then one row per MODEL_SHAPES name."""
    timed = timer(device)
    rows = []
    for batch in batches:
        for context in contexts:
            rows += _decode_rows(str(GRID_SHAPE), GRID_SHAPE, batch, context, recipes, device, timed)
    for name in shape_names:
        shape, batch, context = MODEL_SHAPES[name]
        rows += _decode_rows(name, shape, batch, context, recipes, device, timed)
    return rows


def print_decode_table(rows: list[DecodeRow]) -> None:
    print("\ndecode attention (shape: Hq/Hkv/D/page or a model's name, see --decode-shapes; FP4 read directly"
          " vs FlashInfer paged decode, BF16 'sdpa*' where FlashInfer's decode rejects the shape;"
          " 'FI NVFP4 us': FlashInfer's own NVFP4-KV decode over the same bytes, nvfp4 rows;"
          " 'Triton us': our Triton kernel where the op ran the Gluon one)")
    print(f"{'shape':<16}{'recipe':<14}{'batch':>6}{'context':>9}{'FP4 us':>10}{'GB/s':>8}{'BF16 us':>10}"
          f"{'FP8 us':>10}{'FP4/BF16':>10}{'FP4/FP8':>9}{'FI NVFP4 us':>13}{'FP4/FI-NVFP4':>14}{'Triton us':>11}")
    for r in rows:
        bf16 = cell(r.bf16_us, '.1f') + ("*" if r.bf16_kernel == "sdpa" else "")
        print(f"{r.shape:<16}{r.recipe:<14}{r.batch:>6}{r.context:>9}{r.fp4_us:>10.1f}{r.fp4_gb_per_s:>8.0f}"
              f"{bf16:>10}{cell(r.flashinfer_fp8_us, '10.1f'):>10}"
              f"{cell(r.x_bf16, '.3f'):>10}{cell(r.x_fp8, '.3f'):>9}{cell(r.flashinfer_nvfp4_us, '.1f'):>13}"
              f"{cell(r.x_flashinfer_nvfp4, '.3f'):>14}{cell(r.triton_kernel_us, '11.1f'):>11}")
    print_notes(rows)
