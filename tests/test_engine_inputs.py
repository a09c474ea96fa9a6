"""Inputs as engines make them: sliced metadata, padding, out-of-range page ids, duplicate slots,
head slices of a cache, unusable global scales, values at the edge of a dtype's range.

The rules (README, "Input contract") are checked on the eager reference here, and every other
backend is checked against eager on the scenarios of `torch_fp4kv.testing.scenarios`, which
`python -m torch_fp4kv.check` runs (the Triton kernels compiled on a GPU, under the interpreter on
CPU)."""

import os
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import torch_fp4kv
from conftest import RECIPES, TRITON_DEVICE, assert_same_bytes, random_kv
from torch_fp4kv import check
from torch_fp4kv.testing import scenarios
from torch_fp4kv.ops import FORMATS, eager
from torch_fp4kv.ops.backends import ENV_VAR, Backend, forced_backend

pytest.importorskip("triton")

SCENARIOS = scenarios.scenarios()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_triton_matches_eager_on_engine_made_inputs(scenario):
    expected = scenarios.reference(scenario)
    problem = scenarios.mismatch(scenario, scenarios.run_with(scenario, Backend.TRITON, TRITON_DEVICE), expected)
    assert problem is None, problem


def test_close_comparison_is_not_loosened_by_an_empty_rows_infinite_lse():
    """An empty sequence's log-sum-exp is -inf: it must match in place and sign, and never set the
    tolerance for the other rows (2e-2 of the largest finite expected magnitude)."""
    expected = torch.tensor([[3.0, float("-inf")], [1.0, float("nan")]])
    assert scenarios.close_mismatch(expected.clone(), expected) is None
    wrong_row = torch.tensor([[3.5, float("-inf")], [1.0, float("nan")]])
    assert scenarios.close_mismatch(wrong_row, expected) == "max |diff| 0.5 > 0.06"
    moved = torch.tensor([[float("-inf"), 3.0], [1.0, float("nan")]])
    assert scenarios.close_mismatch(moved, expected) == "infinities at different positions"
    signed = torch.tensor([[3.0, float("inf")], [1.0, float("nan")]])
    assert scenarios.close_mismatch(signed, expected) == "infinities at different positions"
    assert scenarios.close_mismatch(torch.full((2,), float("-inf")), torch.full((2,), float("-inf"))) is None


def test_lse_outputs_are_compared_per_element():
    """A log-sum-exp is checked against its own expected value: rows of lse 4 and 1500 in one tensor
    do not let the first be off by 28 (2e-2 of the largest), and the MLA decode scenarios mark theirs."""
    expected = torch.tensor([4.0, 1500.0, float("-inf")])
    assert scenarios.lse_mismatch(torch.tensor([4.05, 1510.0, float("-inf")]), expected) is None
    assert scenarios.lse_mismatch(torch.tensor([32.0, 1500.0, float("-inf")]), expected) == \
        "1 log-sum-exps off by more than 2e-2 * max(1, |expected|)"
    assert scenarios.lse_mismatch(torch.tensor([4.0, 1500.0, 0.0]), expected) == "infinities at different positions"
    assert all(s.lse_outputs == (1,) for s in SCENARIOS if s.op == "mla_decode_attention")


def _one_dequantize(call) -> scenarios.Scenario:
    return scenarios.Scenario("one", "dequantize", "nvfp4", torch.float32, lambda: [torch.ones(2)], call)


def test_check_cli_claims_only_what_it_compared(capsys, monkeypatch):
    """`python -m torch_fp4kv.check` names each backend that could not run once, with the reason,
    ends with the backends it compared, and exits 1 when one differs from eager."""
    monkeypatch.setattr(check, "scenarios", lambda: SCENARIOS[:5])
    assert check.main(["--device", TRITON_DEVICE]) == 0
    out = capsys.readouterr().out
    assert out.count("triton: ok") == 5 and out.endswith(" compared, all match\n") and "triton on 5" in out
    not_run = [line for line in out.splitlines() if line.startswith("not run: ")]
    assert len(not_run) == len(set(not_run)) and "n/a" not in out

    monkeypatch.setattr(check, "scenarios", lambda: [_one_dequantize(lambda x: [x + (os.environ[ENV_VAR] == "triton")])])
    assert check.main(["--device", TRITON_DEVICE]) == 1
    out = capsys.readouterr().out
    assert "triton: MISMATCH: output 0: 2 of 2 elements differ" in out and out.endswith(", 1 mismatches\n")

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # on the CPU, only the reference can run now
    assert check.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "one" + " " * 56 + "nothing to compare" in out
    assert "not run: triton on 1 scenario: Triton kernels need a CUDA device" in out
    assert out.endswith("1 scenario: nothing compared (no backend but the eager reference runs here)\n")


