"""The random paged caches and FlashInfer plans that the bench, the check and the tests share
(torch_fp4kv.testing.paged): every value finite and readable, every page of the cache in the table,
and FlashInfer's wrappers planned over the same shape or over our NVFP4 bytes (conftest's stand-in
with its signatures here)."""

import pytest
import torch

import torch_fp4kv
from torch_fp4kv.ops import KV_RECIPES
from torch_fp4kv.ops.backends import forced_backend
from torch_fp4kv.ops.paged_kv import PagedKV
from torch_fp4kv.testing.paged import (flashinfer_nvfp4_attention, flashinfer_paged_attention, global_scales,
                                       plan_flashinfer, random_cache, shuffled_page_table)


@pytest.mark.parametrize("recipe", sorted(KV_RECIPES))
def test_random_cache_decodes_to_finite_values(recipe):
    batch, pages_per_seq, page, hkv, d = 2, 3, 4, 2, 64
    cache = random_cache(recipe, batch * pages_per_seq * page, hkv, d)
    table = shuffled_page_table(batch, pages_per_seq)
    assert sorted(table.flatten().tolist()) == list(range(batch * pages_per_seq)) and table.dtype == torch.int32
    q = torch.randn(batch, 2 * hkv, d, dtype=torch.bfloat16)
    lens = torch.tensor([pages_per_seq * page, 5], dtype=torch.int32)
    with forced_backend("eager"):
        out = torch_fp4kv.decode_attention(q, *cache, table, lens, page, recipe, *global_scales(recipe, 0.01))
    assert out.isfinite().all()


def test_flashinfer_decode_plan_covers_each_sequences_pages(fake_flashinfer):
    q = torch.randn(3, 8, 64, dtype=torch.bfloat16)
    flashinfer_paged_attention(q, context=40, kv_heads=2, page_size=16, kv_dtype=torch.float8_e4m3fn)()
    (_, name, layout, init_kwargs), (_, args, kwargs), (_, run_q, cache, _) = fake_flashinfer.calls
    indptr, indices, last, hq, hkv, d, page = args
    assert (name, layout, indptr.tolist(), last.tolist(), (hq, hkv, d, page)) == (
        "Decode", "NHD", [0, 3, 6, 9], [8, 8, 8], (8, 2, 64, 16))
    assert sorted(indices.tolist()) == list(range(9)) and kwargs["kv_data_type"] == torch.float8_e4m3fn
    assert init_kwargs["use_tensor_cores"] is False  # FlashInfer's CUDA-core decode, its default for BF16/FP8
    assert run_q is q and (cache.shape, cache.dtype) == ((9, 2, 16, 2, 64), torch.float8_e4m3fn)


def test_flashinfer_prefill_plan_is_causal_over_the_new_rows(fake_flashinfer):
    q = torch.randn(6, 4, 128, dtype=torch.bfloat16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    flashinfer_paged_attention(q, context=32, kv_heads=1, page_size=16, kv_dtype=torch.bfloat16, qo_indptr=cu,
                               backend="fa2")()
    (_, name, _, init_kwargs), (_, args, kwargs), _ = fake_flashinfer.calls
    assert name == "Prefill" and init_kwargs == {"backend": "fa2"} and kwargs["causal"] is True
    assert args[0] is cu and args[1].tolist() == [0, 2, 4] and args[3].tolist() == [16, 16]


def test_flashinfer_plan_takes_each_sequences_first_pages_in_order(fake_flashinfer):
    table = torch.tensor([[7, 3, 9, 0], [1, 2, 8, 6], [5, 4, 10, 11]], dtype=torch.int32)
    lens = torch.tensor([33, 16, 1], dtype=torch.int32)  # 3 pages (1 on the last), 1 full page, 1 page (1)
    plan_flashinfer(8, 2, 64, table, lens, 16, torch.bfloat16)
    _, (_, (indptr, indices, last, *_), _) = fake_flashinfer.calls
    assert (indptr.tolist(), indices.tolist(), last.tolist()) == ([0, 3, 4, 5], [7, 3, 9, 1, 5], [1, 16, 1])


@pytest.mark.parametrize("new", [None, 3])  # decode; prefill of 3 new tokens per sequence
def test_flashinfer_nvfp4_attention_reads_our_cache_bytes_as_they_are(fake_flashinfer, new):
    batch, pages_per_seq, page, hkv, hq, d = 2, 3, 4, 2, 8, 64
    cache = random_cache("nvfp4", batch * pages_per_seq * page, hkv, d)
    kv = PagedKV(*cache, shuffled_page_table(batch, pages_per_seq), torch.tensor([12, 10], dtype=torch.int32), page,
                 *global_scales("nvfp4", 0.25))
    rows = batch if new is None else batch * new
    q = torch.randn(rows, hq, d, dtype=torch.bfloat16)
    cu = None if new is None else torch.arange(batch + 1, dtype=torch.int32) * new
    flashinfer_nvfp4_attention(q, kv, cu)()
    (_, name, layout, init_kwargs), (_, args, kwargs), (_, _, (k, v), run_kwargs) = fake_flashinfer.calls
    assert kwargs["kv_data_type"] == torch.uint8 and layout == "NHD"
    if new is None:  # FlashInfer's CUDA-core decode rejects NVFP4 KV
        assert name == "Decode" and init_kwargs["use_tensor_cores"] is True
    else:
        assert name == "Prefill" and init_kwargs == {"backend": "fa2"} and args[0] is cu
    k_sf, v_sf = run_kwargs["kv_cache_sf"]
    assert (k.shape, k.dtype, k_sf.shape, k_sf.dtype) == ((6, page, hkv, d // 2), torch.uint8,
                                                          (6, page, hkv, d // 16), torch.float8_e4m3fn)
    for view, ours in ((k, kv.k_data), (v, kv.v_data), (k_sf, kv.k_scales), (v_sf, kv.v_scales)):
        assert view.data_ptr() == ours.data_ptr() and torch.equal(view.view(torch.uint8).flatten(), ours.flatten())
    assert (run_kwargs["k_scale"], run_kwargs["v_scale"]) == (0.25, 0.25)
