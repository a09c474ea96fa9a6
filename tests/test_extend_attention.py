"""fp4kv.extend_attention: several new tokens per sequence (chunked prefill, prefix-cache hits,
speculative verification) attending causally over the paged FP4 cache, read directly.

The eager kernel is checked against SDPA over the dequantized cache; the Triton kernel against
the eager one (compiled on a GPU, the interpreter on CPU)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.testing._internal.common_utils import TestCase

import torch_fp4kv
from conftest import RECIPES, TRITON_DEVICE, requires_cuda, requires_hopper
from torch_fp4kv import FP4KVCache, get_fp4_kv_cache_quant_method
from torch_fp4kv.ops import eager, get_kv_recipe

K8_RECIPES = [f"{r}+k8" for r in RECIPES]  # FP8 E4M3 keys beside FP4 values


def _problem(recipe, new_tokens, seq_lens, hq=8, hkv=2, d=64, page_size=16, max_pages=None, device="cpu",
             dtype=torch.bfloat16, seed=0, padding=0):
    """A one-layer cache of normal K/V (global scales where the recipe has them), a shuffled page
    table, and q for `new_tokens[b]` tokens of each sequence (+ `padding` rows nobody owns)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(new_tokens)
    if max_pages is None:
        max_pages = max(1, -(-max(seq_lens) // page_size))
    pages = batch * max_pages + 1
    fp4_recipe, k_fp8 = recipe.removesuffix("+k8"), recipe.endswith("+k8")
    method = get_fp4_kv_cache_quant_method(fp4_recipe, k_fp8=k_fp8)
    cache = FP4KVCache(method, pages * page_size, hkv, d, 1, device=device).layers[0]
    for scale, value in ((cache.k_global_scale, 0.003), (cache.v_global_scale, 0.005)):
        if scale is not None:  # FP8 keys have one beside blockfp4/mxfp4 values, which have none
            scale.fill_(value)
    k = torch.randn(pages * page_size, hkv, d, generator=g).to(device)
    v = torch.randn(pages * page_size, hkv, d, generator=g).to(device)
    cache.store(torch.arange(pages * page_size, device=device), k, v)
    block_table = torch.randperm(pages, generator=g)[: batch * max_pages].view(batch, max_pages).int().to(device)
    cu = torch.tensor([0, *torch.tensor(new_tokens).cumsum(0).tolist()], dtype=torch.int32).to(device)
    q = torch.randn(sum(new_tokens) + padding, hq, d, generator=g).to(device, dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32).to(device)
    return (q, cu, cache.k_data, cache.k_scales, cache.v_data, cache.v_scales, block_table, lens, page_size, recipe,
            cache.k_global_scale, cache.v_global_scale)


def _sdpa_reference(args):
    """Row by row: the sequence's dequantized K/V up to the row's position, SDPA in fp32."""
    q, cu, k_data, k_scales, v_data, v_scales, table, lens, page, recipe, k_g, v_g = args
    out = torch.zeros(q.shape, dtype=torch.float32)
    for b in range(table.shape[0]):
        slots = eager.paged_slots(table[b : b + 1], page)[0]
        k = torch_fp4kv.gather_dequantize(k_data, k_scales, slots, get_kv_recipe(recipe).k.name, k_g, torch.float32)
        v = torch_fp4kv.gather_dequantize(v_data, v_scales, slots, get_kv_recipe(recipe).v.name, v_g, torch.float32)
        for t in range(int(cu[b]), int(cu[b + 1])):
            position = int(lens[b]) - int(cu[b + 1]) + t
            if position < 0:
                continue
            seen = slice(0, position + 1)
            out[t] = F.scaled_dot_product_attention(q[t, :, None].float(), k[seen].transpose(0, 1),
                                                    v[seen].transpose(0, 1), enable_gqa=True)[:, 0]
    return out


def _assert_triton_matches_eager(args, force_backend):
    force_backend("eager")
    expected = torch_fp4kv.extend_attention(*args)
    force_backend("triton")
    actual = torch_fp4kv.extend_attention(*args)
    torch.testing.assert_close(actual.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("recipe", RECIPES + K8_RECIPES)
def test_eager_reference_equals_sdpa_over_the_dequantized_cache(recipe):
    """Verify-like (4 new tokens), a chunk, one token (decode), and a chunk over an empty prefix."""
    args = _problem(recipe, new_tokens=[4, 21, 1, 7], seq_lens=[40, 64, 9, 7], hq=6, hkv=2)
    out = torch_fp4kv.extend_attention(*args)
    torch.testing.assert_close(out.float(), _sdpa_reference(args), atol=1e-2, rtol=1e-2)


def test_one_new_token_is_decode_attention():
    args = _problem("nvfp4", new_tokens=[1, 1, 1], seq_lens=[5, 64, 33])
    q, cu, *cache = args
    torch.testing.assert_close(torch_fp4kv.extend_attention(*args), torch_fp4kv.decode_attention(q, *cache),
                               atol=0, rtol=0)


def test_rows_nobody_owns_and_rows_that_see_nothing_are_zeros():
    """Padding rows past cu_seqlens_q[B], more new tokens than the sequence holds (the first rows
    see no position), and unsorted offsets (a sequence whose end is below its start owns no row)."""
    args = _problem("nvfp4", new_tokens=[3, 5], seq_lens=[20, 2], padding=4)
    out = torch_fp4kv.extend_attention(*args)
    assert torch.equal(out[8:], torch.zeros_like(out[8:]))  # padding
    assert torch.equal(out[3:6], torch.zeros_like(out[3:6]))  # positions -3, -2, -1
    assert out[6:8].abs().sum() > 0
    torch.testing.assert_close(out[:8].float(), _sdpa_reference(args)[:8], atol=1e-2, rtol=1e-2)
    q, cu, *rest = args
    unsorted = torch.tensor([0, 6, 3], dtype=torch.int32)
    start, end = eager.extend_rows(unsorted, q.shape[0])
    assert start.tolist() == [0, 6] and end.tolist() == [6, 6]
    out = torch_fp4kv.extend_attention(q, unsorted, *rest)
    assert torch.equal(out[6:], torch.zeros_like(out[6:]))


def test_extend_rows_clamp_to_q():
    start, end = eager.extend_rows(torch.tensor([-5, 2, 40, 9], dtype=torch.int32), 10)
    assert start.tolist() == [0, 2, 10] and end.tolist() == [2, 10, 10]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("page_size, hq, hkv, d", [(16, 8, 2, 64), (1, 4, 4, 128), (5, 6, 2, 64)])
def test_opcheck(recipe, page_size, hq, hkv, d):
    q, cu, *cache = _problem(recipe, [3, 0, 5], [30, 0, 12], hq, hkv, d, page_size, padding=2)
    out = torch.empty_like(q)
    k_data, k_scales, v_data, v_scales, table, lens, page, recipe_, k_g, v_g = cache
    torch.library.opcheck(torch.ops.fp4kv.extend_attention.default,
                          (out, q, cu, k_data, k_scales, v_data, v_scales, table, lens, page, recipe_, d ** -0.5,
                           k_g, v_g))


class TestExtendSchema(TestCase):
    def test_registered_schema(self):
        """The op's schema is contract: any change shows up here as a diff (tests/expect/)."""
        self.assertExpected(str(torch.ops.fp4kv.extend_attention.default._schema))


def test_writes_into_out_and_rejects_bad_arguments():
    q, cu, k_data, k_scales, v_data, v_scales, table, lens, page, recipe, k_g, v_g = _problem("nvfp4", [2, 3], [9, 30])
    out = torch.full_like(q, 7.0)
    call = dict(q=q, cu_seqlens_q=cu, k_data=k_data, k_scales=k_scales, v_data=v_data, v_scales=v_scales,
                block_table=table, seq_lens=lens, page_size=page, recipe=recipe, k_global_scale=k_g,
                v_global_scale=v_g)
    assert torch_fp4kv.extend_attention(**call, out=out) is out
    bad = [
        (dict(cu_seqlens_q=cu[:2]), ValueError, r"cu_seqlens_q has 2 entries but block_table has 2 rows \(needs \[B\+1\]\)"),
        (dict(cu_seqlens_q=cu.long()), TypeError, "cu_seqlens_q must have dtype int32"),
        (dict(cu_seqlens_q=cu[:, None]), ValueError, "cu_seqlens_q must be 1-D"),
        (dict(cu_seqlens_q=cu.to("meta")), ValueError, "cu_seqlens_q is on meta"),
        (dict(seq_lens=lens[:1]), ValueError, "seq_lens has 1 entries but block_table has 2 rows"),
        (dict(q=q[0]), ValueError, r"q must be 3-D \[T, Hq, D\]"),
        (dict(q=q[:, :3]), ValueError, "q has 3 heads, not a multiple of the cache's 2 KV heads"),
        (dict(q=q.float()), TypeError, "q must have dtype"),
        (dict(block_table=table.long()), TypeError, "block_table must have dtype int32"),
        (dict(page_size=3), ValueError, "not a whole number of pages of 3"),
        (dict(out=out[:4]), ValueError, "out must be a"),
        (dict(sm_scale=1), TypeError, "sm_scale must be a float"),
        (dict(k_global_scale=0.5), TypeError, "k_global_scale must be a float32 tensor"),
    ]
    before = out.clone()
    for change, error, text in bad:
        with pytest.raises(error, match=text):
            torch_fp4kv.extend_attention(**{**call, "out": out, **change})
        assert torch.equal(out, before), f"out was written before the error ({text})"


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiles_fullgraph_without_recompiling_for_new_token_counts():
    """A changing number of new tokens (marked dynamic) and changing lengths: one graph."""
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(torch_fp4kv.extend_attention, backend=counter, fullgraph=True)
    for seed, (new, lens) in enumerate((([2, 3], [9, 30]), ([4, 1], [12, 31]), ([7, 6], [40, 6]))):
        q, cu, *rest = _problem("nvfp4", new, lens, max_pages=3, seed=seed)
        torch._dynamo.mark_dynamic(q, 0)
        torch.testing.assert_close(compiled(q, cu, *rest), torch_fp4kv.extend_attention(q, cu, *rest), atol=0, rtol=0)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counter.frame_count == 1, "a new token count or new lengths recompiled"


CASES = [  # (new tokens per sequence, seq_lens, hq, hkv, d, page_size, padding rows)
    ([4, 4, 4], [40, 4, 64], 8, 2, 64, 16, 0),  # verification: 4 draft tokens each
    ([1, 3, 0], [70, 3, 0], 4, 1, 128, 1, 2),  # a token, a whole sequence, an empty one; padding
    ([21, 2], [69, 40], 6, 2, 64, 7, 0),  # a chunk of 21 (tiles of 16), group 3
    ([5, 9], [90, 9], 16, 2, 256, 32, 0),  # group 8, head_dim 256
    ([3], [2500], 4, 1, 64, 16, 0),  # long context: ten splits on the interpreter
]


def _assert_case_matches_eager(recipe, case, force_backend):
    """A CASES / VERIFY_CASES entry on the Triton backend against eager."""
    new, lens, hq, hkv, d, page, padding = case
    args = _problem(recipe, new, lens, hq, hkv, d, page, device=TRITON_DEVICE, padding=padding)
    _assert_triton_matches_eager(args, force_backend)


def _assert_offsets_and_strided_metadata_match(args, offsets_list, force_backend):
    """For each cu_seqlens_q in offsets_list: Triton against eager, and strided cu_seqlens_q,
    block_table and seq_lens giving what their contiguous copies give."""
    q, _, k_data, k_scales, v_data, v_scales, table, lens, *rest = args
    cache = (k_data, k_scales, v_data, v_scales)
    for offsets in offsets_list:
        cu = torch.tensor(offsets, dtype=torch.int32, device=q.device)
        _assert_triton_matches_eager((q, cu, *cache, table, lens, *rest), force_backend)
        force_backend("triton")
        strided = torch_fp4kv.extend_attention(q, _column(cu), *cache, _column(table), _column(lens), *rest)
        assert torch.equal(strided, torch_fp4kv.extend_attention(q, cu, *cache, table, lens, *rest))


@pytest.mark.parametrize("recipe", RECIPES + K8_RECIPES)
@pytest.mark.parametrize("case", CASES, ids=[f"new{sum(c[0])}-hq{c[2]}-hkv{c[3]}-d{c[4]}-page{c[5]}" for c in CASES])
def test_triton_matches_eager(backend, recipe, case):
    _assert_case_matches_eager(recipe, case, backend)


def test_triton_unsorted_offsets_match_eager(backend):
    q, cu, *rest = _problem("nvfp4", [3, 5, 2], [20, 30, 2], device=TRITON_DEVICE, padding=3)
    for offsets in ([0, 6, 3, 9], [-4, 2, 40, 5], [2, 2, 2, 2]):
        _assert_triton_matches_eager((q, torch.tensor(offsets, dtype=torch.int32, device=q.device), *rest), backend)


def _column(x: torch.Tensor) -> torch.Tensor:
    """x as every other column of a wider tensor: the strided metadata engines pass."""
    wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]) if x.dim() > 1 else (x.shape[0], 2), 7, dtype=x.dtype,
                      device=x.device)
    if x.dim() > 1:
        wide[:, 1::2] = x
        return wide[:, 1::2]
    wide[:, 1] = x
    return wide[:, 1]


