"""nvfp4_4over6: NVFP4 bytes whose quantizer keeps, per block, the better of the scales for amax / 6
and amax / 4 (formats.ScaleChoice). Plain NVFP4 readers read them; each block dequantizes at
least as close to the input as plain NVFP4's; the Triton kernel writes eager's bytes."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import torch_fp4kv
from conftest import INPUT_DTYPES, TRITON_DEVICE, assert_same_bytes
from torch_fp4kv.ops import FORMATS, eager
from torch_fp4kv.ops.formats import E2M1_VALUES

quantize, dequantize = torch.ops.fp4kv.quantize, torch.ops.fp4kv.dequantize
FOUR_OVER_SIX = FORMATS["nvfp4_4over6"]
BLOCK = FOUR_OVER_SIX.block_size


def _decoded_by_hand(data, scales, g):
    """(e2m1 * s) * g from the bits, written from the NVFP4 table alone: no library reader."""
    codes = torch.stack((data & 0xF, data >> 4), -1).flatten(-2).long()
    grid = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))
    s = scales.view(torch.float8_e4m3fn).float().repeat_interleave(BLOCK, -1)
    return grid[codes] * s * (g if g is not None else 1.0)


def _block_sse(x, out):
    """Per-block squared error, in float64 (so its rounding is far below float32's)."""
    return (out.double() - x.double()).square().unflatten(-1, (-1, BLOCK)).sum(-1)


def _inputs(draw_seed, shape, exponent, dtype, grid_values):
    gen = torch.Generator().manual_seed(draw_seed)
    if grid_values:  # few distinct magnitudes: many blocks whose two candidates tie exactly
        x = torch.randint(-12, 13, shape, generator=gen).float() * 0.25
    else:
        x = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-6, 7, (*shape[:-1], 1), generator=gen).float())
    return (x * 2.0**exponent).to(dtype)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 6),
    blocks=st.integers(1, 8),
    exponent=st.integers(-12, 12),
    dtype=st.sampled_from(INPUT_DTYPES),
    calibrated=st.booleans(),
    grid_values=st.booleans(),
)
def test_property_plain_readers_decode_it_and_no_block_is_worse_than_plain_nvfp4(
        seed, rows, blocks, exponent, dtype, calibrated, grid_values):
    x = _inputs(seed, (rows, blocks * BLOCK), exponent, dtype, grid_values)
    # Calibrated as a calibrator would: over the finite values (float16 overflows at the top exponents).
    finite_amax = x.float().abs().where(x.isfinite(), 0).amax()
    g = (finite_amax / (448 * 6)).clamp(min=2.0**-126).reshape(1) if calibrated else None
    data, scales = quantize(x, "nvfp4_4over6", g)
    plain_data, plain_scales = quantize(x, "nvfp4", g)
    out = dequantize(data, scales, "nvfp4", g, torch.float32)  # the plain NVFP4 reader
    assert_same_bytes(out, _decoded_by_hand(data, scales, g))
    assert_same_bytes(out, dequantize(data, scales, "nvfp4_4over6", g, torch.float32))
    plain_out = dequantize(plain_data, plain_scales, "nvfp4", g, torch.float32)
    error, plain_error = _block_sse(x.float(), out), _block_sse(x.float(), plain_out)
    finite = x.isfinite().unflatten(-1, (-1, BLOCK)).all(-1)  # float16 overflows at the top exponents
    assert (error[finite] <= plain_error[finite] * (1 + 1e-6)).all()
    # Each block holds plain NVFP4's bytes or those under E4M3(amax / (4 g)), and only the latter
    # where they are strictly closer.
    amax = x.float().abs().unflatten(-1, (-1, BLOCK)).amax(-1)
    g_value = g if g is not None else torch.ones(1)
    four = (amax / (4 * g_value)).clamp(max=448).to(torch.float8_e4m3fn).view(torch.uint8)
    same = scales == plain_scales
    assert torch.equal(scales[~same], four[~same])
    assert (error[~same] < plain_error[~same] * (1 + 1e-6)).all() and finite[~same].all()
    same_data = same.repeat_interleave(BLOCK // 2, -1)
    assert torch.equal(data[same_data], plain_data[same_data])


def test_a_block_exact_at_amax_over_4_takes_that_scale():
    """amax 4 with a 3 beside it: under s = 1 (amax / 4) both are E2M1 values, while amax / 6 rounds
    to E4M3 0.6875, where 4 reads back as 4.125."""
    x = torch.zeros(BLOCK)
    x[:2] = torch.tensor([4.0, -3.0])
    data, scales = quantize(x, "nvfp4_4over6")
    assert scales.view(torch.float8_e4m3fn).item() == 1.0
    assert torch.equal(dequantize(data, scales, "nvfp4", None, torch.float32), x)
    _, plain_scales = quantize(x, "nvfp4")
    assert plain_scales.view(torch.float8_e4m3fn).item() == 0.6875


@pytest.mark.parametrize("values, g", [
    ([0.0], None),  # zero block: both errors 0
    ([6.0, 1.0, -0.5, 3.0], None),  # exact under amax / 6
    ([6.0 * 0.875, 1.2, -0.7], 2.0**-9),  # amax / (4 g) saturates to amax / (6 g)'s byte, 448
])
def test_equal_errors_keep_plain_nvfp4s_bytes(values, g):
    """Ties go to amax / 6, so plain NVFP4's bytes."""
    x = torch.zeros(2, BLOCK)
    x[0, : len(values)] = torch.tensor(values)
    x[1] = x[0] * 0.5
    g = torch.tensor([g]) if g is not None else None
    for actual, expected in zip(quantize(x, "nvfp4_4over6", g), quantize(x, "nvfp4", g)):
        assert torch.equal(actual, expected)


def test_the_choice_minimizes_summed_squares_not_the_worst_element():
    """vLLM's metric is the block's sum of squared errors: some blocks it moves to amax / 4 have a
    larger worst-element error than plain NVFP4 gives them."""
    x = torch.randn(4096, BLOCK, generator=torch.Generator().manual_seed(1))
    out = dequantize(*quantize(x, "nvfp4_4over6"), "nvfp4", None, torch.float32)
    plain_out = dequantize(*quantize(x, "nvfp4"), "nvfp4", None, torch.float32)
    moved = (_block_sse(x, out) < _block_sse(x, plain_out))[:, 0]
    assert moved.float().mean() > 0.2  # no corner case on normal data
    worst, plain_worst = (out - x).abs().amax(-1), (plain_out - x).abs().amax(-1)
    assert (worst[moved] > plain_worst[moved]).any()


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    tokens=st.integers(1, 5),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([16, 64, 128]),
    dtype=st.sampled_from(INPUT_DTYPES),
    g_value=st.one_of(st.none(), st.floats(1e-6, 1e3)),
    grid_values=st.booleans(),
)
def test_property_triton_writes_eagers_bytes(seed, tokens, heads, head_dim, dtype, g_value, grid_values):
    """Under the interpreter on CPU (CI) or compiled on a GPU; grid-valued blocks tie often, where
    one rounding apart in either error would pick the other scale."""
    pytest.importorskip("triton")
    x = _inputs(seed, (tokens, heads, head_dim), 0, dtype, grid_values)
    g = torch.tensor([g_value]) if g_value is not None else None
    expected = eager.quantize(x, FOUR_OVER_SIX, g)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_FP4KV_BACKEND", "triton")
        actual = quantize(x.to(TRITON_DEVICE), "nvfp4_4over6", g.to(TRITON_DEVICE) if g is not None else None)
    for a, e in zip(actual, expected):
        assert_same_bytes(a, e)


def test_a_method_with_options_stores_4over6_bytes():
    """The recipe takes the options grammar's suffixes (here K in FP8): V's cache holds the ops'
    nvfp4_4over6 bytes."""
    method = torch_fp4kv.get_fp4_kv_cache_quant_method("nvfp4_4over6+k8")
    assert isinstance(method, torch_fp4kv.NVFP4FourOverSixMethod)
    assert method.kv_recipe.name == "nvfp4_4over6+k8"
    buffers = method.create_buffers(size=8, head_num=2, head_dim=64, layer_num=1, device="cpu")
    k, v = torch.randn(2, 3, 2, 64, dtype=torch.bfloat16).unbind(0)
    loc = torch.tensor([5, 0, 2])
    method.quantize_and_store(0, loc, k, v)
    data, scales = quantize(v, "nvfp4_4over6")
    assert torch.equal(buffers.v_data[0][loc], data) and torch.equal(buffers.v_scales[0][loc].view(torch.uint8), scales)
