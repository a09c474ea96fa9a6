"""The Triton backend equals the eager reference byte for byte. On a GPU these run the compiled
kernels; on CPU (CI) they run under the Triton interpreter (TRITON_INTERPRET=1, see conftest)."""

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from conftest import INPUT_DTYPES, OUTPUT_DTYPES, RECIPES, TRITON_DEVICE, assert_same_bytes, global_scale_for, random_kv
from torch_fp4kv.ops import FORMATS, KV_RECIPES, eager
from torch_fp4kv.ops.formats import E2M1_THRESHOLDS

pytest.importorskip("triton")


def _special_values(x: torch.Tensor) -> torch.Tensor:
    """Sprinkle NaN, +-Inf, an all-zero row, exact ties and subnormal-scale values."""
    x = x.clone()
    flat = x.view(-1, x.shape[-1])
    if flat.shape[0] >= 4:
        flat[0, 1] = float("nan")
        flat[1, -1] = float("-inf")
        flat[2] = 0
        flat[3, :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0], dtype=x.dtype)
    return x


def _triton_vs_eager(backend, recipe, dtype, shape, g_value=None):
    backend("triton")
    fmt = FORMATS[recipe]
    x = _special_values(random_kv(shape, dtype))
    g = torch.tensor([g_value]) if g_value is not None and fmt.has_global_scale else global_scale_for(recipe)
    dev = TRITON_DEVICE
    g_dev = g.to(dev) if g is not None else None
    expected = eager.quantize(x, fmt, g)
    actual = torch.ops.fp4kv.quantize(x.to(dev), recipe, g_dev)
    assert_same_bytes(actual[0], expected[0])
    assert_same_bytes(actual[1], expected[1])
    return x, expected, g, g_dev


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_quantize_matches_eager(backend, recipe, dtype):
    _triton_vs_eager(backend, recipe, dtype, (6, 3, 64))


@pytest.mark.parametrize("recipe", RECIPES)
def test_dequantize_and_gather_of_a_head_dim_of_no_power_of_two_blocks(backend, recipe):
    """head_dim 96 (Phi-3): 6 NVFP4 blocks, 3 MXFP4 ones; the kernels pad the block axis and mask it."""
    _, (data, scales), g, g_dev = _triton_vs_eager(backend, recipe, torch.bfloat16, (5, 3, 96))
    dev, fmt = TRITON_DEVICE, FORMATS[recipe]
    assert_same_bytes(torch.ops.fp4kv.dequantize(data.to(dev), scales.to(dev), recipe, g_dev, torch.bfloat16),
                      eager.dequantize(data, scales, fmt, g, torch.bfloat16))
    loc = torch.tensor([4, -1, 0, 9], dtype=torch.int32)
    assert_same_bytes(torch.ops.fp4kv.gather_dequantize(data.to(dev), scales.to(dev), loc.to(dev), recipe, g_dev),
                      eager.gather_dequantize(data, scales, loc, fmt, g, torch.bfloat16))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("out_dtype", OUTPUT_DTYPES)
