"""The torch.ops.fp4kv operators: opcheck, registered schemas, shapes, slots."""

import pytest
import torch
from torch.testing._internal.common_utils import TestCase

import torch_fp4kv  # noqa: F401  (registers the ops)
from conftest import INPUT_DTYPES, OUTPUT_DTYPES, RECIPES, assert_same_bytes, global_scale_for, random_kv
from torch_fp4kv.ops import FORMATS, eager
from torch_fp4kv.testing.paged import random_packed

OPS = ("quantize", "dequantize", "quantize_and_store", "gather_dequantize", "decode_attention",
       "decode_attention_with_lse")
SHAPES = [(0, 2, 64), (3, 1, 64), (5, 2, 128), (2, 3, 256), (4, 2, 16), (4, 2, 32)]


def _shapes_for(recipe):
    return [s for s in SHAPES if s[2] % FORMATS[recipe].block_size == 0]


def _cache(slots, heads, head_dim, recipe):
    """Random bytes with finite scales: opcheck compares outputs, and NaN never equals NaN there."""
    return random_packed(FORMATS[recipe], slots, heads, head_dim)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_opcheck_quantize_and_store(recipe, dtype):
    for t, h, d in _shapes_for(recipe):
        k, v = random_kv((t, h, d), dtype), random_kv((t, h, d), dtype)
        k_data, k_scales = _cache(t + 3, h, d, recipe)
        v_data, v_scales = _cache(t + 3, h, d, recipe)
        g = global_scale_for(recipe)
        for loc_dtype in (torch.int32, torch.int64):
            loc = torch.randperm(t + 3)[:t].to(loc_dtype)
            torch.library.opcheck(torch.ops.fp4kv.quantize_and_store.default,
                                  (k_data, v_data, k_scales, v_scales, loc, k, v, recipe, g, g))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_opcheck_quantize(recipe, dtype):
    for shape in _shapes_for(recipe):
        torch.library.opcheck(torch.ops.fp4kv.quantize.default, (random_kv(shape, dtype), recipe, global_scale_for(recipe)))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", OUTPUT_DTYPES)
def test_opcheck_dequantize_and_gather(recipe, dtype):
    for t, h, d in _shapes_for(recipe):
        data, scales = _cache(t + 2, h, d, recipe)
        g = global_scale_for(recipe)
        torch.library.opcheck(torch.ops.fp4kv.dequantize.default, (data, scales, recipe, g, dtype))
        loc = torch.tensor([1, -1, t + 1, 0, 99][: t], dtype=torch.int64)
        torch.library.opcheck(torch.ops.fp4kv.gather_dequantize.default, (data, scales, loc, recipe, g, dtype))


def test_mutated_arguments_have_no_default():
    """Before torch 2.13 a mutated argument left at its default breaks an op's version-counter
    kernel (it indexes the arguments given): every argument an op writes is required."""
    for op in OPS:
        for argument in getattr(torch.ops.fp4kv, op).default._schema.arguments:
            if argument.alias_info is not None and argument.alias_info.is_write:
                assert not argument.has_default_value(), (op, argument.name)


class TestSchemas(TestCase):
    def test_registered_schemas(self):
        """The op schemas are the library's contract: any change shows up here as a diff."""
        schemas = "\n".join(str(getattr(torch.ops.fp4kv, op).default._schema) for op in OPS)
        self.assertExpected(schemas)  # tests/expect/; EXPECTTEST_ACCEPT=1 rewrites it after a deliberate change