def test_check_only_naming_no_scenario_is_an_error(capsys):
    assert check.main(["--device", "cpu", "--only", "no-such-op"]) == 2
    assert "--only 'no-such-op' names no scenario" in capsys.readouterr().err


def test_soak_draws_every_kind():
    """The soak's random rounds reach every op the check covers, the latent-cache ones included."""
    rng = random.Random(0)
    drawn = {scenarios.random_scenario(rng).name.split("/")[0] for _ in range(100)}
    assert drawn == set(scenarios.SOAK_KINDS)


def test_check_soak_compares_mla_rounds(capsys, monkeypatch):
    """`python -m torch_fp4kv.check --soak N --only mla-` compares each MLA round it draws (seed 1:
    a store and a decode with stale NaN among 8 rounds) with eager."""
    drawn = []

    def recording(rng):
        drawn.append(scenarios.random_scenario(rng))
        return drawn[-1]

    monkeypatch.setattr(check, "scenarios", lambda: [])
    monkeypatch.setattr(check, "random_scenario", recording)
    assert check.main(["--device", TRITON_DEVICE, "--soak", "8", "--seed", "1", "--only", "mla-"]) == 0
    mla = [s.name for s in drawn if s.name.startswith("mla-")]
    assert {name.split("/")[0] for name in mla} == {"mla-store", "mla-decode"}
    assert any(name.endswith("/stale-nan") for name in mla)
    assert capsys.readouterr().out.endswith(f"{len(mla)} scenarios: eager vs triton on {len(mla)} compared, all match\n")


# ---- the rules, on the reference ----------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_duplicate_slots_last_token_wins_and_unnamed_slots_keep_their_bytes(recipe):
    scenario = scenarios.store_engine_slots(recipe)  # loc (3, -1, 5, 3, 12, 7, 5) over 12 slots
    *starting, _, k, v, kg, vg = scenario.inputs()
    with forced_backend("eager"):
        after = scenario.run("cpu")
    fmt = FORMATS[recipe]
    (k_data, k_scales), (v_data, v_scales) = eager.quantize(k, fmt, kg), eager.quantize(v, fmt, vg)
    winners = {3: 3, 5: 6, 7: 5}  # slot -> last token naming it
    for buffer, start, new in zip(after, starting, (k_data, k_scales, v_data, v_scales)):
        for slot in range(12):
            expected = new[winners[slot]] if slot in winners else start[slot]
            assert_same_bytes(buffer[slot], expected)


