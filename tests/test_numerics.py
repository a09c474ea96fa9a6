"""The bit-level format contract, checked on the eager reference kernels (through the ops)."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import RECIPES, RMSE_BOUND, random_kv
from torch_fp4kv.ops import FORMATS
from torch_fp4kv.ops.formats import E2M1_THRESHOLDS, E2M1_VALUES

quantize, dequantize = torch.ops.fp4kv.quantize, torch.ops.fp4kv.dequantize



def _block(values, recipe, dtype=torch.float32):
    """One block of `values`, padded with zeros to the recipe's block size."""
    n = FORMATS[recipe].block_size
    x = torch.zeros(n, dtype=torch.float32)
    x[: len(values)] = torch.tensor(values, dtype=torch.float32)
    return x.to(dtype)


def _codes(data):
    return torch.stack((data & 0xF, data >> 4), -1).flatten(-2)


@pytest.mark.parametrize("recipe", RECIPES)
def test_layout_element_2i_in_low_nibble(recipe):
    # With amax 6 every recipe has scale 1: codes are the E2M1 codes of the values themselves.
    values = [0.5, 6.0, -1.0, 3.0]
    data, _ = quantize(_block(values, recipe), recipe)
    assert data[0].item() == (0x7 << 4) | 0x1  # 0.5 -> code 1 (low), 6 -> code 7 (high)
    assert data[1].item() == (0x5 << 4) | 0x8 | 0x2  # -1 -> code 0xA (low), 3 -> code 5 (high)
    assert data.shape == (FORMATS[recipe].block_size // 2,)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_representable_values_round_trip_exactly(recipe, dtype):
    grid = list(E2M1_VALUES) + [-v for v in E2M1_VALUES[1:]]
    x = _block(grid, recipe, dtype) * 4  # scale 4 for every recipe (amax 24)
    assert torch.equal(dequantize(*quantize(x, recipe), recipe, None, torch.float32), x.float())


@pytest.mark.parametrize("recipe", RECIPES)
def test_ties_follow_each_recipes_rule(recipe):
    """A value exactly between two magnitudes: nvfp4/mxfp4 round to the even code, blockfp4 away.

    With a global scale, the block sits at E4M3's largest scale (448 * g, g = 2^-9), where amax / 4
    saturates to the same byte, so nvfp4_4over6 keeps it too: the elements divided by 448 * g are
    the thresholds themselves."""
    fmt = FORMATS[recipe]
    unit, g = (448 * 2.0**-9, torch.tensor([2.0**-9])) if fmt.has_global_scale else (1.0, None)
    x = _block([6.0] + list(E2M1_THRESHOLDS) + [-t for t in E2M1_THRESHOLDS], recipe) * unit
    codes = _codes(quantize(x, recipe, g)[0])[1:15]
    for i, t in enumerate(E2M1_THRESHOLDS):
        expected = i + 1 if fmt.ties_away or (i + 1) % 2 == 0 else i
        assert codes[i].item() == expected, (t, codes[i].item())
        assert codes[i + 7].item() == expected | 0x8, (-t, codes[i + 7].item())


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_makes_its_block_nan(recipe, bad):
    n = FORMATS[recipe].block_size
    x = random_kv((2, 2 * n))
    x[0, 3] = bad
    out = dequantize(*quantize(x, recipe), recipe, None, torch.float32)
    assert out[0, :n].isnan().all()
    assert out[0, n:].isfinite().all() and out[1].isfinite().all()
    for dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn):
        assert dequantize(*quantize(x, recipe), recipe, None, dtype).float()[0, :n].isnan().all()


@pytest.mark.parametrize("recipe", RECIPES)
def test_zero_block_gives_zero_codes_and_exact_zeros(recipe):
    x = torch.zeros(3, 64, dtype=torch.bfloat16)
    data, _ = quantize(x, recipe)
    assert (data == 0).all()
    assert torch.equal(dequantize(data, _, recipe, None, torch.float32), torch.zeros(3, 64))


