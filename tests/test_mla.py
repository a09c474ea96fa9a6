"""The latent-cache (MLA) ops: format bytes, schemas, opcheck, the eager reference against
attention over the dequantized latents, the slot rules, Triton against eager (the interpreter on
CPU), torch.compile, and the DeepSeek-V3-shaped decode layer. Small shapes (Hq 16, rank 64, rope
16) except in fake-tensor tests, which take DeepSeek-V3's 128 / 512 / 64."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.common_utils import TestCase

import torch_fp4kv  # noqa: F401  (registers the ops)
from conftest import TRITON_DEVICE, assert_same_bytes, requires_cuda
from torch_fp4kv.mla_methods import LatentLayerCache, get_latent_cache_method
from torch_fp4kv.methods import AttentionRead
from torch_fp4kv.ops import LATENT_RECIPES, eager, mla_decode_attention, mla_gather_dequantize, mla_store
from torch_fp4kv.ops.formats import BF16_LATENT_BYTES_PER_TOKEN
from torch_fp4kv.testing.mla import MLAConfig, MLADecodeLayer
from torch_fp4kv.testing.scenarios import random_bytes

LATENTS = sorted(LATENT_RECIPES)
RANK, ROPE, HQ = 64, 16, 16


def _cache(recipe, slots, rank=RANK, rope=ROPE, seed=0, device="cpu"):
    """A latent cache holding normal c_kv and k_pe in every slot, with calibrated-looking scales."""
    g = torch.Generator().manual_seed(seed)
    cache = LatentLayerCache(recipe, slots, rank, rope)
    if cache.latent_global_scale is not None:
        cache.latent_global_scale.fill_(0.004)
    cache.rope_global_scale.fill_(0.01)
    cache.store(torch.arange(slots), torch.randn(slots, rank, generator=g), torch.randn(slots, rope, generator=g))
    return cache.to(device)


def _decode_args(cache, batch, page_size, max_pages, seq_lens, seed=1, hq=HQ):
    g = torch.Generator().manual_seed(seed)
    pages = cache.latent_data.shape[0] // page_size
    table = torch.randint(0, pages, (batch, max_pages), generator=g, dtype=torch.int32)
    q = torch.randn(batch, hq, cache.latent_data.shape[2] * 2 + cache.rope_data.shape[2], generator=g)
    device = cache.latent_data.device
    return (q.bfloat16().to(device), table.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device))


def _decode(cache, q, table, lens, page_size, sm_scale=0.1):
    return mla_decode_attention(q, cache.latent_data, cache.latent_scales, cache.rope_data, table, lens, page_size,
                                cache.fmt.name, cache.latent_global_scale, cache.rope_global_scale, sm_scale=sm_scale)


def test_bytes_per_token_of_each_recipe():
    """c_kv 512 in FP4 (256 code bytes + 512/block scale bytes) and k_pe 64 in FP8: at most 0.33x BF16's 1152."""
    expected = {"nvfp4": 352, "nvfp4_4over6": 352, "blockfp4": 352, "mxfp4": 336}
    assert {name: r.bytes_per_token() for name, r in LATENT_RECIPES.items()} == expected
    assert BF16_LATENT_BYTES_PER_TOKEN == 1152 and max(expected.values()) <= 0.33 * 1152
    method = get_latent_cache_method("nvfp4")
    assert method.compute_cell_size(512, 64, 61) == 61 * 352
    cache = LatentLayerCache("nvfp4", 3, 512, 64)
    assert sum(cache.get_buffer(n)[0].numel() for n in ("latent_data", "latent_scales", "rope_data")) == 352


class TestMLASchemas(TestCase):
    def test_registered_schemas(self):
        """The op schemas are contract: any change shows up here as a diff (tests/expect/)."""
        self.assertExpected("\n".join(str(getattr(torch.ops.fp4kv, op).default._schema)
                                      for op in ("mla_store", "mla_decode_attention")))