@pytest.mark.parametrize("recipe", ["nvfp4", "mxfp4+k8"])
def test_engine_made_metadata(backend, recipe):
    """Page ids outside the cache inside a sequence read as zero K/V, and strided block_table,
    seq_lens and cu_seqlens_q give what their contiguous copies give, on eager and Triton."""
    q, cu, k_data, k_scales, v_data, v_scales, table, lens, *rest = _problem(recipe, [3, 5], [40, 30],
                                                                             device=TRITON_DEVICE)
    spare_page = (set(range(k_data.shape[0] // rest[0])) - set(table.flatten().tolist())).pop()  # in no sequence
    table = table.clone()
    table[0, 1], table[1, 0] = -1, 2**31 - 1
    cache = (k_data, k_scales, v_data, v_scales)
    results = {}
    for name in ("eager", "triton"):
        backend(name)
        contiguous = torch_fp4kv.extend_attention(q, cu, *cache, table, lens, *rest)
        strided = torch_fp4kv.extend_attention(q, _column(cu), *cache, _column(table), _column(lens), *rest)
        assert torch.equal(strided, contiguous), name
        results[name] = contiguous
    torch.testing.assert_close(results["triton"].float(), results["eager"].float(), atol=2e-2, rtol=2e-2)
    # eager: a page outside the cache reads as a page of zero codes and zero scale bytes
    backend("eager")
    zeroed_table = table.clone()
    zeroed_table[0, 1] = zeroed_table[1, 0] = spare_page
    zeroed = [x.clone() for x in cache]
    for x in zeroed:
        x[spare_page * rest[0]:(spare_page + 1) * rest[0]] = 0
    expected = torch_fp4kv.extend_attention(q, cu, *zeroed, zeroed_table, lens, *rest)
    torch.testing.assert_close(results["eager"], expected, atol=0, rtol=0)


@settings(max_examples=10, deadline=None)
@given(recipe=st.sampled_from(RECIPES), batch=st.integers(1, 3), hkv=st.integers(1, 2),
       group=st.sampled_from([1, 3, 4, 8]), d=st.sampled_from([64, 128, 256]), page_size=st.sampled_from([1, 16]),
       new=st.sampled_from([1, 2, 4, 8, 64]), prefix=st.integers(0, 600), padding=st.integers(0, 2),
       seed=st.integers(0, 2**16))
def test_property_triton_matches_eager(recipe, batch, hkv, group, d, page_size, new, prefix, padding, seed):
    """Verification (1 to 8 new tokens) and chunks (64) over ragged prefixes: each sequence gets
    up to `new` tokens (some fewer, or none) after a prefix of up to `prefix` positions."""
    g = torch.Generator().manual_seed(seed)
    news = torch.randint(0, new + 1, (batch,), generator=g).tolist()
    lens = [n + int(torch.randint(0, prefix + 1, (), generator=g)) for n in news]
    args = _problem(recipe, news, lens, hkv * group, hkv, d, page_size, device=TRITON_DEVICE, seed=seed,
                    padding=padding)
    with pytest.MonkeyPatch.context() as mp:  # hypothesis runs many examples per fixture: patch here
        _assert_triton_matches_eager(args, lambda name: mp.setenv("TORCH_FP4KV_BACKEND", name))


@requires_cuda
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("new, context", [(4, 1000), (4, 8192), (8, 8192), (512, 8192), (1, 32768), (1024, 1024)])
def test_long_ragged_contexts_on_gpu(backend, recipe, new, context):
    """The benchmark's shape (Hq 32 / Hkv 8, D 128, page 16): verification, a chunk of 512 (the
    prefill kernel) and a prefill over an empty cache."""
    page = 16
    lens = [context, max(new, context // 3), max(new, context - 17)]
    args = _problem(recipe, [new, new, max(1, new // 2)], lens, 32, 8, 128, page, max_pages=-(-context // page),
                    device="cuda")
    _assert_triton_matches_eager(args, backend)


@requires_cuda
def test_verification_captured_in_a_cuda_graph_with_changing_lengths():
    """A fixed number of draft tokens per sequence: one capture serves every step's lengths."""
    args = _problem("nvfp4", [4, 4, 4, 4], [4, 5, 6, 7], 32, 8, 128, 16, max_pages=64, device="cuda")
    q, cu, *cache = args
    lens = cache[5]
    out = torch.empty_like(q)

    def step():
        torch_fp4kv.extend_attention(q, cu, *cache, out=out)

    step()  # compile the kernels before capturing
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for new_lens in ([1000, 5, 1024, 4], [17, 900, 3, 600]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q.normal_()
        graph.replay()
        torch.testing.assert_close(out, torch_fp4kv.extend_attention(q, cu, *cache), atol=0, rtol=0)


@pytest.fixture
def verify_route(monkeypatch):
    """Route every sequence's first T // B rows through triton_verify (a decode over the prefix
    plus the tail kernel) whatever the device; unpatched only the SM90 Gluon decode takes it."""
    from torch_fp4kv.ops import triton_verify

    monkeypatch.setattr(triton_verify, "routed_tokens",
                        lambda q, kv, fmt: q.shape[0] // max(kv.block_table.shape[0], 1))


VERIFY_CASES = [  # (new tokens per sequence, seq_lens, hq, hkv, d, page_size, padding rows)
    ([4, 4, 4], [40, 4, 64], 8, 2, 64, 16, 0),  # verification; one sequence is all new tokens
    ([2, 2], [300, 700], 4, 1, 128, 16, 0),  # prefixes over several splits of the decode
    ([1, 3, 0], [70, 3, 0], 4, 1, 128, 1, 2),  # n = 2: the 3-token sequence's last row is the extend kernel's
    ([3, 5], [9, 2], 6, 2, 64, 5, 0),  # rows before position 0 see nothing; n = 4 leaves one row over
]


@pytest.mark.parametrize("recipe", RECIPES + K8_RECIPES)
@pytest.mark.parametrize("case", VERIFY_CASES, ids=[f"new{c[0]}-lens{c[1]}-page{c[5]}" for c in VERIFY_CASES])
def test_verify_route_matches_eager(backend, verify_route, recipe, case):
    _assert_case_matches_eager(recipe, case, backend)


def test_verify_route_with_unsorted_offsets_and_engine_made_metadata(backend, verify_route):
    args = list(_problem("nvfp4", [3, 3, 3], [20, 30, 2], device=TRITON_DEVICE, padding=3))
    args[6] = args[6].clone()  # the page table
    args[6][1, 0] = -1
    _assert_offsets_and_strided_metadata_match(args, ([0, 3, 6, 9], [0, 6, 3, 9], [-4, 2, 40, 5], [2, 2, 2, 2]),
                                               backend)


def test_verify_route_is_taken_from_shapes_where_the_hopper_decode_serves():
    """T // B new tokens times the group within the Gluon kernel's 32 rows, on SM90 only."""
    from torch_fp4kv.ops import triton_verify

    from torch_fp4kv.ops.paged_kv import PagedKV
    from torch_fp4kv.testing.paged import random_cache

    def cache(batch, recipe="nvfp4"):  # 8 KV heads of 128, one page a sequence
        return PagedKV(*random_cache(recipe, 16 * batch, 8, 128, TRITON_DEVICE),
                       torch.zeros(batch, 1, dtype=torch.int32, device=TRITON_DEVICE),
                       torch.ones(batch, dtype=torch.int32, device=TRITON_DEVICE), 16)

    q = torch.empty(128, 32, 128, device=TRITON_DEVICE)  # 32 sequences x 4 tokens, 32/8 heads
    on_hopper = TRITON_DEVICE == "cuda" and torch.cuda.get_device_capability() == (9, 0)
    assert triton_verify.routed_tokens(q, cache(32), get_kv_recipe("nvfp4")) == (4 if on_hopper else 0)
    assert triton_verify.routed_tokens(q, cache(16), get_kv_recipe("nvfp4")) == (8 if on_hopper else 0)  # 8 x 4 rows
    assert triton_verify.routed_tokens(q, cache(8), get_kv_recipe("nvfp4")) == 0  # 16 x 4 rows: too many
    assert triton_verify.routed_tokens(q, cache(32, "nvfp4+k8"), get_kv_recipe("nvfp4+k8")) == 0  # FP4 keys only
    assert triton_verify.routed_tokens(q[:0], cache(32), get_kv_recipe("nvfp4")) == 0
    shifted = cache(32)  # a cache one byte into a bigger buffer: the Gluon decode's copies need 16-byte rows
    shifted = shifted._replace(k_data=torch.empty(shifted.k_data.numel() + 1, dtype=torch.uint8,
                                                  device=TRITON_DEVICE)[1:].view(shifted.k_data.shape))
    assert triton_verify.routed_tokens(q, shifted, get_kv_recipe("nvfp4")) == 0


@pytest.fixture(params=[(16, 32), (128, 64)], ids=["m16", "m128"])
def prefill_kernel(request, monkeypatch):
    """Send every Triton extend_attention call to triton_prefill, with `param` = (rows per program,
    positions per tile); m16 gives small problems several tiles, diagonals and splits."""
    from torch_fp4kv.ops import triton_prefill

    block_m, block_n = request.param
    launch = triton_prefill.PrefillLaunch(block_m=block_m, block_n=block_n, num_warps=4, num_stages=2, waves=4)
    monkeypatch.setattr(triton_prefill, "prefill_launch", lambda tokens, batch, hq, hkv, d: launch)


@pytest.mark.parametrize("recipe", RECIPES + K8_RECIPES)
@pytest.mark.parametrize("case", CASES, ids=[f"new{sum(c[0])}-hq{c[2]}-hkv{c[3]}-d{c[4]}-page{c[5]}" for c in CASES])
def test_prefill_kernel_matches_eager(backend, prefill_kernel, recipe, case):
    _assert_case_matches_eager(recipe, case, backend)


def test_prefill_kernel_with_unsorted_offsets_and_engine_made_metadata(backend, prefill_kernel):
    args = list(_problem("nvfp4", [30, 17, 2], [40, 60, 2], device=TRITON_DEVICE, padding=3))
    args[6] = args[6].clone()  # the page table
    args[6][1, 0] = -1
    args[6][0, 1] = 2**31 - 1
    _assert_offsets_and_strided_metadata_match(
        args, ([0, 30, 47, 49], [0, 20, 9, 49], [-4, 2, 40, 5], [2, 2, 2, 2]), backend)


@settings(max_examples=8, deadline=None)
@given(recipe=st.sampled_from(RECIPES + K8_RECIPES), batch=st.integers(1, 3), group=st.sampled_from([1, 3, 4, 7]),
       d=st.sampled_from([64, 128]), page_size=st.sampled_from([1, 16]), new=st.integers(0, 80),
       prefix=st.integers(0, 300), seed=st.integers(0, 2**16))
def test_property_prefill_kernel_matches_eager(recipe, batch, group, d, page_size, new, prefix, seed):
    """Chunks and prefills over ragged prefixes with 16-row programs and 32-position tiles."""
    from torch_fp4kv.ops import triton_prefill

    g = torch.Generator().manual_seed(seed)
    news = torch.randint(0, new + 1, (batch,), generator=g).tolist()
    lens = [n + int(torch.randint(0, prefix + 1, (), generator=g)) for n in news]
    args = _problem(recipe, news, lens, group, 1, d, page_size, device=TRITON_DEVICE, seed=seed)
    launch = triton_prefill.PrefillLaunch(block_m=16, block_n=32, num_warps=4, num_stages=2, waves=4)
    with pytest.MonkeyPatch.context() as mp:  # hypothesis runs many examples per fixture: patch here
        mp.setattr(triton_prefill, "prefill_launch", lambda tokens, batch, hq, hkv, d: launch)
        _assert_triton_matches_eager(args, lambda name: mp.setenv("TORCH_FP4KV_BACKEND", name))


def test_prefill_kernel_is_chosen_from_shapes_for_chunks_and_prefills():
    """A program's rows per KV head per sequence or more: chunks and prefills, never verification."""
    from torch_fp4kv.ops.triton_prefill import prefill_launch

    assert prefill_launch(8 * 512, 8, 32, 8, 128) is not None  # chunked prefill, Llama-3-8B heads
    assert prefill_launch(2 * 4096, 2, 32, 8, 128) is not None  # prefill
    assert prefill_launch(32 * 4, 32, 32, 8, 128) is None  # verification
    assert prefill_launch(4 * 16, 4, 32, 32, 128) is None  # MHA: 16 rows per sequence and head
    assert prefill_launch(4096, 1, 32, 8, 96) is None  # a head_dim without a launch shape


def _cache(recipe, d):
    from torch_fp4kv.ops.paged_kv import PagedKV

    q, _, *cache = _problem(recipe, [1], [4], 32, 8, d)
    return q, PagedKV.from_op_args(*cache[:8], d ** -0.5, *cache[8:])[0]


def test_gluon_prefill_serves_fp4_keys_at_head_dim_64_and_128():
    """The Hopper prefill kernel's shapes; everything else runs triton_prefill."""
    gluon_prefill = pytest.importorskip("torch_fp4kv.ops.gluon_prefill")
    for recipe, d, served in (("nvfp4", 128, True), ("blockfp4", 64, True), ("mxfp4", 128, True),
                              ("mxfp4", 64, False),  # 2 scale bytes a row: no 4-byte copy
                              ("nvfp4+k8", 128, False),  # FP8 keys
                              ("nvfp4", 256, False)):
        q, kv = _cache(recipe, d)
        assert gluon_prefill.supported(q, kv, get_kv_recipe(recipe)) is served, (recipe, d)


def test_gluon_prefill_needs_caches_aligned_for_its_copies():
    """Its cp.async copies state 16-byte rows: a cache that starts off that alignment (a view one
    byte into a bigger buffer) runs the Triton kernel instead."""
    gluon_prefill = pytest.importorskip("torch_fp4kv.ops.gluon_prefill")
    q, kv = _cache("nvfp4", 128)
    shifted = torch.empty(kv.k_data.numel() + 1, dtype=torch.uint8)[1:].view(kv.k_data.shape)
    assert gluon_prefill.supported(q, kv, get_kv_recipe("nvfp4"))
    assert not gluon_prefill.supported(q, kv._replace(k_data=shifted), get_kv_recipe("nvfp4"))


@requires_hopper
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("case", CASES, ids=[f"new{sum(c[0])}-hq{c[2]}-hkv{c[3]}-d{c[4]}-page{c[5]}" for c in CASES])
def test_gluon_prefill_kernel_matches_eager_on_hopper(recipe, case):
    """The Gluon kernel, called directly on every case it serves, against eager."""
    from torch_fp4kv.ops import gluon_prefill
    from torch_fp4kv.ops.paged_kv import PagedKV

    new, lens, hq, hkv, d, page, padding = case
    q, cu, *cache = _problem(recipe, new, lens, hq, hkv, d, page, device="cuda", padding=padding)
    kv, _, _ = PagedKV.from_op_args(*cache[:8], d ** -0.5, *cache[8:])
    fmt = get_kv_recipe(recipe)
    if not gluon_prefill.supported(q, kv, fmt):
        pytest.skip("a shape the Triton kernel serves")
    expected, actual = torch.empty_like(q), torch.empty_like(q)
    eager.extend_attention(expected, q, cu, kv, fmt, d ** -0.5)
    gluon_prefill.extend_attention(actual, q, cu, kv, fmt, d ** -0.5)
    torch.testing.assert_close(actual.float(), expected.float(), atol=2e-2, rtol=2e-2)
