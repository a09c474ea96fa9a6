"""Extend attention (fp4kv.extend_attention): several new tokens per sequence over a cached prefix,
beside dequantizing the whole FP4 context first, FlashInfer's paged prefill on BF16 and FP8 caches
and, for NVFP4, FlashInfer's own NVFP4-KV prefill over the same cache bytes: speculative
verification (a few new tokens), chunked prefill (hundreds) and prefill (no prefix), each at the
Llama-3-8B heads or a model's (`@SHAPE`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..ops.paged_kv import PagedKV
from ..testing.paged import (FLASHINFER_NVFP4_RECIPES, flashinfer_nvfp4_attention, flashinfer_paged_attention,
                             global_scales, random_cache, shuffled_page_table)
from .common import PeerRatios, cell, has_flashinfer, print_notes, ratio, timer, try_time, us
from .shapes import MODEL_SHAPES, DecodeShape, attention_shape, shape_label


@dataclass
class ExtendRow(PeerRatios):
    """Several new tokens per sequence over a cached prefix (fp4kv.extend_attention), beside
    dequantizing the whole FP4 context first and FlashInfer's paged prefill on BF16 and FP8 caches.
    Times in us; None where that kernel could not run here (notes says why)."""

    recipe: str
    batch: int
    context: int  # cached prefix per sequence
    new: int  # new tokens per sequence (stored in the cache first, then attended causally)
    fp4_us: float
    dequant_attend_us: float | None = None  # gather_dequantize to BF16, then the best BF16 kernel (SDPA without FlashInfer)
    flashinfer_bf16_fa2_us: float | None = None
    flashinfer_bf16_fa3_us: float | None = None
    flashinfer_fp8_us: float | None = None  # backend="auto"
    notes: str = ""
    shape: str = shape_label(None)  # a MODEL_SHAPES name, or str(DecodeShape) for the Llama-3-8B heads
    # FlashInfer's own NVFP4-KV prefill (FA2) over the same cache bytes; nvfp4 rows only.
    flashinfer_nvfp4_us: float | None = None

    @property
    def best_bf16_us(self) -> float | None:
        times = [t for t in (self.flashinfer_bf16_fa2_us, self.flashinfer_bf16_fa3_us) if t]
        return min(times) if times else None

    @property
    def x_bf16(self) -> float | None:
        return ratio(self.fp4_us, self.best_bf16_us)


class ExtendCase(NamedTuple):
    """`batch` sequences of `context` cached tokens plus `new` ones, at the heads and page size of
    the MODEL_SHAPES entry `shape` (None: the Llama-3-8B grid shape)."""

    batch: int
    context: int
    new: int
    shape: str | None = None

    def __str__(self) -> str:
        return f"{self.batch}x{self.context}+{self.new}" + (f"@{self.shape}" if self.shape is not None else "")


def parse_extend_case(text: str) -> ExtendCase:
    """'32x8192+4' -> 32 sequences, 8192 cached tokens and 4 new each, Llama-3-8B heads;
    '16x8192+2@llama3-70b' -> the same at that MODEL_SHAPES entry's heads and page size."""
    case, _, shape = text.partition("@")
    if shape and shape not in MODEL_SHAPES:
        raise argparse.ArgumentTypeError(f"{text!r}: the shape after @ is one of {', '.join(MODEL_SHAPES)}")
    try:
        sizes, new = case.split("+")
        batch, context = sizes.split("x")
        parsed = ExtendCase(int(batch), int(context), int(new), shape or None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an extend case is BATCHxPREFIX+NEW[@SHAPE] (e.g. 32x8192+4 or "
                                         f"16x8192+2@llama3-70b), got {text!r}") from None
    if parsed.batch < 1 or parsed.context < 0 or parsed.new < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: an extend case needs BATCH >= 1, PREFIX >= 0 and NEW >= 1")
    return parsed


class _ExtendProblem:
    """One extend shape: every sequence holds `context` cached tokens plus `new` ones (all in the
    cache), its pages shuffled; q [batch * new, Hq, D]."""

    def __init__(self, batch, context, new, shape: DecodeShape, device):
        hq, hkv, d, page = shape
        self.batch, self.new, self.hq, self.hkv, self.d, self.page, self.device = batch, new, hq, hkv, d, page, device
        self.length = context + new
        self.pages_per_seq = -(-self.length // page)
        self.table = shuffled_page_table(batch, self.pages_per_seq, device)
        self.lens = torch.full((batch,), self.length, dtype=torch.int32, device=device)
        self.cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * new
        self.q = torch.randn(batch * new, hq, d, dtype=torch.bfloat16, device=device)

    def fp4_cache(self, recipe) -> PagedKV:
        cache = random_cache(recipe, self.batch * self.pages_per_seq * self.page, self.hkv, self.d, self.device)
        return PagedKV(*cache, self.table, self.lens, self.page, *global_scales(recipe, 0.01, self.device))

    def all_slots(self) -> torch.Tensor:
        """Every sequence's slots in order, sequence after sequence."""
        slots = (self.table.long()[:, :, None] * self.page + torch.arange(self.page, device=self.device)).flatten(1)
        return slots[:, : self.length].reshape(-1)

    def flashinfer_prefill(self, kv_dtype, backend: str):
        """FlashInfer's causal paged prefill of q over a random cache of kv_dtype: fn()."""
        return flashinfer_paged_attention(self.q, self.length, self.hkv, self.page, kv_dtype, self.cu, backend)

    def sdpa(self, k, v):
        """Causal attention of the new tokens over dequantized K/V [batch * length, Hkv, D] (SDPA)."""
        import torch.nn.functional as F

        q = self.q.view(self.batch, self.new, self.hq, self.d).transpose(1, 2)
        k = k.view(self.batch, self.length, self.hkv, self.d).transpose(1, 2)
        v = v.view(self.batch, self.length, self.hkv, self.d).transpose(1, 2)
        keys = torch.arange(self.length, device=self.device)
        mask = keys[None, :] <= (self.length - self.new + torch.arange(self.new, device=self.device))[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def run_extend(cases: list[ExtendCase], recipes, device: torch.device) -> list[ExtendRow]:
    timed = timer(device)
    flashinfer_here = has_flashinfer(device)
    rows = []
    for batch, context, new, shape_name in cases:
        problem = _ExtendProblem(batch, context, new, attention_shape(shape_name), device)
        d = problem.d
        notes: list[str] = []
        flashinfer_s = {}
        if flashinfer_here:
            for label, kv_dtype, backend in (("BF16 fa2", torch.bfloat16, "fa2"), ("BF16 fa3", torch.bfloat16, "fa3"),
                                             ("FP8 auto", torch.float8_e4m3fn, "auto")):
                flashinfer_s[label] = try_time(timed, lambda: problem.flashinfer_prefill(kv_dtype, backend), notes,
                                               f"FlashInfer {label}")
        else:
            notes.append("FlashInfer does not run here: no FlashInfer rows; dequantize-then-attend uses SDPA")
        best_bf16 = min((flashinfer_s[k] for k in ("BF16 fa2", "BF16 fa3") if flashinfer_s.get(k)), default=None)
        best_backend = None
        if best_bf16:
            best_backend = "fa2" if flashinfer_s.get("BF16 fa2") == best_bf16 else "fa3"
        all_slots = problem.all_slots()
        case_rows = []
        for recipe in recipes:
            kv = problem.fp4_cache(recipe)
            out = torch.empty_like(problem.q)
            seconds = timed(lambda: torch.ops.fp4kv.extend_attention(out, problem.q, problem.cu,
                                                                     *kv.op_args(recipe, d ** -0.5)))

            def dequantize_then_attend():
                def dequantized():
                    k = torch.ops.fp4kv.gather_dequantize(kv.k_data, kv.k_scales, all_slots, recipe, kv.k_global_scale,
                                                          torch.bfloat16)
                    v = torch.ops.fp4kv.gather_dequantize(kv.v_data, kv.v_scales, all_slots, recipe, kv.v_global_scale,
                                                          torch.bfloat16)
                    return k, v

                if best_backend is None:
                    return lambda: problem.sdpa(*dequantized())
                # BF16 workspace in sequence order, padded to whole pages, and the best BF16 kernel over it.
                attend = problem.flashinfer_prefill(torch.bfloat16, best_backend)
                return lambda: (dequantized(), attend())

            dequant_s = try_time(timed, dequantize_then_attend, notes, f"{recipe} dequantize-then-attend")
            flashinfer_nvfp4 = None
            if flashinfer_here and recipe in FLASHINFER_NVFP4_RECIPES:
                flashinfer_nvfp4 = try_time(timed, lambda: flashinfer_nvfp4_attention(problem.q, kv, problem.cu), notes,
                                            "FlashInfer NVFP4 fa2")
            case_rows.append(ExtendRow(recipe, batch, context, new, seconds * 1e6, us(dequant_s),
                                       us(flashinfer_s.get("BF16 fa2")), us(flashinfer_s.get("BF16 fa3")),
                                       us(flashinfer_s.get("FP8 auto")), shape=shape_label(shape_name),
                                       flashinfer_nvfp4_us=us(flashinfer_nvfp4)))
        for row in case_rows:  # what could not run in this case, said once for all its rows
            row.notes = "; ".join(notes)
        rows += case_rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_extend_table(rows: list[ExtendRow]) -> None:
    print("\nextend attention: new tokens per sequence over a cached prefix (case BATCHxPREFIX+NEW at Hq 32 /"
          " Hkv 8 / D 128 / page 16, or at the heads of the --decode-shapes model after @;"
          " FP4 read directly vs dequantize-then-attend and FlashInfer paged prefill, causal;"
          " FP4/BF16 against the faster of fa2 and fa3; 'FI NVFP4 us': FlashInfer's own NVFP4-KV prefill (fa2)"
          " over the same bytes, nvfp4 rows)")
    print(f"{'case':<26}{'recipe':<14}{'FP4 us':>10}{'dequant+attend':>16}{'BF16 fa2':>10}{'BF16 fa3':>10}"
          f"{'FP8 auto':>10}{'FP4/BF16':>10}{'FP4/FP8':>9}{'FI NVFP4 us':>13}{'FP4/FI-NVFP4':>14}")
    for r in rows:
        case = f"{r.batch}x{r.context}+{r.new}" + ("" if r.shape == shape_label(None) else f"@{r.shape}")
        print(f"{case:<26}{r.recipe:<14}{r.fp4_us:>10.1f}{cell(r.dequant_attend_us, '16.1f'):>16}"
              f"{cell(r.flashinfer_bf16_fa2_us, '10.1f'):>10}{cell(r.flashinfer_bf16_fa3_us, '10.1f'):>10}"
              f"{cell(r.flashinfer_fp8_us, '10.1f'):>10}{cell(r.x_bf16, '.3f'):>10}{cell(r.x_fp8, '.3f'):>9}"
              f"{cell(r.flashinfer_nvfp4_us, '.1f'):>13}{cell(r.x_flashinfer_nvfp4, '.3f'):>14}")
    print_notes(rows)
