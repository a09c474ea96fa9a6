"""The random paged caches and FlashInfer plans that the bench, the check and the tests share
(torch_fp4kv.testing.paged): every value finite and readable, every page of the cache in the table,
and FlashInfer's wrappers planned over the same shape (a stand-in with its signatures here)."""

import sys
import types

import pytest
import torch

import torch_fp4kv
from torch_fp4kv.ops import KV_RECIPES
from torch_fp4kv.ops.backends import forced_backend
from torch_fp4kv.testing.paged import (flashinfer_paged_attention, global_scales, random_cache,
                                       shuffled_page_table)


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


class _Wrapper:
    """FlashInfer's paged wrappers as far as the builder uses them: records plan() and run()."""

    calls: list = []

    def __init__(self, workspace, layout, **kwargs):
        self.calls.append(("init", type(self).__name__, layout, kwargs))

    def plan(self, *args, **kwargs):
        self.calls.append(("plan", args, kwargs))

    def run(self, q, cache):
        self.calls.append(("run", q.shape, cache.shape, cache.dtype))
        return q


@pytest.fixture
def fake_flashinfer(monkeypatch):
    _Wrapper.calls = []
    namespace = types.SimpleNamespace(BatchDecodeWithPagedKVCacheWrapper=type("Decode", (_Wrapper,), {}),
                                      BatchPrefillWithPagedKVCacheWrapper=type("Prefill", (_Wrapper,), {}))
    monkeypatch.setitem(sys.modules, "flashinfer", namespace)
    return _Wrapper.calls


def test_flashinfer_decode_plan_covers_each_sequences_pages(fake_flashinfer):
    q = torch.randn(3, 8, 64, dtype=torch.bfloat16)
    flashinfer_paged_attention(q, context=40, kv_heads=2, page_size=16, kv_dtype=torch.float8_e4m3fn)()
    (_, name, layout, _), (_, args, kwargs), run = fake_flashinfer
    indptr, indices, last, hq, hkv, d, page = args
    assert (name, layout, indptr.tolist(), last.tolist(), (hq, hkv, d, page)) == (
        "Decode", "NHD", [0, 3, 6, 9], [8, 8, 8], (8, 2, 64, 16))
    assert sorted(indices.tolist()) == list(range(9)) and kwargs["kv_data_type"] == torch.float8_e4m3fn
    assert run == ("run", q.shape, (9, 2, 16, 2, 64), torch.float8_e4m3fn)


def test_flashinfer_prefill_plan_is_causal_over_the_new_rows(fake_flashinfer):
    q = torch.randn(6, 4, 128, dtype=torch.bfloat16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    flashinfer_paged_attention(q, context=32, kv_heads=1, page_size=16, kv_dtype=torch.bfloat16, qo_indptr=cu,
                               backend="fa2")()
    (_, name, _, init_kwargs), (_, args, kwargs), _ = fake_flashinfer
    assert name == "Prefill" and init_kwargs == {"backend": "fa2"} and kwargs["causal"] is True
    assert args[0] is cu and args[1].tolist() == [0, 2, 4] and args[3].tolist() == [16, 16]
