"""Debug mode (TORCH_FP4KV_DEBUG=1, ops/debug.py): every op checks its index values on the host and
raises a ValueError naming the argument and the first bad index before anything is written; off,
the same inputs run by the input contract and the value checks never run."""

import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import torch_fp4kv
from conftest import TRITON_DEVICE, assert_same_bytes, random_kv, requires_cuda
from torch_fp4kv.testing.scenarios import strided_column
from torch_fp4kv.ops import DEBUG_ENV_VAR, debug, debug_checks
from torch_fp4kv.ops.backends import forced_backend

SLOTS, H, D = 64, 1, 64
PAGE, MAX_PAGES = 4, 3  # 16 pages in the cache; a page table covers 12 positions
PAGES = SLOTS // PAGE
HQ = 2
RECIPE = "nvfp4"


@pytest.fixture(autouse=True)
def _debug_variable_unset(monkeypatch):
    """Each test starts with debug mode off, whatever the environment running the suite says."""
    monkeypatch.delenv(DEBUG_ENV_VAR, raising=False)


def _cache(device="cpu"):
    """One layer's nvfp4 cache with every slot written."""
    layer = torch_fp4kv.FP4KVCache(RECIPE, SLOTS, H, D, 1).layers[0]
    layer.store(torch.arange(SLOTS), random_kv((SLOTS, H, D)), random_kv((SLOTS, H, D)))
    return layer.to(device)


def _buffers(layer):
    return [b.clone() for b in (layer.k_data, layer.v_data, layer.k_scales, layer.v_scales)]


def _store(layer, loc):
    """Store random K/V, one token per slot of loc."""
    shape = (loc.shape[0], H, D)
    layer.store(loc, random_kv(shape, device=loc.device), random_kv(shape, device=loc.device))


def _paged(layer, q, table, lens, out=None, lse=None, cu_seqlens_q=None):
    """decode_attention (with lse when given) or, with cu_seqlens_q, extend_attention over the layer."""
    cache = (layer.k_data, layer.k_scales, layer.v_data, layer.v_scales, table, lens, PAGE, RECIPE,
             layer.k_global_scale, layer.v_global_scale)
    if cu_seqlens_q is None:
        return torch_fp4kv.decode_attention(q, *cache, out=out, lse=lse)
    return torch_fp4kv.extend_attention(q, cu_seqlens_q, *cache, out=out)


# ---- engine-made metadata that is right: strided columns, -1 padding, duplicates, empty sequences ----


GOOD_LOC = [3, -1, 5, 3, 63, -1]  # padding twice, slot 3 twice, the last slot


def _good_table():
    """Column slices of a wider table: sequence 0 reaches all 3 pages, sequence 1 (length 5) its
    first 2 (then -1, never read), sequence 2 (empty) none (entries never read)."""
    wide = torch.full((3, 2 * MAX_PAGES), 99, dtype=torch.int32)
    wide[:, 1::2] = torch.tensor([[7, 0, PAGES - 1], [1, 7, -1], [-1, PAGES + 5, -7]], dtype=torch.int32)
    return wide[:, 1::2]


def _good_lens():
    return strided_column([PAGE * MAX_PAGES, 5, 0]).int()


GOOD_CU = [0, 2, 5, 5]  # 2, 3 and 0 new tokens; row 5 of 6 is padding
EXTEND_ROWS = 6


