"""fp4kv.decode_attention: paged decode that reads the FP4 cache directly.

The eager kernel (gather, dequantize, attention) is checked against PyTorch's SDPA; the Triton
kernel against the eager one (compiled on a GPU, the interpreter on CPU)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch._dynamo.utils import counters

import torch_fp4kv
from conftest import RECIPES, TRITON_DEVICE, requires_cuda, requires_hopper
from torch_fp4kv import FP4KVCache
from torch_fp4kv.ops import eager, get_kv_recipe
from torch_fp4kv.ops.paged_kv import PagedKV


def _paged_cache(recipe, pages, page_size, hkv, d, device, generator):
    """A one-layer cache filled with normal K/V, with per-layer global scales where the recipe has them."""
    cache = FP4KVCache(recipe, pages * page_size, hkv, d, 1, device=device).layers[0]
    if cache.k_global_scale is not None:
        cache.k_global_scale.fill_(0.003)
        cache.v_global_scale.fill_(0.005)
    slots = pages * page_size
    k = torch.randn(slots, hkv, d, generator=generator).to(device)
    v = torch.randn(slots, hkv, d, generator=generator).to(device)
    cache.store(torch.arange(slots, device=device), k, v)
    return cache


def _problem(recipe, batch=3, hq=8, hkv=2, d=64, page_size=16, max_pages=4, seq_lens=None, device="cpu",
             dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    pages = batch * max_pages + 1
    cache = _paged_cache(recipe, pages, page_size, hkv, d, device, g)
    block_table = torch.randperm(pages, generator=g)[: batch * max_pages].view(batch, max_pages).int().to(device)
    if seq_lens is None:
        seq_lens = torch.randint(0, max_pages * page_size + 1, (batch,), generator=g)
    seq_lens = torch.as_tensor(seq_lens, dtype=torch.int32).to(device)
    q = torch.randn(batch, hq, d, generator=g).to(device, dtype)
    args = (q, cache.k_data, cache.k_scales, cache.v_data, cache.v_scales, block_table, seq_lens, page_size, recipe,
            cache.k_global_scale, cache.v_global_scale)
    return args, cache



def _assert_triton_matches_eager(args, force_backend):
    """The same call with each backend forced (force_backend(name) sets TORCH_FP4KV_BACKEND), both
    the output and the log-sum-exp."""
    results = []
    for name in ("eager", "triton"):
        force_backend(name)
        lse = torch.empty(args[0].shape[:2], dtype=torch.float32, device=args[0].device)
        results.append((torch_fp4kv.decode_attention(*args, lse=lse), lse))
        without_lse = torch_fp4kv.decode_attention(*args)
        torch.testing.assert_close(without_lse, results[-1][0], atol=0, rtol=0)  # lse changes nothing else
    (expected, expected_lse), (actual, actual_lse) = results
    torch.testing.assert_close(actual.float(), expected.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(actual_lse, expected_lse, atol=2e-2, rtol=2e-2)


def _merged(first, second):
    """Two (out, lse) attentions over disjoint parts of a context -> the attention over both."""
    (out_1, lse_1), (out_2, lse_2) = first, second
    total = torch.logaddexp(lse_1, lse_2)
    seen = total > float("-inf")
    w_1 = torch.where(seen, torch.exp(lse_1 - total), 0.0)[..., None]
    w_2 = torch.where(seen, torch.exp(lse_2 - total), 0.0)[..., None]
    return out_1.float() * w_1 + out_2.float() * w_2, total

@pytest.mark.parametrize("recipe", RECIPES)
def test_eager_reference_equals_sdpa_over_the_dequantized_cache(recipe):
    (q, k_data, k_scales, v_data, v_scales, table, lens, page, _, k_g, v_g), _ = _problem(recipe, seq_lens=[5, 64, 37])
    out = torch_fp4kv.decode_attention(q, k_data, k_scales, v_data, v_scales, table, lens, page, recipe, k_g, v_g)
    for b in range(q.shape[0]):
        n = int(lens[b])
        slots = eager.paged_slots(table[b : b + 1], page)[0, :n]
        k = torch_fp4kv.gather_dequantize(k_data, k_scales, slots, recipe, k_g, torch.float32)
        v = torch_fp4kv.gather_dequantize(v_data, v_scales, slots, recipe, v_g, torch.float32)
        expected = F.scaled_dot_product_attention(q[b : b + 1, :, None].float(), k.transpose(0, 1)[None],
                                                  v.transpose(0, 1)[None], enable_gqa=True)
        torch.testing.assert_close(out[b].float(), expected[0, :, 0], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("recipe", RECIPES)
def test_eager_lse_is_the_logsumexp_of_the_scaled_scores(recipe):
    (q, k_data, k_scales, v_data, v_scales, table, lens, page, _, k_g, v_g), _ = _problem(recipe, seq_lens=[5, 64, 0])
    lse = torch.empty(q.shape[:2])
    torch_fp4kv.decode_attention(q, k_data, k_scales, v_data, v_scales, table, lens, page, recipe, k_g, v_g,
                                 sm_scale=0.3, lse=lse)
    for b in range(q.shape[0]):
        slots = eager.paged_slots(table[b : b + 1], page)[0, : int(lens[b])]
        k = torch_fp4kv.gather_dequantize(k_data, k_scales, slots, recipe, k_g, torch.float32)  # [n, Hkv, D]
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k.repeat_interleave(q.shape[1] // k.shape[1], 1)) * 0.3
        torch.testing.assert_close(lse[b], torch.logsumexp(scores, -1), atol=1e-4, rtol=1e-5)
    assert torch.isneginf(lse[2]).all()  # an empty sequence


@pytest.mark.parametrize("backend_name", ["eager", "triton"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_merging_two_halves_of_the_context_equals_one_call(backend, backend_name, recipe):
    """Pages [0, P/2) and [P/2, P) as two calls, merged by their log-sum-exps, equal one call over
    all P pages (ragged lengths: some second halves are empty, one sequence is empty)."""
    backend(backend_name)
    max_pages, page = 8, 16
    (q, k_data, k_scales, v_data, v_scales, table, lens, _, recipe_, k_g, v_g), _ = _problem(
        recipe, batch=4, max_pages=max_pages, page_size=page, seq_lens=[128, 70, 33, 0], device=TRITON_DEVICE)
    half = max_pages // 2 * page
    parts = []
    for part_table, part_lens in ((table[:, : max_pages // 2], lens.clamp(max=half)),
                                  (table[:, max_pages // 2 :], (lens - half).clamp(min=0))):
        lse = torch.empty(q.shape[:2], device=q.device)
        out = torch_fp4kv.decode_attention(q, k_data, k_scales, v_data, v_scales, part_table.contiguous(),
                                           part_lens.int(), page, recipe_, k_g, v_g, lse=lse)
        parts.append((out, lse))
    lse = torch.empty(q.shape[:2], device=q.device)
    whole = torch_fp4kv.decode_attention(q, k_data, k_scales, v_data, v_scales, table, lens, page, recipe_, k_g, v_g,
                                         lse=lse)
    merged_out, merged_lse = _merged(*parts)
    torch.testing.assert_close(merged_out, whole.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(merged_lse, lse, atol=1e-4, rtol=1e-5)
    assert torch.isneginf(lse[3]).all() and torch.equal(whole[3], torch.zeros_like(whole[3]))


def test_triton_one_split_still_returns_the_lse(backend, monkeypatch):
    """A launch of one split writes `out` itself and stores no log-sum-exp; asked for one, it runs
    an empty second split and the merge (attention_shared.launch_splits)."""
    from torch_fp4kv.ops import triton_decode

    monkeypatch.setattr(triton_decode, "triton_num_splits", lambda *args: 1)
    args, _ = _problem("nvfp4", batch=3, seq_lens=[64, 1, 0], device=TRITON_DEVICE)
    _assert_triton_matches_eager(args, backend)


@pytest.mark.parametrize("splits", [1, 3])
def test_a_nan_key_makes_the_rows_lse_nan_whichever_split_saw_it(backend, monkeypatch, splits):
    """A key block that decodes to NaN makes its sequence's scores NaN: eager's output rows and
    log-sum-exps are NaN, and the kernels' too, through a split merge (which must not take the NaN
    split for an empty one) or one split; the other sequence is untouched."""
    from torch_fp4kv.ops import gluon_decode, triton_decode
    from torch_fp4kv.testing.scenarios import poison_positions

    monkeypatch.setattr(triton_decode, "triton_num_splits", lambda *args: splits)
    monkeypatch.setattr(gluon_decode, "splits_for", lambda *args: splits)
    args, _ = _problem("nvfp4", batch=2, seq_lens=[64, 50], device=TRITON_DEVICE)
    poison_positions(list(args[1:5]), "nvfp4", args[5], 16, [(0, 40)])
    for name in ("eager", "triton"):
        backend(name)
        lse = torch.empty(args[0].shape[:2], device=TRITON_DEVICE)
        out = torch_fp4kv.decode_attention(*args, lse=lse)
        assert out[0].isnan().all() and lse[0].isnan().all(), name
        assert out[1].isfinite().all() and lse[1].isfinite().all(), name


def test_every_accepted_head_dim_has_a_launch_shape():
    from torch_fp4kv.ops import checks, triton_decode

    assert sorted(triton_decode.DECODE_LAUNCH) == sorted(checks.DECODE_HEAD_DIMS)


def test_split_count_fills_the_gpu_from_static_sizes(monkeypatch):
    """Splits fill the SMs `waves` times, hold at least 256 positions, and one 128-position tile when
    256 would leave SMs idle (the H100's 132 SMs, 8 KV heads, 4 waves)."""
    from torch_fp4kv.ops import triton_decode

    monkeypatch.setattr(triton_decode, "sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    assert triton_decode.triton_num_splits(1, 8, 1024, cpu, 4) == 8  # 32 programs of 256 < 132 SMs: 128 each
    assert triton_decode.triton_num_splits(8, 8, 1024, cpu, 4) == 4  # 256 programs of 256 fill the SMs
    assert triton_decode.triton_num_splits(1, 8, 8192, cpu, 4) == 32
    assert triton_decode.triton_num_splits(32, 8, 8192, cpu, 4) == 3  # 4 waves of 132 programs
    assert triton_decode.triton_num_splits(128, 8, 8192, cpu, 4) == 1


def test_empty_sequence_gives_zeros():
    args, _ = _problem("nvfp4", seq_lens=[0, 3, 0])
    out = torch_fp4kv.decode_attention(*args)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    assert out[1].abs().sum() > 0


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("page_size, hq, hkv, d", [(16, 8, 2, 64), (1, 4, 4, 128), (5, 6, 2, 64), (128, 2, 1, 64)])
def test_opcheck(recipe, page_size, hq, hkv, d):
    max_pages = max(1, 64 // page_size)
    (q, *rest), _ = _problem(recipe, hq=hq, hkv=hkv, d=d, page_size=page_size, max_pages=max_pages)
    out = torch.empty_like(q)
    k_data, k_scales, v_data, v_scales, table, lens, page, recipe_, k_g, v_g = rest
    torch.library.opcheck(torch.ops.fp4kv.decode_attention.default,
                          (out, q, k_data, k_scales, v_data, v_scales, table, lens, page, recipe_, d ** -0.5, k_g, v_g))
    torch.library.opcheck(torch.ops.fp4kv.decode_attention_with_lse.default,
                          (out, torch.empty(q.shape[:2]), q, k_data, k_scales, v_data, v_scales, table, lens, page,
                           recipe_, d ** -0.5, k_g, v_g))


CASES = [  # (batch, hq, hkv, d, page_size, max_pages, seq_lens)
    (3, 8, 2, 64, 16, 4, [5, 64, 0]),
    (2, 4, 1, 128, 1, 70, [70, 1]),
    (2, 8, 8, 64, 7, 10, [69, 33]),
    (1, 16, 2, 256, 32, 3, [90]),
    (1, 4, 1, 64, 16, 160, [2500]),  # ten splits on the interpreter: the merge reads them in two steps
]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("case", CASES, ids=[f"b{c[0]}-hq{c[1]}-hkv{c[2]}-d{c[3]}-page{c[4]}" for c in CASES])
def test_triton_matches_eager(backend, recipe, case):
    batch, hq, hkv, d, page, max_pages, lens = case
    args, _ = _problem(recipe, batch, hq, hkv, d, page, max_pages, lens, device=TRITON_DEVICE)
    _assert_triton_matches_eager(args, backend)


@settings(max_examples=12, deadline=None)
@given(recipe=st.sampled_from(RECIPES), batch=st.integers(1, 3), hkv=st.integers(1, 2), group=st.sampled_from([1, 3, 4]),
       d=st.sampled_from([64, 128]), page_size=st.sampled_from([1, 3, 16]), max_len=st.integers(1, 1100),
       seed=st.integers(0, 2**16))
def test_property_triton_matches_eager(recipe, batch, hkv, group, d, page_size, max_len, seed):
    """Random shapes, page sizes and ragged lengths (empty sequences, partly filled last pages, and
    up to five splits, some of them empty for the shorter sequences): Triton agrees with eager."""
    max_pages = -(-max_len // page_size)
    lens = torch.randint(0, max_pages * page_size + 1, (batch,), generator=torch.Generator().manual_seed(seed))
    args, _ = _problem(recipe, batch, hkv * group, hkv, d, page_size, max_pages, lens.tolist(), device=TRITON_DEVICE,
                       seed=seed)
    with pytest.MonkeyPatch.context() as mp:  # hypothesis runs many examples per fixture: patch here
        _assert_triton_matches_eager(args, lambda name: mp.setenv("TORCH_FP4KV_BACKEND", name))


def test_writes_into_out_and_rejects_bad_arguments():
    (q, k_data, k_scales, v_data, v_scales, table, lens, page, recipe, k_g, v_g), _ = _problem("nvfp4")
    out = torch.empty_like(q)
    assert torch_fp4kv.decode_attention(q, k_data, k_scales, v_data, v_scales, table, lens, page, recipe, k_g, v_g,
                                        out=out) is out
    call = dict(q=q, k_data=k_data, k_scales=k_scales, v_data=v_data, v_scales=v_scales, block_table=table,
                seq_lens=lens, page_size=page, recipe=recipe, k_global_scale=k_g, v_global_scale=v_g)
    bad = [
        (dict(q=q[:, :3]), ValueError, "q has 3 heads, not a multiple of the cache's 2 KV heads"),
        (dict(q=q.float()), TypeError, "q must have dtype"),
        (dict(block_table=table.long()), TypeError, "block_table must have dtype int32"),
        (dict(seq_lens=lens[:2]), ValueError, "seq_lens has 2 rows but q has batch 3"),
        (dict(page_size=0), ValueError, "page_size must be an int in"),
        (dict(page_size=3), ValueError, "not a whole number of pages of 3"),
        (dict(out=out[:, :4]), ValueError, "out must be a"),
        (dict(sm_scale=1), TypeError, "sm_scale must be a float"),
        (dict(lse=torch.empty(q.shape[:2], dtype=torch.float16)), TypeError, "lse must have dtype float32"),
        (dict(lse=torch.empty(q.shape)), ValueError, "lse must be a float32 tensor of shape"),
        (dict(lse=torch.empty(q.shape[1], q.shape[0]).t()), ValueError, "lse must be contiguous"),
        (dict(lse=q[:, :, 0].float().tolist()), TypeError, "lse must be a torch.Tensor"),
    ]
    for change, error, text in bad:
        before = out.clone()
        with pytest.raises(error, match=text):
            torch_fp4kv.decode_attention(**{**call, **change, "out": change.get("out", out)})
        assert torch.equal(out, before)  # nothing written


def test_compiles_fullgraph_without_recompiling_for_new_lengths():
    torch._dynamo.reset()
    counters.clear()
    (q, *rest), _ = _problem("nvfp4", seq_lens=[5, 9, 2])
    compiled = torch.compile(torch_fp4kv.decode_attention, fullgraph=True)
    for seed, lens in enumerate(([5, 9, 2], [6, 10, 3], [64, 1, 0])):
        rest[5] = torch.tensor(lens, dtype=torch.int32)
        torch.testing.assert_close(compiled(q, *rest), torch_fp4kv.decode_attention(q, *rest), atol=0, rtol=0)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@requires_cuda
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("context", [1, 1000, 8192, 32768])
def test_long_ragged_contexts_on_gpu(backend, recipe, context):
    page = 16
    max_pages = -(-context // page)
    lens = [context, max(1, context // 3), max(1, context - 17)]
    args, _ = _problem(recipe, 3, 32, 8, 128, page, max_pages, lens, device="cuda")
    _assert_triton_matches_eager(args, backend)


@requires_cuda
@pytest.mark.parametrize("recipe", RECIPES)
def test_one_split_writes_the_output_without_a_merge_on_gpu(backend, recipe):
    """The smallest batch that fills the GPU by itself gets one split, whose kernel writes `out`
    directly (the split rule of whichever kernel serves the call here)."""
    from torch_fp4kv.ops import decode, triton_decode

    hkv, page, max_pages, device = 8, 16, 32, torch.device("cuda")
    (q, *cache), _ = _problem(recipe, 1, 32, hkv, 128, page, max_pages, device="cuda")
    kv = PagedKV.from_op_args(*cache[:8], 128 ** -0.5, *cache[8:])[0]
    kernel = decode.hopper_kernel(q, kv, get_kv_recipe(recipe))
    if kernel:
        splits = lambda b: kernel.splits_for(b, hkv, page * max_pages, device)  # noqa: E731
    else:
        waves = triton_decode.DECODE_LAUNCH[128].waves
        splits = lambda b: triton_decode.triton_num_splits(b, hkv, page * max_pages, device, waves)  # noqa: E731
    batch = next(b for b in range(2, 1024) if splits(b) == 1)
    assert splits(batch - 1) > 1  # the batch, not the context, makes it one split
    args, _ = _problem(recipe, batch, 32, hkv, 128, page, max_pages, device="cuda")
    _assert_triton_matches_eager(args, backend)


def test_gluon_split_count_takes_whole_rounds_of_the_gpu():
    """Gluon kernel: the fewest splits (at most 32) that finish in the fewest rounds x (tiles + 1)
    of 64 positions, for an H100 running 528 programs at once."""
    gluon_decode = pytest.importorskip("torch_fp4kv.ops.gluon_decode")
    assert gluon_decode.gluon_num_splits(32, 8, 8192, 528) == 2  # 512 programs of 64 tiles: one round
    assert gluon_decode.gluon_num_splits(8, 8, 8192, 528) == 8  # 512 programs of 16 tiles
    assert gluon_decode.gluon_num_splits(1, 8, 1024, 528) == 16  # one tile each
    assert gluon_decode.gluon_num_splits(1, 8, 32768, 528) == 32  # capped
    assert gluon_decode.gluon_num_splits(128, 8, 8192, 528) == 1  # two rounds of 128 tiles beat more splits


HOPPER_CASES = [  # (batch, hq, hkv, d, page_size, max_pages, seq_lens)
    (3, 32, 8, 128, 16, 130, [2000, 1, 0]),
    (2, 16, 1, 64, 1, 700, [700, 129]),
    (4, 4, 4, 128, 128, 9, [1100, 128, 127, 5]),
    (1, 12, 4, 64, 5, 50, [249]),
    (3, 64, 2, 128, 16, 70, [1100, 17, 64]),  # 32 query heads per KV head: the widest tile
]


@pytest.mark.parametrize("buffer", ["k_data", "k_scales", "v_data", "v_scales"])
def test_gluon_decode_needs_caches_aligned_for_its_copies(buffer):
    """Its cp.async copies take their widths from the alignment Triton sees in the cache pointers: a
    cache that starts off 16 bytes (a view one byte into a bigger buffer) runs the Triton kernel."""
    gluon_decode = pytest.importorskip("torch_fp4kv.ops.gluon_decode")
    (q, *cache), _ = _problem("nvfp4", 2, 8, 2, 128)
    kv = PagedKV.from_op_args(*cache[:8], 128 ** -0.5, *cache[8:])[0]
    assert gluon_decode.supported(q, kv, get_kv_recipe("nvfp4"))
    tensor = getattr(kv, buffer)  # bytes (packed codes, scale bytes)
    shifted = torch.empty(tensor.numel() + 1, dtype=torch.uint8)[1:].view(tensor.dtype).view(tensor.shape)
    assert not gluon_decode.supported(q, kv._replace(**{buffer: shifted}), get_kv_recipe("nvfp4"))


@requires_hopper
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("case", HOPPER_CASES, ids=[f"b{c[0]}-hq{c[1]}-hkv{c[2]}-d{c[3]}-page{c[4]}" for c in HOPPER_CASES])
def test_gluon_and_triton_kernels_match_eager_on_hopper(recipe, case):
    """Both CUDA kernels, called directly (the op picks Gluon for these shapes on SM90), with and
    without the log-sum-exp."""
    from torch_fp4kv.ops import gluon_decode, triton_decode

    batch, hq, hkv, d, page, max_pages, lens = case
    (q, *cache), _ = _problem(recipe, batch, hq, hkv, d, page, max_pages, lens, device="cuda")
    k_data, k_scales, v_data, v_scales, table, seq_lens, page, _, k_g, v_g = cache
    kv = PagedKV(k_data, k_scales, v_data, v_scales, table, seq_lens, page, k_g, v_g)
    assert gluon_decode.supported(q, kv, get_kv_recipe(recipe)) == (recipe != "mxfp4" or d != 64)  # 2 scale bytes a row
    outputs = []
    kernels = [eager.decode_attention, triton_decode.decode_attention]
    if gluon_decode.supported(q, kv, get_kv_recipe(recipe)):
        kernels.append(gluon_decode.decode_attention)
    lses = []
    for kernel in kernels:
        out, with_lse, lse = torch.empty_like(q), torch.empty_like(q), torch.empty(q.shape[:2], device="cuda")
        kernel(out, q, kv, get_kv_recipe(recipe), d ** -0.5)
        kernel(with_lse, q, kv, get_kv_recipe(recipe), d ** -0.5, lse)
        torch.testing.assert_close(with_lse, out, atol=0, rtol=0)
        outputs.append(out.float())
        lses.append(lse)
    for actual, lse in zip(outputs[1:], lses[1:]):
        torch.testing.assert_close(actual, outputs[0], atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse, lses[0], atol=2e-2, rtol=2e-2)


@requires_cuda
def test_captured_in_a_cuda_graph_with_changing_lengths():
    (q, k_data, k_scales, v_data, v_scales, table, lens, page, recipe, k_g, v_g), _ = _problem(
        "nvfp4", batch=4, hq=32, hkv=8, d=128, max_pages=64, seq_lens=[1, 2, 3, 4], device="cuda")
    out = torch.empty_like(q)

    def step():
        torch_fp4kv.decode_attention(q, k_data, k_scales, v_data, v_scales, table, lens, page, recipe, k_g, v_g, out=out)

    step()  # compile the kernels before capturing
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for new_lens in ([1000, 5, 1024, 0], [17, 900, 3, 600]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q.normal_()
        graph.replay()
        expected = torch_fp4kv.decode_attention(q, k_data, k_scales, v_data, v_scales, table, lens, page, recipe, k_g, v_g)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)

