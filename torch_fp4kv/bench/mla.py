"""MLA decode (fp4kv.mla_decode_attention) over a paged FP4 latent cache at DeepSeek-V3's shapes
(testing.mla.MLAConfig: 128 query heads, kv_lora_rank 512 + rope 64; page 64), one new token per
sequence, beside FlashInfer's MLA decode (BatchMLAPagedAttentionWrapper) over BF16 and FP8 latent
caches of the same shape on the same page table: the faster of its fa3 and fa2 backends (the two
its "auto" picks between on SM90), and which one that was. Beside each time, the cache's bytes
per token and layer over BF16's 1152 (issue 28: at most 0.33x BF16's bytes, 0.45x its time, and
faster than its FP8 path)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..ops import LATENT_RECIPES
from ..ops.formats import BF16_LATENT_BYTES_PER_TOKEN
from ..ops.paged_latent import PagedLatent
from ..testing.mla import MLAConfig
from ..testing.paged import FLASHINFER_WORKSPACE_BYTES, random_packed, shuffled_page_table
from .common import FP8Ratio, cell, has_flashinfer, print_notes, ratio, timer, try_time, us

SHAPE = MLAConfig()  # DeepSeek-V3: the heads, latent and rope widths, and softmax scale of every row
PAGE_SIZE = 64
FLASHINFER_BACKENDS = ("fa3", "fa2")  # tried in this order; the faster that runs is the row's peer
# FlashInfer's FP8 MLA reads per-tensor scales at run time (its kv-per-tensor mode); the random
# cache is N(0, 1) cast to FP8, so 1.0 is its scale.
_FP8_RUN_SCALES = {"ckv_scale": 1.0, "kpe_scale": 1.0}


class MLACase(NamedTuple):
    """`batch` sequences of `context` cached tokens each, decoding one token."""

    batch: int
    context: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.context}"


def parse_mla_case(text: str) -> MLACase:
    """'32x16384' -> 32 sequences of 16384 cached tokens."""
    try:
        batch, context = text.split("x")
        case = MLACase(int(batch), int(context))
    except ValueError:
        raise argparse.ArgumentTypeError(f"an MLA case is BATCHxCONTEXT (e.g. 32x16384), got {text!r}") from None
    if case.batch < 1 or case.context < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: an MLA case needs BATCH >= 1 and CONTEXT >= 1")
    return case


@dataclass
class MLARow(FP8Ratio):
    """One latent recipe at one case. Times in us; a FlashInfer time is None where neither of its
    backends could run here (notes says why)."""

    recipe: str
    batch: int
    context: int
    fp4_us: float
    fp4_gb_per_s: float  # FP4 cache bytes read per second
    bytes_per_token: int  # one layer: the latent's codes and scales, then k_pe's FP8 bytes
    bf16_us: float | None = None  # FlashInfer's MLA decode over a BF16 cache, its faster backend
    bf16_backend: str | None = None  # which backend gave bf16_us
    flashinfer_fp8_us: float | None = None  # the same over an FP8 E4M3 cache
    fp8_backend: str | None = None
    notes: str = ""

    @property
    def x_bf16(self) -> float | None:
        return ratio(self.fp4_us, self.bf16_us)

    @property
    def x_bf16_bytes(self) -> float:
        return self.bytes_per_token / BF16_LATENT_BYTES_PER_TOKEN


def fastest(seconds: dict[str, float | None]) -> tuple[str | None, float | None]:
    """(backend, seconds) of the fastest backend that ran; (None, None) where none did."""
    ran = {backend: s for backend, s in seconds.items() if s is not None}
    if not ran:
        return None, None
    backend = min(ran, key=ran.get)
    return backend, ran[backend]


def _fp4_cache(recipe: str, table: torch.Tensor, seq_lens: torch.Tensor, device) -> PagedLatent:
    """A paged latent cache of random (finite) bytes in the recipe's formats, global scales 0.01."""
    fmt = LATENT_RECIPES[recipe]
    slots = table.numel() * PAGE_SIZE
    latent_data, latent_scales = random_packed(fmt.latent, slots, 1, SHAPE.kv_lora_rank, device)
    rope_data, _ = random_packed(fmt.rope, slots, 1, SHAPE.qk_rope_head_dim, device)
    latent_g, rope_g = (torch.tensor([0.01], device=device) if f.has_global_scale else None
                        for f in (fmt.latent, fmt.rope))
    return PagedLatent(latent_data, latent_scales, rope_data, table, seq_lens, PAGE_SIZE, latent_g, rope_g)


def _flashinfer_mla_decode(q: torch.Tensor, table: torch.Tensor, seq_lens: torch.Tensor, cache: tuple,
                           backend: str) -> Callable[[], torch.Tensor]:
    """FlashInfer's MLA decode of q [B, Hq, R + P] over `cache` (ckv [pages, page, R], kpe
    [pages, page, P], BF16 or FP8) through `table` [B, pages] (every page in use), planned here on
    `backend`; returns fn() that runs it. FlashInfer's own errors propagate."""
    import flashinfer

    ckv, kpe = cache
    batch, pages_per_seq = table.shape
    device = q.device
    metadata = flashinfer.mla.MLAPlanMetadata.csr(
        qo_indptr=torch.arange(batch + 1, dtype=torch.int32, device=device),
        kv_indptr=torch.arange(batch + 1, dtype=torch.int32, device=device) * pages_per_seq,
        kv_indices=table.flatten(), kv_len_arr=seq_lens)
    workspace = torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(workspace, backend=backend)
    wrapper.plan(metadata=metadata, num_heads=q.shape[1], head_dim_ckv=ckv.shape[-1], head_dim_kpe=kpe.shape[-1],
                 page_size=ckv.shape[1], causal=False, sm_scale=SHAPE.sm_scale, q_data_type=q.dtype,
                 kv_data_type=ckv.dtype, query_layout="split", kv_cache_layout="split")
    q_nope, q_pe = (part.contiguous() for part in q.split((ckv.shape[-1], kpe.shape[-1]), -1))
    out = torch.empty_like(q_nope)
    scales = _FP8_RUN_SCALES if ckv.dtype == torch.float8_e4m3fn else {}
    # No log-sum-exp asked for (a decode-only step needs none); ours writes it always, [B, Hq] floats.
    return lambda: wrapper.run(query=(q_nope, q_pe), kv_cache=(ckv, kpe), out=out, **scales)