def test_nvfp4_saturates_large_values_with_unit_global_scale():
    x = _block([1e30, -1e30, 3e30], "nvfp4")
    data, scales = quantize(x, "nvfp4")
    assert scales[0].item() == 0x7E  # E4M3 448, the largest finite scale
    out = dequantize(data, scales, "nvfp4", None, torch.float32)
    assert out[:3].tolist() == [448 * 6, -448 * 6, 448 * 6]


def test_nvfp4_scale_is_e4m3_of_amax_over_6g_and_global_scale_multiplies():
    g = torch.tensor([0.01])
    x = _block([0.9, -0.3, 0.05], "nvfp4")
    data, scales = quantize(x, "nvfp4", g)
    expected = (torch.tensor(0.9) / (6 * g)).to(torch.float8_e4m3fn).view(torch.uint8)
    assert scales.item() == expected.item()
    s = scales.view(torch.float8_e4m3fn).float()
    out = dequantize(data, scales, "nvfp4", g, torch.float32)
    assert torch.equal(out, torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))[_codes(data).long()] * s * g)


@pytest.mark.parametrize("amax", [1e-12, 0.1, 0.75, 6.0, 6.000001, 12.0, 100.0, 3e38])
def test_blockfp4_scale_is_ceil_log2_of_amax_over_6(amax):
    _, scales = quantize(_block([amax], "blockfp4"), "blockfp4")
    v = max(float(torch.tensor(amax, dtype=torch.float32) / 6), 1e-10)
    assert scales.item() == math.ceil(math.log2(v)) + 127


@pytest.mark.parametrize("amax", [1e-30, 0.1, 1.0, 5.99, 6.0, 448.0, 3e38])
def test_mxfp4_scale_is_floor_log2_amax_minus_2(amax):
    data, scales = quantize(_block([amax], "mxfp4"), "mxfp4")
    assert scales.item() == max(math.floor(math.log2(float(torch.tensor(amax, dtype=torch.float32)))) - 2 + 127, 0)
    assert (_codes(data)[0] & 7).item() in (6, 7)  # amax / X is in [4, 8): codes 4 or 6, saturating above 6


@pytest.mark.parametrize("recipe", RECIPES)
def test_round_trip_error_on_normal_data_is_bounded(recipe):
    x = torch.randn(512, 8, 128, generator=torch.Generator().manual_seed(0))
    out = dequantize(*quantize(x, recipe), recipe, None, torch.float32)
    rmse = ((out - x).pow(2).mean() / x.pow(2).mean()).sqrt().item()
    assert 0.05 < rmse < RMSE_BOUND[recipe], rmse


@settings(max_examples=60, deadline=None)
@given(
    recipe=st.sampled_from(RECIPES),
    rows=st.integers(0, 5),
    blocks=st.integers(1, 4),
    exponent=st.integers(-30, 30),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_round_trip_stays_within_half_a_step_of_the_block_scale(recipe, rows, blocks, exponent, seed):
    fmt = FORMATS[recipe]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, blocks * fmt.block_size, generator=gen) * 2.0**exponent
    # nvfp4 needs a calibrated global scale once amax / 6 leaves E4M3's normal range (what
    # NVFP4KVMethod.calibrate computes); the E8M0 recipes cover any exponent alone.
    g = (x.abs().amax() / (448 * 6)).clamp(min=1e-38).reshape(1) if rows and fmt.has_global_scale else None
    data, scales = quantize(x, recipe, g)
    assert data.shape == (rows, blocks * fmt.block_size // 2) and scales.shape == (rows, blocks)
    out = dequantize(data, scales, recipe, g, torch.float32)
    assert out.isfinite().all()
    # The largest E2M1 step is 2 (between 4 and 6), so no element is off by more than one scale,
    # and with no saturation (nvfp4/blockfp4) the error is at most half of that.
    per_block_amax = x.abs().unflatten(-1, (blocks, fmt.block_size)).amax(-1, keepdim=True)
    err = (out - x).abs().unflatten(-1, (blocks, fmt.block_size))
    bound = per_block_amax * (2.0 / 6.0 if fmt.name != "mxfp4" else 0.5) + 1e-30
    assert (err <= bound * 1.0001).all()
    assert torch.equal(torch.signbit(out[out != 0]), torch.signbit(x[out != 0]))