@pytest.mark.parametrize("in_kernel", [True, False], ids=["later tokens compared", "slots claimed first"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_both_paths_of_the_duplicate_slot_rule_match_eager(monkeypatch, in_kernel, recipe):
    """Small stores compare each token with the later ones in the Triton kernel; large ones claim slots first."""
    from torch_fp4kv.ops import triton_kernels

    monkeypatch.setattr(triton_kernels, "MAX_TOKENS_DEDUPLICATED_IN_KERNEL", 1024 if in_kernel else 0)
    scenario = scenarios.store_engine_slots(recipe, tokens=150, heads=3, slots=18,
                                            loc=[(7 * i) % 21 - 1 for i in range(150)])
    expected = scenarios.reference(scenario)
    assert scenarios.mismatch(scenario, scenarios.run_with(scenario, Backend.TRITON, TRITON_DEVICE), expected) is None


def test_last_writer_slots_rule():
    from torch_fp4kv.ops.slots import last_writer_slots

    loc = torch.tensor([[4, 0], [2, 1], [4, 2], [-1, 3], [9, 4], [2, 5], [4, 6]])[:, 0]
    assert last_writer_slots(loc, 9).tolist() == [-1, -1, -1, -1, -1, 2, 4]
    assert last_writer_slots(loc.int(), 10).tolist() == [-1, -1, -1, -1, 9, 2, 4]


@pytest.mark.parametrize("value", [-1.0, 0.0, float("nan"), float("inf")])
def test_unusable_global_scale_gives_nan(value):
    x = random_kv((4, 2, 64))
    g = torch.tensor([value])
    data, scales = torch_fp4kv.quantize(x, "nvfp4", g)
    assert (data == 0).all() and (scales == FORMATS["nvfp4"].scale_nan_byte).all()
    good = torch_fp4kv.quantize(x, "nvfp4")
    assert torch_fp4kv.dequantize(*good, "nvfp4", g, torch.float32).isnan().all()


def test_zero_dim_global_scale_equals_shape_one():
    x = random_kv((4, 2, 64))
    for a, b in zip(torch_fp4kv.quantize(x, "nvfp4", torch.tensor(0.37)), torch_fp4kv.quantize(x, "nvfp4", torch.tensor([0.37]))):
        assert_same_bytes(a, b)
    data, scales = torch_fp4kv.quantize(x, "nvfp4")
    out = torch_fp4kv.dequantize(data, scales, "nvfp4", torch.tensor(0.37))
    assert out.shape == x.shape
    assert_same_bytes(out, torch_fp4kv.dequantize(data, scales, "nvfp4", torch.tensor([0.37])))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_blockfp4_saturates_instead_of_overflowing(dtype):
    """blockfp4 rounds 60000 up to 4 * 2^14 = 65536 (past fp16), the top of float32 up to 2^128."""
    largest = torch.finfo(dtype).max
    x = torch.tensor([largest, -largest, 60000.0] + [1.0] * 13).to(dtype)
    out = torch_fp4kv.dequantize(*torch_fp4kv.quantize(x, "blockfp4"), "blockfp4", None, dtype)
    assert out.isfinite().all()
    assert out[0] == largest and out[1] == -largest


def _decode_reference(q, k_data, k_scales, v_data, v_scales, table, lens, page, recipe, kg, vg):
    """SDPA over gather_dequantize of each sequence's slots: pages outside the cache read as zeros."""
    out = []
    for b in range(q.shape[0]):
        slots = eager.paged_slots(table[b : b + 1], page)[0, : int(lens[b])]
        k = torch_fp4kv.gather_dequantize(k_data, k_scales, slots, recipe, kg, torch.float32)
        v = torch_fp4kv.gather_dequantize(v_data, v_scales, slots, recipe, vg, torch.float32)
        if slots.numel() == 0:
            out.append(torch.zeros(q.shape[1:]))
            continue
        out.append(F.scaled_dot_product_attention(q[b : b + 1, :, None].float(), k.transpose(0, 1)[None],
                                                  v.transpose(0, 1)[None], enable_gqa=True)[0, :, 0])
    return torch.stack(out)


@pytest.mark.parametrize("recipe", RECIPES)
def test_pages_outside_the_cache_read_as_zeros_in_decode(recipe):
    g = torch.Generator().manual_seed(1)
    hkv, d, page, pages = 2, 64, 4, 6
    cache = torch_fp4kv.FP4KVCache(recipe, pages * page, hkv, d, 1).layers[0]
    cache.store(torch.arange(pages * page), torch.randn(pages * page, hkv, d, generator=g),
                torch.randn(pages * page, hkv, d, generator=g))
    table = torch.tensor([[0, -1, 2, 7], [2**31 - 1, 1, 3, -5], [4, 5, 6, 0]], dtype=torch.int32)
    lens = torch.tensor([15, 16, 0], dtype=torch.int32)
    q = torch.randn(3, 4, d, generator=g).bfloat16()
    args = (q, cache.k_data, cache.k_scales, cache.v_data, cache.v_scales, table, lens, page, recipe,
            cache.k_global_scale, cache.v_global_scale)
    with forced_backend("eager"):
        out = torch_fp4kv.decode_attention(*args)
    torch.testing.assert_close(out.float(), _decode_reference(*args), atol=1e-2, rtol=1e-2)
    assert not out.isnan().any()


# ---- any layout, any padding: every backend writes and reads the same bytes ------------------------


LAYOUTS = ("contiguous", "column", "reversed")


def _laid_out(values: list[int], layout: str) -> torch.Tensor:
    if layout == "column":
        return scenarios.strided_column(values, width=3)
    if layout == "reversed":
        return torch.tensor(values[::-1]).flip(0)  # a negative stride
    return torch.tensor(values)


@settings(max_examples=20, deadline=None)
@given(
    recipe=st.sampled_from(RECIPES),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([32, 64, 128]),
    slots=st.integers(1, 12),
    loc_values=st.lists(st.integers(-3, 14), min_size=1, max_size=10),
    layout=st.sampled_from(LAYOUTS),
    loc_dtype=st.sampled_from([torch.int32, torch.int64]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
)
def test_property_store_and_gather_with_engine_metadata(recipe, heads, head_dim, slots, loc_values, layout, loc_dtype,
                                                        dtype):
    if head_dim % FORMATS[recipe].block_size:
        head_dim = 64
    g = torch.Generator().manual_seed(len(loc_values) * 131 + slots)
    block = FORMATS[recipe].block_size
    start = [scenarios.random_bytes(g, (slots, heads, last)) for last in (head_dim // 2, head_dim // block,
                                                                           head_dim // 2, head_dim // block)]
    tokens = len(loc_values)
    k = scenarios.spread_normal(g, (tokens, heads, head_dim), dtype)
    v = scenarios.spread_normal(g, (tokens, heads, head_dim), dtype)
    loc = _laid_out(loc_values, layout).to(loc_dtype)
    gs = scenarios.global_scale_for(recipe)
    results = {}
    for backend, device in (("eager", "cpu"), ("triton", TRITON_DEVICE)):
        caches = [b.clone().to(device) for b in start]
        with forced_backend(backend):
            torch_fp4kv.quantize_and_store(*caches, loc.to(device), k.to(device), v.to(device), recipe,
                                           *(scenarios.on_device(device, gs, gs)))
            read = torch_fp4kv.gather_dequantize(caches[0][:, heads - 1:], caches[1][:, heads - 1:], loc.to(device),
                                                 recipe, *scenarios.on_device(device, gs), torch.float32)
        results[backend] = [c.cpu() for c in caches] + [read.cpu()]
    for actual, expected in zip(results["triton"], results["eager"]):
        assert_same_bytes(actual, expected)
    last_token = {slot: t for t, slot in enumerate(loc_values) if 0 <= slot < slots}
    k_new = eager.quantize(k, FORMATS[recipe], gs)
    for slot in range(slots):
        expected = k_new[0][last_token[slot]] if slot in last_token else start[0][slot]
        assert_same_bytes(results["eager"][0][slot], expected)


# ---- the registry and the cache module reject what cannot work ---------------------------------


def test_registry_and_cache_reject_nonsense():
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        torch_fp4kv.register_fp4_kv_cache_quant_method(None)
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        torch_fp4kv.register_fp4_kv_cache_quant_method("")
    with pytest.raises(ValueError, match="name must not contain '\\+'"):  # the factory reads options after it
        torch_fp4kv.register_fp4_kv_cache_quant_method("my+method")
    assert "my+method" not in torch_fp4kv.FP4_KV_CACHE_QUANT_REGISTRY
    for head_dim in (0, -16):
        with pytest.raises(ValueError, match=rf"head_dim must be an int >= 1, got {head_dim}"):
            torch_fp4kv.FP4KVPool("nvfp4", 8, 2, head_dim, 1)
    with pytest.raises(ValueError, match="head_dim: head_dim 24 is not a positive multiple of the nvfp4 block size 16"):
        torch_fp4kv.FP4KVPool("nvfp4", 8, 2, 24, 1)
    method = torch_fp4kv.get_fp4_kv_cache_quant_method("nvfp4")
    method.create_buffers(8, 2, 64, 3, "cpu")
    for layer_id in (-1, 3):
        with pytest.raises(IndexError, match=f"layer_id {layer_id} is out of range for 3 layers"):
            method.layer(layer_id)


@pytest.mark.parametrize("recipe, offset", [("nvfp4", 2), ("nvfp4+k8", 1)])
def test_a_cache_view_that_starts_between_words_is_refused(recipe, offset):
    """The Triton kernels read packed FP4 rows as 32-bit words and FP8 rows as 16-bit ones: a cache
    carved from a pool at a byte offset between them is a ValueError naming it, on every backend,
    before anything is written."""
    pool = torch_fp4kv.FP4KVPool(recipe, 8, 2, 64, 1)
    layer = pool.layers[0]
    flat = torch.zeros(layer.k_data.numel() + offset, dtype=torch.uint8)
    k_data = flat[offset:].view(layer.k_data.shape)
    k = torch.randn(2, 2, 64)
    with pytest.raises(ValueError, match=f"k_data starts {offset} bytes into its storage"):
        torch_fp4kv.quantize_and_store(k_data, layer.k_scales, layer.v_data, layer.v_scales, torch.tensor([0, 1]),
                                       k, k, recipe, layer.k_global_scale, layer.v_global_scale)
    assert not flat.any()