def test_dequantize_and_gather_match_eager(backend, recipe, out_dtype):
    fmt = FORMATS[recipe]
    _, (data, scales), g, g_dev = _triton_vs_eager(backend, recipe, torch.bfloat16, (6, 3, 128))
    dev = TRITON_DEVICE
    assert_same_bytes(torch.ops.fp4kv.dequantize(data.to(dev), scales.to(dev), recipe, g_dev, out_dtype),
                      eager.dequantize(data, scales, fmt, g, out_dtype))
    # Every scale byte, NaN encodings included, decodes the same way.
    blocks = 128 // fmt.block_size
    all_scales = torch.arange(256, dtype=torch.uint8).view(256 // blocks, 1, blocks)
    codes = torch.randint(0, 256, (256 // blocks, 1, 64), dtype=torch.uint8)
    assert_same_bytes(torch.ops.fp4kv.dequantize(codes.to(dev), all_scales.to(dev), recipe, g_dev, out_dtype),
                      eager.dequantize(codes, all_scales, fmt, g, out_dtype))
    loc = torch.tensor([5, -1, 0, 2, 6, 3], dtype=torch.int32)
    assert_same_bytes(torch.ops.fp4kv.gather_dequantize(data.to(dev), scales.to(dev), loc.to(dev), recipe, g_dev, out_dtype),
                      eager.gather_dequantize(data, scales, loc, fmt, g, out_dtype))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("d", [64, 96, 160])  # 96, 160: block counts that are no power of two (3, 5, 6, 10)
def test_quantize_and_store_matches_eager(backend, recipe, dtype, d):
    backend("triton")
    fmt = FORMATS[recipe]
    t, h, slots = 7, 2, 12
    k = _special_values(random_kv((t, h, d), dtype))
    v = random_kv((t, h, d), dtype)
    g = global_scale_for(recipe)
    loc = torch.tensor([3, -1, 11, 0, 7, 12, 5])
    caches = [torch.randint(0, 256, (slots, h, n), dtype=torch.uint8) for n in (d // 2, d // 2, d // fmt.block_size, d // fmt.block_size)]
    expected = [c.clone() for c in caches]
    eager.quantize_and_store(*expected, loc, k, v, KV_RECIPES[recipe], g, g)
    dev = TRITON_DEVICE
    actual = [c.to(dev) for c in caches]
    g_dev = g.to(dev) if g is not None else None
    torch.ops.fp4kv.quantize_and_store(*actual, loc.to(dev), k.to(dev), v.to(dev), recipe, g_dev, g_dev)
    for a, e in zip(actual, expected):
        assert_same_bytes(a, e)


@settings(max_examples=25, deadline=None)
@given(
    recipe=st.sampled_from(RECIPES),
    dtype=st.sampled_from(INPUT_DTYPES),
    tokens=st.integers(1, 9),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([32, 48, 64, 80, 96, 128, 192, 256]),
    g_value=st.floats(1e-6, 1e3),
)
def test_property_triton_equals_eager(recipe, dtype, tokens, heads, head_dim, g_value):
    assume(head_dim % FORMATS[recipe].block_size == 0)
    with pytest.MonkeyPatch.context() as mp:
        _triton_vs_eager(lambda name: mp.setenv("TORCH_FP4KV_BACKEND", name), recipe, dtype, (tokens, heads, head_dim), g_value)


@pytest.mark.parametrize("recipe, g_value", [*((r, g) for r in ("nvfp4", "nvfp4_4over6")
                                                 for g in (1e-40, 1e-30, 3.3e-5, 1.0, 1234.5, 1e30)),
                                              ("blockfp4", None), ("mxfp4", None)])
def test_quantize_matches_eager_across_the_float32_range(backend, recipe, g_value):
    """Blocks from subnormal to near-overflow magnitudes, so quotients that underflow, saturate or
    overflow (and global scales far from 1, down to a subnormal one) take the kernel's edge paths,
    and 4/6's squared errors underflow or overflow."""
    x = torch.randn(64, 4, 64) * torch.exp2(torch.randint(-140, 125, (64, 4, 1)).float())
    fmt = FORMATS[recipe]
    g = torch.tensor([g_value]) if g_value is not None else None
    backend("triton")
    g_dev = g.to(TRITON_DEVICE) if g is not None else None
    for actual, expected in zip(torch.ops.fp4kv.quantize(x.to(TRITON_DEVICE), recipe, g_dev), eager.quantize(x, fmt, g)):
        assert_same_bytes(actual, expected)


def _neighbours(x: torch.Tensor, steps: int) -> torch.Tensor:
    """x and the `steps` float32 values on each side of it."""
    bits = x.float().view(torch.int32)
    return torch.cat([(bits + k).view(torch.float32) for k in range(-steps, steps + 1)])


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("g_value", [1.0, 0.37, 3.3e-5, 1234.5, 0.0173, 7.77, 0.1])
def test_quotients_next_to_every_rounding_boundary(backend, recipe, g_value):
    """Probe the float32 values around threshold * divisor, where a quotient rounded differently
    from eager's division (Triton multiplies by a per-block reciprocal and corrects) would show."""
    fmt = FORMATS[recipe]
    g = torch.tensor([g_value]) if fmt.has_global_scale else None
    amax = torch.tensor([5.9 * g_value])
    _, divisor = eager._scale_bytes_and_divisor(amax, fmt, g)
    probes = _neighbours(torch.tensor(E2M1_THRESHOLDS) * divisor, 8)
    probes = probes[probes <= amax]
    per_block = fmt.block_size - 1
    probes = torch.cat([probes, probes.new_zeros(-len(probes) % per_block)]).view(-1, per_block)
    x = torch.cat([amax.expand(probes.shape[0], 1), probes], dim=1)
    x = torch.cat([x, -x])
    backend("triton")
    g_dev = g.to(TRITON_DEVICE) if g is not None else None
    for actual, expected in zip(torch.ops.fp4kv.quantize(x.to(TRITON_DEVICE), recipe, g_dev), eager.quantize(x, fmt, g)):
        assert_same_bytes(actual, expected)
