"""Random paged caches: ours in FP4 (or FP8 keys), and FlashInfer's paged attention planned over a
BF16 or FP8 cache of the same shape, or over our NVFP4 cache's own bytes. What the benchmark times,
what the check's soak runs between its scenarios, and what the tests feed the ops when the values
do not matter.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..ops import FP4Format, get_kv_recipe
from ..ops.formats import Element
from ..ops.paged_kv import PagedKV

# FlashInfer's plan() splits work into this scratch space (its examples use 128 MB; long contexts
# at large batch need more).
FLASHINFER_WORKSPACE_BYTES = 256 << 20
# The kv_data_type that tells FlashInfer its KV cache is NVFP4 (packed E2M1 bytes beside FP8 E4M3
# scale factors); FLASHINFER_NVFP4_RECIPES: the KV recipes whose bytes are that layout.
NVFP4_KV_DTYPE = torch.uint8
FLASHINFER_NVFP4_RECIPES = frozenset({"nvfp4"})


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


def plan_flashinfer(num_qo_heads: int, kv_heads: int, head_dim: int, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, page_size: int, kv_dtype: torch.dtype,
                    qo_indptr: torch.Tensor | None = None, backend: str = "auto",
                    q_dtype: torch.dtype = torch.bfloat16):
    """FlashInfer's paged attention wrapper (NHD), planned over sequence b's first
    ceil(seq_lens[b] / page_size) pages of `block_table` [B, pages] (int32): without qo_indptr,
    BatchDecodeWithPagedKVCacheWrapper, one query per sequence; with qo_indptr [B+1] (sequence b's
    rows of q), BatchPrefillWithPagedKVCacheWrapper, causal, on `backend` ("fa2", "fa3", "auto").
    kv_dtype torch.uint8 is FlashInfer's NVFP4 KV, which its decode reads on tensor cores only
    (its CUDA-core decode rejects it). FlashInfer's own errors propagate."""
    import flashinfer

    device = block_table.device
    pages = (seq_lens.long() + page_size - 1) // page_size
    indptr = torch.zeros(len(seq_lens) + 1, dtype=torch.int32, device=device)
    indptr[1:] = pages.cumsum(0)
    indices = block_table[torch.arange(block_table.shape[1], device=device) < pages[:, None]].int()
    last_page_len = (seq_lens.long() - (pages - 1) * page_size).int()
    workspace = torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    if qo_indptr is None:
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD",
                                                                use_tensor_cores=kv_dtype == NVFP4_KV_DTYPE)
        wrapper.plan(indptr, indices, last_page_len, num_qo_heads, kv_heads, head_dim, page_size,
                     q_data_type=q_dtype, kv_data_type=kv_dtype)
    else:
        wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
        wrapper.plan(qo_indptr, indptr, indices, last_page_len, num_qo_heads, kv_heads, head_dim, page_size,
                     causal=True, q_data_type=q_dtype, kv_data_type=kv_dtype)
    return wrapper


def flashinfer_paged_attention(q: torch.Tensor, context: int, kv_heads: int, page_size: int, kv_dtype: torch.dtype,
                               qo_indptr: torch.Tensor | None = None,
                               backend: str = "auto") -> Callable[[], torch.Tensor]:
    """FlashInfer's paged attention of q over a random cache of `kv_dtype` (BF16 or FP8
    E4M3, [pages, 2, page_size, kv_heads, D], NHD), every sequence `context` positions long on
    shuffled pages: decode for q [B, Hq, D]; with qo_indptr, prefill of q [T, Hq, D] on `backend`
    (plan_flashinfer). Planned here; returns fn() that runs it."""
    device, head_dim = q.device, q.shape[-1]
    batch = q.shape[0] if qo_indptr is None else qo_indptr.shape[0] - 1
    pages_per_seq = -(-context // page_size)
    cache = torch.empty(batch * pages_per_seq, 2, page_size, kv_heads, head_dim, dtype=torch.bfloat16,
                        device=device).normal_().to(kv_dtype)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    table = shuffled_page_table(batch, pages_per_seq, device)
    wrapper = plan_flashinfer(q.shape[1], kv_heads, head_dim, table, seq_lens, page_size, kv_dtype, qo_indptr, backend,
                              q.dtype)
    return lambda: wrapper.run(q, cache)


TensorPair = tuple[torch.Tensor, torch.Tensor]


def flashinfer_nvfp4_cache(k_data: torch.Tensor, k_scales: torch.Tensor, v_data: torch.Tensor, v_scales: torch.Tensor,
                           page_size: int) -> tuple[TensorPair, TensorPair]:
    """Our NVFP4 cache buffers ([slots, H, D/2] data, [slots, H, D/16] scales) as FlashInfer's
    paged NVFP4 KV, NHD: ((k, v) uint8 [pages, page_size, H, D/2], (k_sf, v_sf) float8_e4m3fn
    [pages, page_size, H, D/16]). Views of the same bytes: FlashInfer's layout is ours."""
    def paged(t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, page_size, *t.shape[1:])

    return ((paged(k_data), paged(v_data)),
            (paged(k_scales.view(torch.float8_e4m3fn)), paged(v_scales.view(torch.float8_e4m3fn))))


def flashinfer_nvfp4_attention(q: torch.Tensor, kv: PagedKV,
                               qo_indptr: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
    """FlashInfer's own NVFP4-KV attention (FA2; decode on tensor cores) of q over our NVFP4 cache
    `kv` as it is: its bytes, page table and lengths. Decode for q [B, Hq, D]; with qo_indptr,
    causal prefill of q [T, Hq, D]. The global scales go in as Python floats (FlashInfer's k_scale
    and v_scale), read here once. Planned here; returns fn() that runs it."""
    wrapper = plan_flashinfer(q.shape[1], kv.kv_heads, q.shape[-1], kv.block_table, kv.seq_lens, kv.page_size,
                              NVFP4_KV_DTYPE, qo_indptr, "fa2", q.dtype)
    cache, scale_factors = flashinfer_nvfp4_cache(kv.k_data, kv.k_scales, kv.v_data, kv.v_scales, kv.page_size)
    k_scale, v_scale = float(kv.k_global_scale), float(kv.v_global_scale)
    return lambda: wrapper.run(q, cache, k_scale=k_scale, v_scale=v_scale, kv_cache_sf=scale_factors)
