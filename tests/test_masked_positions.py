"""A position a query row may not see never changes that row, whatever the cache holds there.

Engines reuse pages without clearing them, and pad CUDA-graph batches with garbage tokens: a
stale NaN past seq_lens, or a later new token's NaN that the causal mask hides, must leave the
rows that do not see it exactly as they would be with finite values there (a masked weight drops
the position; multiplying its value by zero would give 0 x NaN = NaN). A row that does see a NaN
value gets NaN in that value's dimensions, a NaN key NaN in all of them. Every backend, every op
that reads positions, and FP4Cache's full-precision sink/recent merge.
"""

import pytest
import torch

import torch_fp4kv
from conftest import RECIPES, TRITON_DEVICE, requires_cuda
from torch_fp4kv.ops import FORMATS, triton_prefill, triton_verify
from torch_fp4kv.ops.backends import forced_backend

pytest.importorskip("triton")

BACKENDS = [("eager", "cpu"), ("triton", TRITON_DEVICE)]
PAGE = 16


def _layer(recipe: str, slots: int, hkv: int, d: int, seed: int):
    """A one-layer cache whose every slot holds finite random K/V."""
    g = torch.Generator().manual_seed(seed)
    layer = torch_fp4kv.FP4KVCache(recipe, slots, hkv, d, 1).layers[0]
    layer.store(torch.arange(slots), torch.randn(slots, hkv, d, generator=g), torch.randn(slots, hkv, d, generator=g))
    return layer


def _store_nan(layer, slots, k: bool, v: bool, blocks=slice(None)) -> None:
    """Make the K and/or V `blocks` of every head at `slots` NaN: their scale bytes become the
    format's NaN byte, what a store of a NaN or Inf value writes."""
    for wanted, scales, recipe in ((k, layer.k_scales, layer.k_recipe), (v, layer.v_scales, layer.v_recipe)):
        if wanted:
            scales.view(torch.uint8)[torch.as_tensor(slots), :, blocks] = FORMATS[recipe].scale_nan_byte


def _cache_args(layer, device):
    return [t.to(device) if t is not None else None
            for t in (layer.k_data, layer.k_scales, layer.v_data, layer.v_scales)], \
        [t.to(device) if t is not None else None for t in (layer.k_global_scale, layer.v_global_scale)]


def _decode(layer, q, table, seq_lens, backend, device):
    cache, scales = _cache_args(layer, device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=device)
    with forced_backend(backend):
        out = torch_fp4kv.decode_attention(q.to(device), *cache, table.to(device), seq_lens.to(device), PAGE,
                                           layer.recipe, *scales, lse=lse)
    return out.cpu(), lse.cpu()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("recipe", RECIPES)
