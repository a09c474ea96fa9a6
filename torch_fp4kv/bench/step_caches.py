"""The caches a whole-model step runs on (e2e.py): each layer's KV cache together with the kernel
that attends over it, as `testing.llama.PlannedAttention` modules planned for one step, and the
table of cache kinds that builds them: our NVFP4 cache through the library's layer cache, and
FlashInfer's paged attention over BF16 and FP8 caches and over our NVFP4 cache's own bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..layer_cache import FP4KVPoolLayer
from ..ops import get_kv_recipe
from ..options import KVCacheOptions
from ..testing.llama import Config, PlannedAttention
from ..testing.paged import NVFP4_KV_DTYPE, flashinfer_nvfp4_cache, plan_flashinfer

OUR_RECIPE = "nvfp4"  # the one recipe FlashInfer also reads, so the kinds compare one format


class StepPlan(NamedTuple):
    """One step's sequences as every kernel is planned for them: `batch` sequences of `length`
    tokens once the step's `new` ones are stored, on pages of `page_size` slots laid out as the
    model lays out slots (position p of sequence b at slot b * max_seq_len + p)."""

    batch: int
    new: int
    length: int
    page_size: int
    slots: int  # slots every layer's cache holds: batch * max_seq_len
    block_table: torch.Tensor  # [batch, pages] int32
    seq_lens: torch.Tensor  # [batch] int32, all `length`
    cu_seqlens_q: torch.Tensor  # [batch + 1] int32: sequence b's rows of the step's q


def plan_step(batch: int, context: int, new: int, max_seq_len: int, page_size: int, device) -> StepPlan:
    """The plan of a step that adds `new` tokens to `batch` sequences of `context` tokens."""
    if max_seq_len % page_size:
        raise ValueError(f"max_seq_len ({max_seq_len}) must be a multiple of page_size ({page_size}): each "
                         f"sequence's slots start a page")
    length = context + new
    if length > max_seq_len:
        raise ValueError(f"context + new ({length}) must fit in max_seq_len ({max_seq_len})")
    pages = -(-length // page_size)
    first_page = torch.arange(batch)[:, None] * (max_seq_len // page_size)
    return StepPlan(batch, new, length, page_size, batch * max_seq_len,
                    (first_page + torch.arange(pages)).int().to(device),
                    torch.full((batch,), length, dtype=torch.int32, device=device),
                    (torch.arange(batch + 1) * new).int().to(device))


class OurFP4Attention(PlannedAttention):
    """Our NVFP4 cache through the library's layer cache: FP4KVPoolLayer.store, then its
    decode_attention (one new token per sequence) or extend_attention."""

    def __init__(self, layer: FP4KVPoolLayer, plan: StepPlan):
        super().__init__()
        self.layer, self.plan = layer, plan

    def forward(self, q, k, v, loc):
        plan = self.plan
        self.layer.store(loc, k, v)
        if plan.new == 1:
            return self.layer.decode_attention(q, plan.block_table, plan.seq_lens, plan.page_size)
        return self.layer.extend_attention(q, plan.cu_seqlens_q, plan.block_table, plan.seq_lens, plan.page_size)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bytes as integers of its width: index_copy_ has no FP8 kernel (SGLang stores FP8 KV
    through a uint8 view the same way)."""
    return t.view({1: torch.uint8, 2: torch.int16}[t.element_size()])


class FlashInferAttention(PlannedAttention):
    """FlashInfer's planned paged attention over a BF16 or FP8 cache of its own: K and V
    [slots, Hkv, D] each (FlashInfer reads them as [pages, page_size, Hkv, D], NHD); new tokens
    are cast to the cache's dtype and copied into their slots."""

    def __init__(self, wrapper, kv_dtype: torch.dtype, plan: StepPlan, kv_heads: int, head_dim: int, device):
        super().__init__()
        self.wrapper = wrapper
        self.register_buffer("k", torch.zeros(plan.slots, kv_heads, head_dim, dtype=kv_dtype, device=device))
        self.register_buffer("v", torch.zeros(plan.slots, kv_heads, head_dim, dtype=kv_dtype, device=device))
        self.paged = tuple(t.view(-1, plan.page_size, kv_heads, head_dim) for t in (self.k, self.v))

    def forward(self, q, k, v, loc):
        for cache, new in ((self.k, k), (self.v, v)):
            _bits(cache).index_copy_(0, loc, _bits(new.to(cache.dtype)))
        return self.wrapper.run(q, self.paged)