@pytest.mark.parametrize("recipe", RECIPES)
def test_store_then_gather_round_trips_through_slots(recipe):
    t, h, d, slots = 6, 2, 64, 16
    k, v = random_kv((t, h, d)), random_kv((t, h, d))
    k_data, k_scales = _cache(slots, h, d, recipe)
    v_data, v_scales = _cache(slots, h, d, recipe)
    g = global_scale_for(recipe)
    loc = torch.tensor([9, 2, 15, 0, 7, 4], dtype=torch.int32)
    torch.ops.fp4kv.quantize_and_store(k_data, v_data, k_scales, v_scales, loc, k, v, recipe, g, g)
    for data, scales, x in ((k_data, k_scales, k), (v_data, v_scales, v)):
        expected_data, expected_scales = torch.ops.fp4kv.quantize(x, recipe, g)
        assert_same_bytes(data[loc.long()], expected_data)
        assert_same_bytes(scales[loc.long()], expected_scales)
        assert_same_bytes(torch.ops.fp4kv.gather_dequantize(data, scales, loc, recipe, g),
                          torch.ops.fp4kv.dequantize(expected_data, expected_scales, recipe, g))


@pytest.mark.parametrize("recipe", RECIPES)
def test_out_of_range_slots_are_skipped_on_store_and_read_as_zeros(recipe):
    """-1 is the padding slot of CUDA-graph batches (vLLM's convention): nothing is written."""
    h, d, slots = 2, 64, 4
    k_data, k_scales = _cache(slots, h, d, recipe)
    v_data, v_scales = _cache(slots, h, d, recipe)
    before = [x.clone() for x in (k_data, v_data, k_scales, v_scales)]
    loc = torch.tensor([-1, 2, slots, -7])
    k = random_kv((4, h, d))
    g = global_scale_for(recipe)
    torch.ops.fp4kv.quantize_and_store(k_data, v_data, k_scales, v_scales, loc, k, k, recipe, g, g)
    untouched = torch.tensor([0, 1, 3])
    for after, original in zip((k_data, v_data, k_scales, v_scales), before):
        assert_same_bytes(after[untouched], original[untouched])
    out = torch.ops.fp4kv.gather_dequantize(k_data, k_scales, loc, recipe, g, torch.float32)
    assert torch.equal(out[[0, 2, 3]], torch.zeros(3, h, d))
    assert_same_bytes(out[1], torch.ops.fp4kv.dequantize(*torch.ops.fp4kv.quantize(k[1], recipe, g), recipe, g, torch.float32))


@pytest.mark.parametrize("recipe", RECIPES)
def test_zero_tokens_is_a_no_op(recipe):
    k_data, k_scales = _cache(4, 2, 64, recipe)
    snapshot = k_data.clone()
    empty = torch.empty(0, 2, 64, dtype=torch.bfloat16)
    torch.ops.fp4kv.quantize_and_store(k_data, k_data.clone(), k_scales, k_scales.clone(),
                                       torch.empty(0, dtype=torch.int64), empty, empty, recipe)
    assert torch.equal(k_data, snapshot)
    assert torch.ops.fp4kv.gather_dequantize(k_data, k_scales, torch.empty(0, dtype=torch.int32), recipe).shape == (0, 2, 64)
    data, scales = torch.ops.fp4kv.quantize(empty, recipe)
    assert data.shape == (0, 2, 32) and scales.shape == (0, 2, 64 // FORMATS[recipe].block_size)


def test_nvfp4_scales_may_be_a_float8_view():
    x = random_kv((3, 2, 64))
    data, scales = torch.ops.fp4kv.quantize(x, "nvfp4")
    assert_same_bytes(torch.ops.fp4kv.dequantize(data, scales.view(torch.float8_e4m3fn), "nvfp4"),
                      torch.ops.fp4kv.dequantize(data, scales, "nvfp4"))


def test_ops_accept_non_contiguous_kv_slices():
    """Engines pass k and v as slices of one fused QKV projection."""
    qkv = random_kv((5, 3 * 2 * 64))
    k = qkv[:, 128:256].view(5, 2, 64)
    assert not k.is_contiguous()
    assert_same_bytes(torch.ops.fp4kv.quantize(k, "nvfp4")[0], eager.quantize(k.contiguous(), FORMATS["nvfp4"])[0])