def test_decode_ignores_stale_nan_past_seq_lens(recipe, head_dim, backend, device):
    """Pages past each sequence's length hold NaN keys and values: out and lse equal those of the
    same cache with finite values there, bit for bit."""
    batch, hkv, hq, pages = 4, 2, 8, 3
    clean = _layer(recipe, batch * pages * PAGE, hkv, head_dim, seed=0)
    stale = _layer(recipe, batch * pages * PAGE, hkv, head_dim, seed=0)
    table = torch.arange(batch * pages, dtype=torch.int32).view(batch, pages)
    seq_lens = torch.tensor([5, PAGE, 0, 2 * PAGE + 3], dtype=torch.int32)
    past = [int(table[b, p // PAGE]) * PAGE + p % PAGE for b in range(batch) for p in range(seq_lens[b], pages * PAGE)]
    _store_nan(stale, past, k=True, v=True)
    q = torch.randn(batch, hq, head_dim, generator=torch.Generator().manual_seed(1)).bfloat16()
    out, lse = _decode(stale, q, table, seq_lens, backend, device)
    want, want_lse = _decode(clean, q, table, seq_lens, backend, device)
    assert not out.isnan().any() and torch.equal(out, want)
    assert torch.equal(lse, want_lse)


def _extend(layer, q, cu, table, seq_lens, backend, device):
    cache, scales = _cache_args(layer, device)
    with forced_backend(backend):
        out = torch_fp4kv.extend_attention(q.to(device), cu.to(device), *cache, table.to(device), seq_lens.to(device),
                                           PAGE, layer.recipe, *scales)
    return out.cpu()


def _extend_case(recipe, head_dim, new_tokens, poison_k, poison_v):
    """Sequences with `new_tokens` new tokens each, whose last new token (and every position past
    seq_lens) holds NaN in K and/or V block 0 -> (clean layer, stale layer, q, cu, table, seq_lens,
    the rows that see a NaN)."""
    batch, hkv, hq, pages = len(new_tokens), 2, 8, 4
    clean = _layer(recipe, batch * pages * PAGE, hkv, head_dim, seed=2)
    stale = _layer(recipe, batch * pages * PAGE, hkv, head_dim, seed=2)
    table = torch.arange(batch * pages, dtype=torch.int32).view(batch, pages).flip(0).contiguous()
    seq_lens = torch.tensor([PAGE + 7 + 9 * b for b in range(batch)], dtype=torch.int32)
    slot = lambda b, p: int(table[b, p // PAGE]) * PAGE + p % PAGE  # noqa: E731
    block = FORMATS[stale.v_recipe].block_size
    last = [slot(b, int(seq_lens[b]) - 1) for b in range(batch) if new_tokens[b]]
    _store_nan(stale, last, k=poison_k, v=poison_v, blocks=0)
    past = [slot(b, p) for b in range(batch) for p in range(int(seq_lens[b]), pages * PAGE)]
    _store_nan(stale, past, k=True, v=True)
    cu = torch.tensor([0, *torch.tensor(new_tokens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hq, head_dim, generator=torch.Generator().manual_seed(3)).bfloat16()
    seeing = [int(cu[b + 1]) - 1 for b in range(batch) if new_tokens[b]]
    return clean, stale, q, cu, table, seq_lens, seeing, block


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("poison", ["k", "v"])
@pytest.mark.parametrize("new_tokens", [(3, 5, 0, 2), (4, 4, 4, 4)], ids=["ragged", "verify"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_extend_rows_do_not_see_later_nan(recipe, new_tokens, poison, backend, device):
    """A NaN in the last new token reaches only that token's row: in the NaN value block's
    dimensions (a NaN key: in all of them); every other row equals the clean cache's bit for bit."""
    clean, stale, q, cu, table, seq_lens, seeing, block = _extend_case(recipe, 128, new_tokens, poison == "k",
                                                                       poison == "v")
    out = _extend(stale, q, cu, table, seq_lens, backend, device)
    want = _extend(clean, q, cu, table, seq_lens, backend, device)
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[seeing] = False
    assert torch.equal(out[others], want[others])
    nan_dims = slice(None) if poison == "k" else slice(0, block)
    assert out[seeing][..., nan_dims].isnan().all()
    if poison == "v":
        assert torch.equal(out[seeing][..., block:], want[seeing][..., block:])


def _force_route(monkeypatch, route):
    """Send extend_attention's Triton calls down `route` on any device: the verify route (decode over
    the prefix + tail kernel), or the prefill kernel with 16-row programs over 32-position tiles."""
    if route == "verify":
        monkeypatch.setattr(triton_verify, "routed_tokens",
                            lambda q, kv, fmt: q.shape[0] // max(kv.block_table.shape[0], 1))
    else:
        launch = triton_prefill.PrefillLaunch(block_m=16, block_n=32, num_warps=4, num_stages=2, waves=4)
        monkeypatch.setattr(triton_prefill, "prefill_launch", lambda tokens, batch, hq, hkv, d: launch)


@pytest.mark.parametrize("poison", ["k", "v"])
@pytest.mark.parametrize("route, new_tokens", [("verify", (4, 4, 4, 4)), ("prefill", (4, 4, 4, 4)),
                                               ("prefill", (3, 5, 0, 2))])
def test_forced_routes_rows_do_not_see_later_nan(monkeypatch, route, new_tokens, poison):
    """The verify route and the prefill kernel, forced on the interpreter or any GPU: the same
    rule as the extend kernel."""
    _force_route(monkeypatch, route)
    clean, stale, q, cu, table, seq_lens, seeing, block = _extend_case("nvfp4", 128, new_tokens, poison == "k",
                                                                       poison == "v")
    out = _extend(stale, q, cu, table, seq_lens, "triton", TRITON_DEVICE)
    want = _extend(clean, q, cu, table, seq_lens, "triton", TRITON_DEVICE)
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[seeing] = False
    assert torch.equal(out[others], want[others])
    assert out[seeing][..., slice(None) if poison == "k" else slice(0, block)].isnan().all()


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("recipe", RECIPES)
def test_gpu_decode_and_extend_match_eager_with_stale_nan(recipe):
    """On the GPU's kernels (the Gluon decode and the verify route on SM90): the NaN positions
    of the tests above are the eager reference's, and the other values are close to it."""
    clean, stale, q, cu, table, seq_lens, seeing, block = _extend_case(recipe, 128, (4, 4, 4, 4), False, True)
    gpu = _extend(stale, q, cu, table, seq_lens, "triton", "cuda")
    ref = _extend(stale, q, cu, table, seq_lens, "eager", "cpu")
    assert torch.equal(gpu.isnan(), ref.isnan())
    torch.testing.assert_close(gpu.nan_to_num(), ref.nan_to_num(), atol=2e-2, rtol=2e-2)


# ---- FP4Cache: a reused cache (reset, every buffer left holding NaN) equals a fresh one ----------


def _run_chunks(layer, seed: int) -> list[torch.Tensor]:
    """Prefill chunks with left padding, then decode steps, through one FP4CacheLayer."""
    g = torch.Generator().manual_seed(seed)
    batch, hkv, hq, d = 2, 1, 2, 64
    pads = torch.tensor([[False, False, True, True, True], [True] * 5])
    one = torch.ones(batch, 1, dtype=torch.bool)
    outputs = []
    for real in [pads, torch.ones(batch, 4, dtype=torch.bool)] + [one] * 5:
        tokens = real.shape[1]
        q = torch.randn(batch, hq, tokens, d, generator=g)
        k, v = torch.randn(batch, hkv, tokens, d, generator=g), torch.randn(batch, hkv, tokens, d, generator=g)
        layer.update(k, v)
        outputs.append(layer.attend(q, k, v, real, 0.125))
    return outputs


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("sinks, recent", [(0, 0), (2, 3)])
def test_fp4cache_reused_with_stale_nan_equals_a_fresh_cache(window, sinks, recent):
    """An FP4CacheLayer that served another request, was reset, and holds NaN in every FP4 slot
    and every full-precision sink and ring entry gives the same outputs as a fresh one: prefill
    chunks read every slot with the positions they hold, decode merges FP4 with sinks and ring."""
    from torch_fp4kv.hf import FP4CacheLayer

    def layer():
        return FP4CacheLayer("nvfp4", max_cache_len=24, sliding_window=window, sink_tokens=sinks,
                             recent_tokens=recent)

    fresh = _run_chunks(layer(), seed=0)
    reused = layer()
    _run_chunks(reused, seed=1)
    reused.reset()
    for scales in (reused.fp4.k_scales, reused.fp4.v_scales):
        scales.view(torch.uint8).fill_(FORMATS["nvfp4"].scale_nan_byte)
    for buffer in reused.full_buffers:
        buffer.fill_(float("nan"))
    for got, want in zip(_run_chunks(reused, seed=0), fresh):
        assert not got.isnan().any()
        assert torch.equal(got, want)
