"""Random paged caches: ours in FP4 (or FP8 keys), and FlashInfer's paged attention planned over a
BF16 or FP8 cache of the same shape. What the benchmark times, what the check's soak runs between
its scenarios, and what the tests feed the ops when the values do not matter.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..ops import FP4Format, get_kv_recipe
from ..ops.formats import Element

# FlashInfer's plan() splits work into this scratch space (its examples use 128 MB; long contexts
# at large batch need more).
FLASHINFER_WORKSPACE_BYTES = 256 << 20


def random_packed(fmt: FP4Format, slots: int, heads: int, head_dim: int, device="cpu",
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(data [slots, heads, ...], scales [slots, heads, ...]) uint8 of random bytes in `fmt`, every
    value finite: scale bytes 100 to 125 (NaN never equals NaN where opcheck compares outputs, and a
    NaN block would take another path through a timed kernel); FP8 data without its NaN bytes."""
    if fmt.element is Element.E4M3:  # any sign, any magnitude byte but 0x7F (NaN)
        magnitude = torch.randint(0, 0x7F, (slots, heads, fmt.data_width(head_dim)), generator=generator)
        sign = torch.randint(0, 2, magnitude.shape, generator=generator) << 7
        data = (magnitude | sign).to(torch.uint8)
    else:
        data = torch.randint(0, 256, (slots, heads, fmt.data_width(head_dim)), dtype=torch.uint8, generator=generator)
    scales = torch.randint(100, 126, (slots, heads, fmt.scales_width(head_dim)), dtype=torch.uint8,
                           generator=generator)
    return data.to(device), scales.to(device)


def random_cache(recipe: str, slots: int, kv_heads: int, head_dim: int, device="cpu",
                 generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """[k_data, k_scales, v_data, v_scales] of random_packed bytes in a KV recipe's formats."""
    kv_recipe = get_kv_recipe(recipe)
    return [*random_packed(kv_recipe.k, slots, kv_heads, head_dim, device, generator),
            *random_packed(kv_recipe.v, slots, kv_heads, head_dim, device, generator)]


def global_scales(recipe: str, value: float, device="cpu") -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(k_global_scale, v_global_scale) of `value` where the KV recipe's formats have one, else None."""
    kv_recipe = get_kv_recipe(recipe)
    return tuple(torch.tensor([value], device=device) if f.has_global_scale else None for f in (kv_recipe.k, kv_recipe.v))


def shuffled_page_table(batch: int, pages_per_seq: int, device="cpu",
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """[batch, pages_per_seq] int32: every page of a cache of batch * pages_per_seq pages once, in
    random order, as an engine's page allocator scatters them."""
    return torch.randperm(batch * pages_per_seq, generator=generator).int().view(batch, pages_per_seq).to(device)


def flashinfer_paged_attention(q: torch.Tensor, context: int, kv_heads: int, page_size: int, kv_dtype: torch.dtype,
                               qo_indptr: torch.Tensor | None = None, backend: str = "auto") -> Callable[[], torch.Tensor]:
    """FlashInfer's paged attention of q over a random cache of `kv_dtype` (BF16 or FP8 E4M3,
    [pages, 2, page_size, kv_heads, D], NHD), every sequence `context` positions long on shuffled
    pages: BatchDecodeWithPagedKVCacheWrapper for q [B, Hq, D], one token per sequence; with
    qo_indptr [B+1] (sequence b's rows of q [T, Hq, D]) BatchPrefillWithPagedKVCacheWrapper,
    causal, on `backend` ("fa2", "fa3", "auto"). Planned here; returns fn() that runs it.
    FlashInfer's own errors (a head group or backend it does not support) propagate."""
    import flashinfer

    device, head_dim = q.device, q.shape[-1]
    batch = q.shape[0] if qo_indptr is None else qo_indptr.shape[0] - 1
    pages_per_seq = -(-context // page_size)
    num_pages = batch * pages_per_seq
    cache = torch.empty(num_pages, 2, page_size, kv_heads, head_dim, dtype=torch.bfloat16,
                        device=device).normal_().to(kv_dtype)
    indptr = torch.arange(batch + 1, dtype=torch.int32, device=device) * pages_per_seq
    indices = torch.randperm(num_pages, device=device).int()
    last_page_len = torch.full((batch,), context - (pages_per_seq - 1) * page_size, dtype=torch.int32, device=device)
    workspace = torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    if qo_indptr is None:
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        wrapper.plan(indptr, indices, last_page_len, q.shape[1], kv_heads, head_dim, page_size,
                     q_data_type=q.dtype, kv_data_type=kv_dtype)
    else:
        wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
        wrapper.plan(qo_indptr, indptr, indices, last_page_len, q.shape[1], kv_heads, head_dim, page_size,
                     causal=True, q_data_type=q.dtype, kv_data_type=kv_dtype)
    return lambda: wrapper.run(q, cache)