@pytest.mark.parametrize("recipe", LATENTS)
def test_opcheck(recipe):
    fmt = LATENT_RECIPES[recipe]
    g = torch.Generator().manual_seed(0)
    caches = [random_bytes(g, (12, 1, w)) for w in (fmt.latent.data_width(RANK), fmt.latent.scales_width(RANK),
                                                     fmt.rope.data_width(ROPE))]
    caches[1] = torch.full_like(caches[1], 120)  # finite scales: opcheck compares outputs, NaN never equals NaN
    caches[2] = caches[2] & 0x77  # finite E4M3 bytes
    lg = torch.tensor([0.5]) if fmt.latent.has_global_scale else None
    rg = torch.tensor([0.25])
    for dtype in (torch.bfloat16, torch.float32):
        c_kv, k_pe = torch.randn(5, RANK, dtype=dtype), torch.randn(5, ROPE, dtype=dtype)
        torch.library.opcheck(torch.ops.fp4kv.mla_store.default,
                              (*[c.clone() for c in caches], torch.tensor([3, -1, 7, 3, 12]), c_kv, k_pe, recipe, lg, rg))
    q = torch.randn(3, 4, RANK + ROPE, dtype=torch.bfloat16)
    out, lse = q.new_empty(3, 4, RANK), torch.empty(3, 4)
    table = torch.tensor([[0, 2], [1, -1], [2, 0]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fp4kv.mla_decode_attention.default,
                          (out, lse, q, *caches, table, torch.tensor([7, 4, 0], dtype=torch.int32), 4, recipe, 0.1, lg, rg))


def test_fake_kernels_take_deepseek_v3_shapes():
    """Hq 128, kv_lora_rank 512, rope 64, page 64: shapes only, under a FakeTensorMode."""
    with FakeTensorMode():
        cache = LatentLayerCache("nvfp4", 64 * 1024, 512, 64)
        q = torch.empty(64, 128, 576, dtype=torch.bfloat16)
        out, lse = _decode(cache, q, torch.empty(64, 16, dtype=torch.int32), torch.empty(64, dtype=torch.int32), 64)
        cache.store(torch.empty(64, dtype=torch.int64), torch.empty(64, 512), torch.empty(64, 64))
    assert out.shape == (64, 128, 512) and lse.shape == (64, 128) and lse.dtype == torch.float32


@pytest.mark.parametrize("recipe", LATENTS)
def test_eager_equals_attention_over_the_dequantized_latents(recipe):
    page = 8
    cache = _cache(recipe, 8 * page)
    q, table, lens = _decode_args(cache, 3, page, 4, [5, 32, 0])
    out, lse = _decode(cache, q, table, lens, page, sm_scale=0.3)
    for b in range(3):
        slots = eager.paged_slots(table[b : b + 1], page)[0, : int(lens[b])]
        c_kv, k_pe = cache.gather(slots, torch.float32)
        scores = (q[b].float() @ torch.cat((c_kv, k_pe), -1).T) * 0.3  # [Hq, n]
        expected = scores.softmax(-1) @ c_kv if len(slots) else torch.zeros(HQ, RANK)
        torch.testing.assert_close(out[b].float(), expected, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(lse[b], torch.logsumexp(scores, -1), atol=1e-4, rtol=1e-5)
    assert torch.isneginf(lse[2]).all() and not out[2].any()


@pytest.mark.parametrize("backend_name", ["eager", "triton"])
def test_store_into_a_cache_of_no_slots_writes_nothing(backend, backend_name):
    backend(backend_name)
    fmt = LATENT_RECIPES["nvfp4"]
    caches = [torch.empty(0, 1, w, dtype=torch.uint8, device=TRITON_DEVICE)
              for w in (fmt.latent.data_width(RANK), fmt.latent.scales_width(RANK), fmt.rope.data_width(ROPE))]
    kv = torch.randn(3, RANK + ROPE, device=TRITON_DEVICE)
    mla_store(*caches, torch.tensor([0, -1, 2], device=TRITON_DEVICE), kv[:, :RANK], kv[:, RANK:], "nvfp4",
              torch.tensor([0.01], device=TRITON_DEVICE), torch.tensor([0.02], device=TRITON_DEVICE))


@pytest.mark.parametrize("recipe", LATENTS)
@pytest.mark.parametrize("backend_name", ["eager", "triton"])
def test_store_follows_the_slot_rules(backend, backend_name, recipe):
    """-1 padding and slots past the end are skipped, the last of duplicate slots wins, untouched
    slots keep their bytes; the bytes are quantize's of each tensor as a one-head cache."""
    backend(backend_name)
    fmt = LATENT_RECIPES[recipe]
    g = torch.Generator().manual_seed(2)
    slots = 10
    caches = [random_bytes(g, (slots, 1, w)).to(TRITON_DEVICE) for w in (fmt.latent.data_width(RANK),
                                                                         fmt.latent.scales_width(RANK),
                                                                         fmt.rope.data_width(ROPE))]
    before = [c.clone() for c in caches]
    # c_kv, k_pe: column slices of one projection; on the Triton backend's device (CUDA or the interpreter)
    kv = torch.randn(6, RANK + ROPE, generator=g).bfloat16().to(TRITON_DEVICE)
    loc = torch.tensor([4, -1, 1, 4, slots, 8], device=TRITON_DEVICE)
    lg = torch.tensor([0.01], device=TRITON_DEVICE) if fmt.latent.has_global_scale else None
    rg = torch.tensor([0.02], device=TRITON_DEVICE)
    mla_store(*caches, loc, kv[:, :RANK], kv[:, RANK:], recipe, lg, rg)
    winners = torch.tensor([2, 3, 5], device=TRITON_DEVICE)  # tokens that reach slots 1, 4, 8
    latent_data, latent_scales = eager.quantize(kv[winners, None, :RANK], fmt.latent, lg)
    rope_data, _ = eager.quantize(kv[winners, None, RANK:], fmt.rope, rg)
    written = loc[winners]
    for cache, expected in zip(caches, (latent_data, latent_scales, rope_data)):
        assert_same_bytes(cache[written], expected)
    untouched = torch.tensor([0, 2, 3, 5, 6, 7, 9], device=TRITON_DEVICE)
    for cache, original in zip(caches, before):
        assert_same_bytes(cache[untouched], original[untouched])
    gather_loc = torch.tensor([1, -1, 99], device=TRITON_DEVICE)
    c_kv, k_pe = mla_gather_dequantize(*caches, gather_loc, recipe, lg, rg, torch.float32)
    assert not c_kv[1:].any() and not k_pe[1:].any()
    assert_same_bytes(c_kv[0], eager.dequantize(latent_data[0, 0], latent_scales[0, 0], fmt.latent, lg, torch.float32))


@settings(max_examples=12, deadline=None)
@given(recipe=st.sampled_from(LATENTS), batch=st.integers(1, 3), page_size=st.sampled_from([1, 5, 16]),
       hq=st.sampled_from([1, 16, 20]), lengths=st.lists(st.integers(0, 48), min_size=3, max_size=3),
       seed=st.integers(0, 2**16))
def test_triton_matches_eager(recipe, batch, page_size, hq, lengths, seed):
    """Any page size, head count (padded to the tensor cores' 16, or two head blocks), lengths
    from 0 past the page table (capped there), page ids -1 and past the cache (zeros)."""
    from torch_fp4kv.ops.backends import forced_backend

    max_pages = -(-48 // page_size)
    cache = _cache(recipe, (max_pages + 1) * page_size, seed=seed, device=TRITON_DEVICE)
    q, table, lens = _decode_args(cache, batch, page_size, max_pages, lengths[:batch], seed, hq)
    table[0, 0] = -1
    table[-1, -1] = max_pages + 1
    results = []
    for name in ("eager", "triton"):
        with forced_backend(name):
            results.append(_decode(cache, q, table, lens, page_size))
    (out_e, lse_e), (out_t, lse_t) = results
    torch.testing.assert_close(out_t.float(), out_e.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse_t, lse_e, atol=2e-2, rtol=2e-2)


def test_triton_splits_merge_to_one_call(backend, monkeypatch):
    """Several splits of the context, merged by log-sum-exp, give eager's result (the split count
    forced, on the interpreter too)."""
    from torch_fp4kv.ops import triton_mla

    page = 16
    cache = _cache("nvfp4", 16 * page, device=TRITON_DEVICE)
    q, table, lens = _decode_args(cache, 2, page, 16, [256, 100])
    backend("eager")
    expected = _decode(cache, q, table, lens, page)
    for splits in (1, 3, 8):
        monkeypatch.setattr(triton_mla, "mla_num_splits", lambda *args, n=splits: n)
        backend("triton")
        actual = _decode(cache, q, table, lens, page)
        torch.testing.assert_close(actual[0].float(), expected[0].float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(actual[1], expected[1], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("splits", [1, 3])
def test_a_nan_latent_block_makes_the_rows_lse_nan_whichever_split_saw_it(backend, monkeypatch, splits):
    """A latent block that decodes to NaN is part of every key: eager's output rows and log-sum-exps
    of its sequence are NaN, and Triton's too, merged from several splits or from one."""
    from torch_fp4kv.ops import triton_mla

    monkeypatch.setattr(triton_mla, "mla_num_splits", lambda *args: splits)
    page = 16
    cache = _cache("nvfp4", 16 * page, device=TRITON_DEVICE)
    q, table, lens = _decode_args(cache, 2, page, 4, [60, 50])
    cache.latent_scales.view(torch.uint8)[int(table[0, 2]) * page + 5] = cache.fmt.latent.scale_nan_byte
    for name in ("eager", "triton"):
        backend(name)
        out, lse = _decode(cache, q, table, lens, page)
        assert out[0].isnan().all() and lse[0].isnan().all(), name
        assert out[1].isfinite().all() and lse[1].isfinite().all(), name


def _one_byte_in(x):
    """x's values in a buffer that starts one byte into its storage (a view carved from a pool)."""
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    view = flat[1:].view(x.shape)
    view.copy_(x)
    return view


@pytest.mark.parametrize("call, match", [
    (lambda c, q, t, s: _decode(c, q[..., :-1], t, s, 8), "q has width"),
    (lambda c, q, t, s: _decode(c, q.float(), t, s, 8), "q must have dtype"),
    (lambda c, q, t, s: _decode(c, q, t.long(), s, 8), "block_table must have dtype"),
    (lambda c, q, t, s: _decode(c, q, t, s, 3), "not a whole number of pages"),
    (lambda c, q, t, s: mla_decode_attention(q, c.latent_data, c.latent_scales, c.rope_data, t, s, 8, "nvfp4",
                                             c.latent_global_scale, c.rope_global_scale, out=q.clone()), "out must be"),
    (lambda c, q, t, s: mla_store(c.latent_data, c.latent_scales, c.rope_data, torch.arange(2), torch.ones(2, RANK),
                                  torch.ones(2, ROPE + 2), "nvfp4"), "k_pe has width"),
    (lambda c, q, t, s: mla_store(c.latent_data, c.latent_scales, c.rope_data[:, :, :8], torch.arange(2),
                                  torch.ones(2, RANK), torch.ones(2, 8), "nvfp4"), "rope_data"),
    (lambda c, q, t, s: mla_store(c.latent_data, c.latent_scales, c.rope_data, torch.arange(2), torch.ones(2, RANK),
                                  torch.ones(2, ROPE), "nvfp4", 0.5), "latent_global_scale"),
    (lambda c, q, t, s: mla_store(c.latent_data, c.latent_scales, c.rope_data, torch.arange(2), torch.ones(2, RANK),
                                  torch.ones(2, ROPE), "fp8"), "recipe='fp8'"),
    (lambda c, q, t, s: mla_store(c.latent_data, c.latent_scales, _one_byte_in(c.rope_data), torch.arange(2),
                                  torch.ones(2, RANK), torch.ones(2, ROPE), "nvfp4"), "rope_data starts 1 bytes"),
    (lambda c, q, t, s: mla_decode_attention(q, _one_byte_in(c.latent_data), c.latent_scales, c.rope_data, t, s, 8,
                                             "nvfp4", c.latent_global_scale, c.rope_global_scale),
     "latent_data starts 1 bytes"),
    (lambda c, q, t, s: mla_gather_dequantize(c.latent_data[:, :, :8].contiguous(), c.latent_scales[:, :, :1].contiguous(), c.rope_data,
                                              torch.arange(2), "nvfp4"), "width 16 is not a power of two >= 32"),
    (lambda c, q, t, s: mla_gather_dequantize(c.latent_data.view(-1, 2, RANK // 4), c.latent_scales.view(-1, 2, 2),
                                              c.rope_data, torch.arange(2), "nvfp4"), "latent_data must hold one head"),
])
def test_bad_input_names_the_argument_before_any_write(call, match):
    cache = _cache("nvfp4", 32)
    q, table, lens = _decode_args(cache, 2, 8, 4, [3, 9])
    snapshot = [b.clone() for b in cache.buffers()]
    with pytest.raises((TypeError, ValueError), match=match):
        call(cache, q, table, lens)
    for after, before in zip(cache.buffers(), snapshot):
        assert torch.equal(after, before)


class _StoreThenDecode(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cache = LatentLayerCache("nvfp4", 64, RANK, ROPE)

    def forward(self, loc, c_kv, k_pe, q, table, lens):
        self.cache.store(loc, c_kv, k_pe)
        return self.cache.decode(q, table, lens, 16, 0.1)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_fullgraph_no_breaks_no_recompile():
    compiled_module, eager_module = _StoreThenDecode(), _StoreThenDecode()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(compiled_module, backend=counter, fullgraph=True)
    for batch in (2, 3, 5):
        g = torch.Generator().manual_seed(batch)
        args = (torch.randperm(64, generator=g)[:batch], torch.randn(batch, RANK, generator=g),
                torch.randn(batch, ROPE, generator=g), torch.randn(batch, HQ, RANK + ROPE, generator=g).bfloat16(),
                torch.randint(0, 4, (batch, 4), generator=g, dtype=torch.int32),
                torch.randint(0, 65, (batch,), generator=g, dtype=torch.int32))
        for x in args:
            torch._dynamo.mark_dynamic(x, 0)
        for actual, expected in zip(compiled(*args), eager_module(*args)):
            assert_same_bytes(actual, expected)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counter.frame_count == 1, "a changing batch recompiled"
    for name, buffer in eager_module.cache.named_buffers():
        assert_same_bytes(compiled_module.cache.get_buffer(name), buffer)


def _layer_step(layer, batch, page_size, max_pages, device):
    """Fill every sequence's context but its last token, then one decode step's inputs."""
    c = layer.config
    g = torch.Generator().manual_seed(3)
    table = torch.randperm(batch * max_pages, generator=g).view(batch, max_pages).int().to(device)
    lens = torch.randint(1, max_pages * page_size + 1, (batch,), generator=g, dtype=torch.int32).to(device)
    slots = eager.paged_slots(table, page_size)
    context = torch.randn(slots.numel(), c.hidden_size, generator=g).to(device, torch.bfloat16) * 3
    _, _, c_kv, k_pe = layer.project(context, torch.arange(slots.shape[1], device=device).repeat(batch))
    layer.cache.calibrate(c_kv, k_pe)
    layer.cache.store(slots.flatten(), c_kv, k_pe)
    positions = lens.long() - 1
    loc = slots.gather(1, positions[:, None])[:, 0]
    hidden = torch.randn(batch, c.hidden_size, generator=g).to(device, torch.bfloat16)
    return hidden, positions, loc, table, lens


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("recipe", ["nvfp4", "mxfp4"])
def test_deepseek_shaped_layer_compiled_matches_unabsorbed_attention(recipe):
    """The absorbed decode (q_nope W_UK, attention in the latent space, W_UV after) compiled with
    fullgraph equals attention with keys and values up-projected from the dequantized latents."""
    layer = MLADecodeLayer(MLAConfig.tiny(), recipe, slots=8 * 16)
    hidden, positions, loc, table, lens = _layer_step(layer, 4, 16, 2, "cpu")
    out = torch.compile(layer, fullgraph=True)(hidden, positions, loc, table, lens, 16)
    expected = layer.reference_attention(hidden, positions, table, lens, 16)
    assert sum(counters["graph_break"].values()) == 0
    torch.testing.assert_close(out.float(), expected, atol=3e-2 * float(expected.abs().max()), rtol=0)


@requires_cuda
def test_deepseek_shaped_layer_replays_in_a_cuda_graph():
    layer = MLADecodeLayer(MLAConfig.tiny(), "nvfp4", slots=8 * 16, device="cuda")
    args = _layer_step(layer, 4, 16, 2, "cuda")
    expected = layer(*args, 16)
    step = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        out = step(*args, 16)
    assert "cudagraph_skips" not in counters["inductor"]
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_method_reads_decode_natively_and_prefill_dequantized():
    method = get_latent_cache_method("mxfp4")
    assert not method.needs_global_scale() and get_latent_cache_method("nvfp4").needs_global_scale()
    assert method.attention_read("decode") is AttentionRead.NATIVE_FP4
    assert method.attention_read("prefill") is AttentionRead.DEQUANTIZED
    layers = method.create_buffers(16, RANK, ROPE, 2)
    c_kv, k_pe = torch.randn(3, RANK), torch.randn(3, ROPE)
    method.quantize_and_store(1, torch.tensor([0, 5, 9]), c_kv, k_pe)
    back_c, back_k = method.dequantize_prev_kv(1, torch.tensor([0, 5, 9]), torch.float32)
    assert (back_c - c_kv).norm() < 0.15 * c_kv.norm() and (back_k - k_pe).norm() < 0.1 * k_pe.norm()
    assert not layers[0].latent_data.any()
    with pytest.raises(ValueError, match="name="):
        get_latent_cache_method("nvfp4+k8")


def test_sizes_the_decode_cannot_tile_are_refused_when_buffers_are_sized():
    """kv_lora_rank and rope_dim are checked where a pool is sized, not at its first store."""
    method = get_latent_cache_method("nvfp4")
    for sizes, match in (((500, 64), "kv_lora_rank: width 500 is not a power of two >= 32"),
                         ((512, 48), "rope_dim: width 48 is not a power of two >= 16"),
                         ((-512, 64), "kv_lora_rank: width -512"),
                         ((512.0, 64), "kv_lora_rank must be an int")):
        with pytest.raises((ValueError, TypeError), match=match):
            method.compute_cell_size(*sizes)
        with pytest.raises((ValueError, TypeError), match=match):
            method.create_buffers(16, *sizes, 1)
    assert method.layers is None


def test_calibrate_checks_its_samples_and_leaves_out_non_finite_rows():
    cache = LatentLayerCache("nvfp4", 8, RANK, ROPE)
    c_kv, k_pe = torch.randn(6, RANK), torch.randn(6, ROPE)
    for args, error, match in (((k_pe, c_kv), ValueError, "c_kv has width 16 but latent_data holds 64"),
                               ((c_kv[:, :7], k_pe), ValueError, "c_kv: head_dim 7"),
                               ((c_kv.int(), k_pe.int()), TypeError, "c_kv must have dtype"),
                               ((c_kv[:0], k_pe[:0]), ValueError, "c_kv holds no tokens")):
        with pytest.raises(error, match=match):
            cache.calibrate(*args)
    assert cache.latent_global_scale.item() == cache.rope_global_scale.item() == 1.0
    cache.calibrate(c_kv, k_pe)
    expected = (cache.latent_global_scale.clone(), cache.rope_global_scale.clone())
    c_bad, k_bad = torch.cat([c_kv, c_kv[:2]]), torch.cat([k_pe, k_pe[:2]])
    c_bad[6, 3], c_bad[7, 0], k_bad[6:, 1] = float("inf"), float("nan"), float("-inf")
    cache.calibrate(c_bad, k_bad)
    assert (cache.latent_global_scale, cache.rope_global_scale) == expected
    cache.calibrate(torch.full_like(c_kv, float("nan")), torch.full_like(k_pe, float("inf")))
    assert (cache.latent_global_scale, cache.rope_global_scale) == expected  # no finite row: unchanged