class FlashInferNVFP4Attention(PlannedAttention):
    """FlashInfer's own NVFP4-KV attention (FA2; decode on tensor cores) over our layer cache's
    bytes, which our quantize_and_store writes (FlashInfer's NVFP4 layout is ours)."""

    def __init__(self, layer: FP4KVPoolLayer, wrapper, page_size: int):
        super().__init__()
        self.layer, self.wrapper = layer, wrapper
        self.paged, self.scale_factors = flashinfer_nvfp4_cache(layer.k_data, layer.k_scales, layer.v_data,
                                                                layer.v_scales, page_size)
        self.k_scale, self.v_scale = float(layer.k_global_scale), float(layer.v_global_scale)

    def forward(self, q, k, v, loc):
        self.layer.store(loc, k, v)
        return self.wrapper.run(q, self.paged, k_scale=self.k_scale, v_scale=self.v_scale,
                                kv_cache_sf=self.scale_factors)


def _our_layers(cfg: Config, plan: StepPlan, device) -> list[FP4KVPoolLayer]:
    return [FP4KVPoolLayer.allocate(OUR_RECIPE, KVCacheOptions(), plan.slots, cfg.n_kv_heads, cfg.head_dim, device)
            for _ in range(cfg.n_layers)]


def _wrapper(cfg: Config, plan: StepPlan, kv_dtype: torch.dtype, prefill_backend: str):
    """One FlashInfer wrapper planned for the step, shared by every layer (as engines share it)."""
    return plan_flashinfer(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, plan.block_table, plan.seq_lens, plan.page_size,
                           kv_dtype, None if plan.new == 1 else plan.cu_seqlens_q, prefill_backend)


def _ours(cfg: Config, plan: StepPlan, device) -> nn.ModuleList:
    return nn.ModuleList(OurFP4Attention(layer, plan) for layer in _our_layers(cfg, plan, device))


def _flashinfer_nvfp4(cfg: Config, plan: StepPlan, device) -> nn.ModuleList:
    wrapper = _wrapper(cfg, plan, NVFP4_KV_DTYPE, "fa2")  # FlashInfer reads NVFP4 KV on FA2 only (SM90)
    return nn.ModuleList(FlashInferNVFP4Attention(layer, wrapper, plan.page_size)
                         for layer in _our_layers(cfg, plan, device))


def _flashinfer(kv_dtype: torch.dtype, prefill_backend: str) -> Callable[[Config, StepPlan, object], nn.ModuleList]:
    def build(cfg: Config, plan: StepPlan, device) -> nn.ModuleList:
        wrapper = _wrapper(cfg, plan, kv_dtype, prefill_backend)
        return nn.ModuleList(FlashInferAttention(wrapper, kv_dtype, plan, cfg.n_kv_heads, cfg.head_dim, device)
                             for _ in range(cfg.n_layers))

    return build


def _plain_bytes(dtype: torch.dtype) -> Callable[[int, int], int]:
    """Bytes per token per layer, K and V, of a cache that stores each element in `dtype`."""
    return lambda kv_heads, head_dim: 2 * kv_heads * head_dim * dtype.itemsize


@dataclass(frozen=True)
class CacheKind:
    """One way a step keeps its KV cache and attends over it."""

    name: str
    bytes_per_token: Callable[[int, int], int]  # (kv_heads, head_dim) -> bytes per token per layer, K and V
    build: Callable[[Config, StepPlan, object], nn.ModuleList]  # (cfg, plan, device) -> one PlannedAttention a layer
    flashinfer: bool  # needs FlashInfer (else: ours, which runs anywhere)


CACHE_KINDS = (
    CacheKind(f"FP4 {OUR_RECIPE} (ours)", get_kv_recipe(OUR_RECIPE).bytes_per_token, _ours, flashinfer=False),
    CacheKind("FlashInfer NVFP4", get_kv_recipe(OUR_RECIPE).bytes_per_token, _flashinfer_nvfp4, flashinfer=True),
    # FP8 prefill on FA2: FlashInfer's FA3 FP8 kernels do not JIT from the GPU host's bundle.
    CacheKind("FlashInfer FP8", _plain_bytes(torch.float8_e4m3fn), _flashinfer(torch.float8_e4m3fn, "fa2"),
              flashinfer=True),
    CacheKind("FlashInfer BF16", _plain_bytes(torch.bfloat16), _flashinfer(torch.bfloat16, "auto"), flashinfer=True),
)
BASELINE = "FlashInfer BF16"  # the kind every step's times are divided by