def _engine_step(layer, device):
    """Store, gather, decode (with and without lse) and extend on right engine-made metadata."""
    loc = strided_column(GOOD_LOC).int().to(device)
    _store(layer, loc)
    read = torch_fp4kv.gather_dequantize(layer.k_data, layer.k_scales, loc, RECIPE, layer.k_global_scale,
                                         torch.float32)
    table, lens = _good_table().to(device), _good_lens().to(device)
    q = random_kv((3, HQ, D), device=device)
    lse = torch.empty(3, HQ, device=device)
    decoded = _paged(layer, q, table, lens)
    with_lse = _paged(layer, q, table, lens, lse=lse)
    extended = _paged(layer, random_kv((EXTEND_ROWS, HQ, D), device=device), table, lens,
                      cu_seqlens_q=strided_column(GOOD_CU).int().to(device))
    return [*_buffers(layer), read, decoded, with_lse, lse, extended]


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_engine_made_metadata_passes_and_gives_the_same_results(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    device = "cpu" if backend == "eager" else TRITON_DEVICE
    results = {}
    for on in (True, False):
        torch.manual_seed(0)
        layer = _cache(device)  # filled on the CPU, by the selection table's backend
        with forced_backend(backend), debug_checks(on):
            results[on] = _engine_step(layer, device)
    for checked, unchecked in zip(results[True], results[False]):
        assert_same_bytes(checked, unchecked)


# ---- bad values: raised in debug mode before anything is written, run by contract without it ----


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("values, text", [
    ([0, 1, 64, 5000], r"loc\[2\] = 64 is outside the cache's 64 slots"),
    ([0, -2, 70], r"loc\[1\] = -2 is outside the cache's 64 slots"),
    ([-1, 3, 3, -5000], r"loc\[3\] = -5000 is outside"),
])
def test_store_rejects_a_slot_outside_the_cache_and_writes_nothing(values, text, dtype):
    layer = _cache()
    before = _buffers(layer)
    loc = strided_column(values).to(dtype)
    with debug_checks(), pytest.raises(ValueError, match=text):
        _store(layer, loc)
    for buffer, start in zip(_buffers(layer), before):
        assert_same_bytes(buffer, start)
    _store(layer, loc)  # by contract: the slots inside the cache are written, the others skipped
    inside = sorted({s for s in values if 0 <= s < SLOTS})
    for buffer, start in zip(_buffers(layer), before):
        changed = (buffer != start).flatten(1).any(1).nonzero().flatten().tolist()
        assert set(changed) <= set(inside) and changed, (changed, inside)


def test_gather_rejects_a_slot_outside_the_cache():
    layer = _cache()
    loc = torch.tensor([2, -1, SLOTS])
    with debug_checks(), pytest.raises(ValueError, match=r"loc\[2\] = 64 is outside the cache's 64 slots"):
        torch_fp4kv.gather_dequantize(layer.k_data, layer.k_scales, loc, RECIPE, layer.k_global_scale)
    read = torch_fp4kv.gather_dequantize(layer.k_data, layer.k_scales, loc, RECIPE, layer.k_global_scale)
    assert (read[1:] == 0).all() and (read[0] != 0).any()


def _bad_lens(index, value):
    def change(table, lens):
        lens[index] = value
    return change


def _bad_page(b, p, value):
    def change(table, lens):
        table[b, p] = value
    return change


PAGED_CASES = [
    ("length past the table", _bad_lens(0, PAGE * MAX_PAGES + 1), r"seq_lens\[0\] = 13 is outside \[0, 12\]"),
    ("negative length", _bad_lens(2, -1), r"seq_lens\[2\] = -1 is outside \[0, 12\]"),
    ("page past the cache", _bad_page(1, 1, PAGES), r"block_table\[1, 1\] = 16 is outside the cache's 16 pages"),
    ("page -1", _bad_page(0, 0, -1), r"block_table\[0, 0\] = -1 is outside the cache's 16 pages"),
    ("a longer sequence reaches a -1 page", _bad_lens(1, 9),
     r"block_table\[1, 2\] = -1 is outside .* \(sequence 1, of length 9, reaches its first 3 pages\)"),
]


@pytest.mark.parametrize("with_lse", [False, True], ids=["decode", "decode with lse"])
@pytest.mark.parametrize("change, text", [c[1:] for c in PAGED_CASES], ids=[c[0] for c in PAGED_CASES])
def test_decode_rejects_bad_lengths_and_pages_and_writes_nothing(change, text, with_lse):
    layer, table, lens = _cache(), _good_table(), _good_lens()
    change(table, lens)
    q = random_kv((3, HQ, D))
    out, lse = torch.full_like(q, float("nan")), torch.full((3, HQ), float("nan")) if with_lse else None
    with debug_checks(), pytest.raises(ValueError, match=text):
        _paged(layer, q, table, lens, out, lse)
    assert out.isnan().all() and (lse is None or lse.isnan().all())
    _paged(layer, q, table, lens, out, lse)  # by contract: runs, pages outside read as zeros
    assert not out.isnan().any()


def test_decode_without_debug_mode_reads_pages_outside_the_cache_as_zeros():
    layer, table, lens = _cache(), _good_table(), _good_lens()
    q = random_kv((3, HQ, D))
    table[0, 1] = PAGES + 3
    outside = _paged(layer, q, table, lens)
    for buffer in (layer.k_data, layer.v_data, layer.k_scales, layer.v_scales):
        buffer[2 * PAGE : 3 * PAGE] = 0  # page 2, read by no sequence, all zeros
    table[0, 1] = 2
    assert_same_bytes(outside, _paged(layer, q, table, lens))


def _bad_offsets(values):
    def change(table, lens):
        return torch.tensor(values, dtype=torch.int32)
    return change


EXTEND_CASES = PAGED_CASES + [
    ("negative first offset", _bad_offsets([-1, 2, 5, 5]), r"cu_seqlens_q\[0\] = -1 is outside q's 6 rows"),
    ("decreasing offsets", _bad_offsets([0, 3, 2, 5]), r"cu_seqlens_q\[2\] = 2 is below cu_seqlens_q\[1\] = 3"),
    ("offset past q", _bad_offsets([0, 2, 5, 7]), r"cu_seqlens_q\[3\] = 7 is outside q's 6 rows"),
    ("more new tokens than the length", _bad_offsets([0, 2, 5, 6]),
     r"seq_lens\[2\] = 0 is less than sequence 2's 1 new tokens \(cu_seqlens_q\[3\] - cu_seqlens_q\[2\]\)"),
]


@pytest.mark.parametrize("change, text", [c[1:] for c in EXTEND_CASES], ids=[c[0] for c in EXTEND_CASES])
def test_extend_rejects_bad_offsets_lengths_and_pages_and_writes_nothing(change, text):
    layer, table, lens = _cache(), _good_table(), _good_lens()
    cu = change(table, lens)
    cu = strided_column(GOOD_CU).int() if cu is None else strided_column(cu)
    q = random_kv((EXTEND_ROWS, HQ, D))
    out = torch.full_like(q, float("nan"))
    with debug_checks(), pytest.raises(ValueError, match=text):
        _paged(layer, q, table, lens, out, cu_seqlens_q=cu)
    assert out.isnan().all()
    _paged(layer, q, table, lens, out, cu_seqlens_q=cu)  # by contract: every value has a result
    assert not out.isnan().any()


# ---- the switch --------------------------------------------------------------------------------


def test_off_the_value_checks_never_run(monkeypatch):
    """Off (unset or 0), an op reads the variable and nothing else: no host sync on the hot path."""

    def must_not_run(*args):
        raise AssertionError("a debug value check ran with debug mode off")

    for name in ("loc_values", "paged_kv_values", "cu_seqlens_q_values"):
        monkeypatch.setattr(debug, name, must_not_run)
    for value in (None, "0", ""):
        if value is None:
            monkeypatch.delenv(DEBUG_ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(DEBUG_ENV_VAR, value)
        layer = _cache()
        _store(layer, torch.tensor([0, SLOTS]))
        torch_fp4kv.gather_dequantize(layer.k_data, layer.k_scales, torch.tensor([SLOTS]), RECIPE, layer.k_global_scale)
        table, lens = _good_table(), _good_lens()
        table[0, 0] = -1
        _paged(layer, random_kv((3, HQ, D)), table, lens)
        _paged(layer, random_kv((3, HQ, D)), table, lens, lse=torch.empty(3, HQ))
        _paged(layer, random_kv((EXTEND_ROWS, HQ, D)), table, lens, cu_seqlens_q=torch.tensor([0, 9, 2, 5]).int())


def test_the_variable_is_read_at_every_call_and_a_typo_raises(monkeypatch):
    layer = _cache()
    bad = torch.tensor([SLOTS])
    monkeypatch.setenv(DEBUG_ENV_VAR, "1")
    with pytest.raises(ValueError, match=r"loc\[0\] = 64"):
        _store(layer, bad)
    monkeypatch.setenv(DEBUG_ENV_VAR, "0")
    _store(layer, bad)
    monkeypatch.setenv(DEBUG_ENV_VAR, "true")
    with pytest.raises(ValueError, match=r"TORCH_FP4KV_DEBUG='true' is neither 1 \(debug checks on\) nor 0"):
        _store(layer, torch.tensor([0]))


def test_debug_checks_sets_and_restores_the_variable(monkeypatch):
    with debug_checks():
        assert os.environ[DEBUG_ENV_VAR] == "1"
        with debug_checks(False):
            assert os.environ[DEBUG_ENV_VAR] == "0"
        assert os.environ[DEBUG_ENV_VAR] == "1"
    assert DEBUG_ENV_VAR not in os.environ
    monkeypatch.setenv(DEBUG_ENV_VAR, "0")
    with debug_checks():
        pass
    assert os.environ[DEBUG_ENV_VAR] == "0"


def test_nothing_is_checked_while_a_cuda_graph_is_captured(monkeypatch):
    """A host sync is illegal during capture, and replays never run Python: capture stays possible."""
    cuda = torch.device("cuda")
    with debug_checks():
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert not debug.enabled(cuda)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        assert debug.enabled(cuda)


@requires_cuda
def test_a_checked_step_captures_in_a_cuda_graph():
    layer, table, lens = _cache("cuda"), _good_table().cuda(), _good_lens().cuda()
    q = random_kv((3, HQ, D), device="cuda")
    out = torch.empty_like(q)
    with debug_checks():
        _paged(layer, q, table, lens, out)  # checked, and compiles the kernels before capturing
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _paged(layer, q, table, lens, out)
        graph.replay()
    torch.testing.assert_close(out, _paged(layer, q, table, lens), atol=0, rtol=0)


# ---- torch.compile ----------------------------------------------------------------------------


class StoreThenDecode(torch.nn.Module):
    """One decode step's cache traffic: store this step's K/V, attend over each sequence's pages."""

    def __init__(self):
        super().__init__()
        self.layer = _cache()

    def forward(self, loc, k, v, q, table, lens):
        self.layer.store(loc, k, v)
        return self.layer.decode(q, table, lens, PAGE)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_step_checks_at_run_time_without_graph_breaks():
    compile_counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(StoreThenDecode(), backend=compile_counter, fullgraph=True)

    def step(loc, table=None, lens=None):
        loc = torch.tensor(loc)
        k, v, q = random_kv((3, H, D)), random_kv((3, H, D)), random_kv((3, HQ, D))
        return compiled(loc, k, v, q, _good_table() if table is None else table, _good_lens() if lens is None else lens)

    with debug_checks():
        assert not step([4, -1, 4]).isnan().any()
        assert not step([5, 6, 7]).isnan().any()
        with pytest.raises(ValueError, match=r"loc\[1\] = 64 is outside the cache's 64 slots"):
            step([5, SLOTS, 7])
        with pytest.raises(ValueError, match=r"seq_lens\[1\] = 13 is outside \[0, 12\]"):
            step([5, 6, 7], lens=strided_column([0, 13, 0]).int())
    step([5, SLOTS, 7])  # off: the same compiled graph runs it by contract
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert compile_counter.frame_count == 1, "debug mode recompiled"