def _flashinfer_time(q, table, seq_lens, kv_dtype, timed, notes) -> tuple[str | None, float | None]:
    """(backend, seconds) of FlashInfer's faster MLA decode over a random cache of kv_dtype."""
    pages = table.numel()
    ckv, kpe = (torch.empty(pages, PAGE_SIZE, width, dtype=torch.bfloat16, device=q.device).normal_().to(kv_dtype)
                for width in (SHAPE.kv_lora_rank, SHAPE.qk_rope_head_dim))
    label = str(kv_dtype).removeprefix("torch.")
    return fastest({backend: try_time(timed, lambda: _flashinfer_mla_decode(q, table, seq_lens, (ckv, kpe), backend),
                                      notes, f"FlashInfer MLA {label} {backend}")
                    for backend in FLASHINFER_BACKENDS})


def _case_rows(case: MLACase, recipes, device, timed) -> list[MLARow]:
    batch, context = case
    pages_per_seq = -(-context // PAGE_SIZE)
    table = shuffled_page_table(batch, pages_per_seq, device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    rank, rope = SHAPE.kv_lora_rank, SHAPE.qk_rope_head_dim
    q = torch.randn(batch, SHAPE.num_heads, rank + rope, dtype=torch.bfloat16, device=device)
    notes: list[str] = []
    (bf16_backend, bf16_s), (fp8_backend, fp8_s) = (None, None), (None, None)
    if has_flashinfer(device):
        bf16_backend, bf16_s = _flashinfer_time(q, table, seq_lens, torch.bfloat16, timed, notes)
        fp8_backend, fp8_s = _flashinfer_time(q, table, seq_lens, torch.float8_e4m3fn, timed, notes)
    else:
        notes.append("FlashInfer does not run here: no BF16 or FP8 MLA peers")
    rows = []
    for recipe in recipes:
        cache = _fp4_cache(recipe, table, seq_lens, device)
        out = q.new_empty(batch, SHAPE.num_heads, rank)
        lse = torch.empty(batch, SHAPE.num_heads, dtype=torch.float32, device=device)
        seconds = timed(lambda: torch.ops.fp4kv.mla_decode_attention(out, lse, q,
                                                                      *cache.op_args(recipe, SHAPE.sm_scale)))
        bytes_per_token = LATENT_RECIPES[recipe].bytes_per_token(rank, rope)
        rows.append(MLARow(recipe, batch, context, seconds * 1e6, batch * context * bytes_per_token / seconds / 1e9,
                           bytes_per_token, us(bf16_s), bf16_backend, us(fp8_s), fp8_backend, "; ".join(notes)))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # at 8 x 64k tokens the BF16 peer's cache alone is 600 MB
    return rows


def run_mla(cases: list[MLACase], recipes, device: torch.device) -> list[MLARow]:
    """One row per case and LATENT_RECIPES name in `recipes`."""
    timed = timer(device)
    return [row for case in cases for row in _case_rows(case, recipes, device, timed)]


def _flashinfer_cell(seconds_us: float | None, backend: str | None) -> str:
    return f"{seconds_us:.1f} ({backend})" if seconds_us is not None else "n/a"


def print_mla_table(rows: list[MLARow]) -> None:
    print(f"\nMLA decode, DeepSeek-V3 shapes ({SHAPE.num_heads} query heads, kv_lora_rank {SHAPE.kv_lora_rank} + rope "
          f"{SHAPE.qk_rope_head_dim}, page {PAGE_SIZE}; case BATCHxCONTEXT): FP4 latent read directly vs FlashInfer's "
          f"BatchMLAPagedAttentionWrapper over BF16 and FP8 latent caches, the faster of "
          f"{' and '.join(FLASHINFER_BACKENDS)} (in brackets); 'n/a': FlashInfer could not run it (reasons below);"
          f" bytes per token and layer vs BF16's {BF16_LATENT_BYTES_PER_TOKEN}")
    print(f"{'case':<12}{'recipe':<14}{'FP4 us':>10}{'GB/s':>8}{'B/token':>9}{'B/BF16':>8}{'BF16 us':>16}"
          f"{'FP8 us':>16}{'FP4/BF16':>10}{'FP4/FP8':>9}")
    for r in rows:
        print(f"{f'{r.batch}x{r.context}':<12}{r.recipe:<14}{r.fp4_us:>10.1f}{r.fp4_gb_per_s:>8.0f}"
              f"{r.bytes_per_token:>9}{r.x_bf16_bytes:>8.3f}{_flashinfer_cell(r.bf16_us, r.bf16_backend):>16}"
              f"{_flashinfer_cell(r.flashinfer_fp8_us, r.fp8_backend):>16}{cell(r.x_bf16, '.3f'):>10}"
              f"{cell(r.x_fp8, '.3f'):>9}")
    print_notes(rows)
