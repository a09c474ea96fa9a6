"""Bad input raises a ValueError/TypeError that names the argument, before any buffer is written.

The Python API (`torch_fp4kv.quantize_and_store`, ...) checks everything; the raw
`torch.ops.fp4kv.*` entry points check the same inside the kernel, except argument *types*, which
the dispatcher rejects first (a RuntimeError that names the argument)."""

import re

import pytest
import torch

import torch_fp4kv
from torch_fp4kv.ops import FORMATS

T, H, D, SLOTS = 3, 2, 64, 8


def _store_args(recipe="nvfp4"):
    block = FORMATS[recipe].block_size
    g = torch.ones(1) if FORMATS[recipe].has_global_scale else None
    return dict(
        k_data=torch.full((SLOTS, H, D // 2), 7, dtype=torch.uint8),
        v_data=torch.full((SLOTS, H, D // 2), 7, dtype=torch.uint8),
        k_scales=torch.full((SLOTS, H, D // block), 7, dtype=torch.uint8),
        v_scales=torch.full((SLOTS, H, D // block), 7, dtype=torch.uint8),
        loc=torch.tensor([0, 4, 2]),
        k=torch.randn(T, H, D, dtype=torch.bfloat16),
        v=torch.randn(T, H, D, dtype=torch.bfloat16),
        recipe=recipe,
        k_global_scale=g,
        v_global_scale=g,
    )


def _with(**changes):
    def make():
        args = _store_args()
        args.update({name: value(args) if callable(value) else value for name, value in changes.items()})
        return args

    return make


META = torch.device("meta")

# (case id, arguments, error type, text the message must contain)
STORE_CASES = [
    ("k dtype int", _with(k=lambda a: a["k"].to(torch.int32)), TypeError, "k must have dtype"),
    ("v dtype fp64", _with(v=lambda a: a["v"].double()), TypeError, "v must have dtype"),
    ("k rank 2", _with(k=lambda a: a["k"][0]), ValueError, "k must be 3-D"),
    ("v shape differs", _with(v=lambda a: a["v"][:, :1].contiguous()), ValueError, "v has shape"),
    ("k_data rank 2", _with(k_data=lambda a: a["k_data"][0]), ValueError, "k_data must be 3-D"),
    ("k_data dtype", _with(k_data=lambda a: a["k_data"].to(torch.int8)), TypeError, "k_data must have dtype"),
    ("v_scales dtype", _with(v_scales=lambda a: a["v_scales"].float()), TypeError, "v_scales must have dtype"),
    ("k_scales shape", _with(k_scales=lambda a: a["k_scales"][:, :, :2].contiguous()), ValueError, "k_scales must have shape"),
    ("v cache shape", _with(v_data=lambda a: a["v_data"][:4], v_scales=lambda a: a["v_scales"][:4]),
     ValueError, "v_data has shape"),
    ("k_data heads", _with(k_data=lambda a: torch.zeros(SLOTS, H + 1, D // 2, dtype=torch.uint8),
                           v_data=lambda a: torch.zeros(SLOTS, H + 1, D // 2, dtype=torch.uint8),
                           k_scales=lambda a: torch.zeros(SLOTS, H + 1, D // 16, dtype=torch.uint8),
                           v_scales=lambda a: torch.zeros(SLOTS, H + 1, D // 16, dtype=torch.uint8)),
     ValueError, "k of [H, D] = (2, 64) does not fit k_data of [H, D/2] = (3, 32)"),
    ("k_data non-contiguous", _with(k_data=lambda a: a["k_data"].transpose(0, 1).contiguous().transpose(0, 1)),
     ValueError, "k_data must be contiguous"),
    ("head_dim not a block multiple", _with(k=lambda a: a["k"][..., :40], v=lambda a: a["v"][..., :40]),
     ValueError, "head_dim 40"),
    ("loc float", _with(loc=lambda a: a["loc"].float()), TypeError, "loc must have dtype"),
    ("loc rank 2", _with(loc=lambda a: a["loc"][:, None]), ValueError, "loc must be 1-D"),
    ("loc length", _with(loc=lambda a: a["loc"][:2]), ValueError, "loc has 2 slots but there are 3 tokens"),
    ("loc device", _with(loc=lambda a: a["loc"].to(META)), ValueError, "loc is on meta"),
    ("k device", _with(k=lambda a: a["k"].to(META)), ValueError, "k is on meta"),
    ("v_scales device", _with(v_scales=lambda a: a["v_scales"].to(META)), ValueError, "v_scales is on meta"),
    ("global scale float", _with(k_global_scale=1.0), TypeError, "k_global_scale must be a float32 tensor"),
    ("global scale dtype", _with(v_global_scale=torch.ones(1, dtype=torch.bfloat16)), TypeError, "v_global_scale must have dtype"),
    ("global scale shape", _with(k_global_scale=torch.ones(2)), ValueError, "k_global_scale must have shape [1]"),
    ("global scale [1, 1]", _with(v_global_scale=torch.ones(1, 1)), ValueError, "v_global_scale must have shape [1]"),
    ("k and v dtypes differ", _with(v=lambda a: a["v"].half()), TypeError, "v has dtype float16 but k has bfloat16"),
    ("global scale device", _with(k_global_scale=torch.ones(1, device=META)), ValueError, "k_global_scale is on meta"),
    ("unknown recipe", _with(recipe="nvfp8"), ValueError, "recipe"),
    ("recipe not a string", _with(recipe=4), TypeError, "recipe"),
    ("k not a tensor", _with(k=lambda a: a["k"].tolist()), TypeError, "k must be a torch.Tensor"),
]


@pytest.mark.parametrize("make_args, error, text", [c[1:] for c in STORE_CASES], ids=[c[0] for c in STORE_CASES])
def test_quantize_and_store_rejects_before_writing(make_args, error, text):
    args = make_args()
    buffers = {name: args[name].clone() for name in ("k_data", "v_data", "k_scales", "v_scales")
               if args[name].device.type == "cpu"}
    with pytest.raises(error) as info:
        torch_fp4kv.quantize_and_store(**args)
    assert text in str(info.value), str(info.value)
    for name, before in buffers.items():
        assert torch.equal(args[name], before), f"{name} was written before the error"


@pytest.mark.parametrize("recipe", ["nvfp4", "nvfp4+k8", "mxfp4"])
def test_quantize_and_store_in_the_old_order_says_the_order_changed(recipe):
    """0.1 took (k_data, v_data, k_scales, v_scales, ...); passed so now, scales sit where data is
    expected, and the error says the order changed. The raw op keeps the 0.1 order."""
    kv = torch_fp4kv.ops.get_kv_recipe(recipe)
    k_data, v_data = (torch.zeros(SLOTS, H, f.data_width(D), dtype=torch.uint8) for f in (kv.k, kv.v))
    k_scales, v_scales = (torch.zeros(SLOTS, H, f.scales_width(D), dtype=torch.uint8) for f in (kv.k, kv.v))
    g = [torch.ones(1) if f.has_global_scale else None for f in (kv.k, kv.v)]
    tokens = (torch.tensor([0, 4, 2]), torch.randn(T, H, D), torch.randn(T, H, D), recipe, *g)
    with pytest.raises(ValueError, match=re.escape("the Python API takes (k_data, k_scales, v_data, v_scales, ...) "
                                                   "since 0.2")):
        torch_fp4kv.quantize_and_store(k_data, v_data, k_scales, v_scales, *tokens)
    assert not any(b.any() for b in (k_data, v_data, k_scales, v_scales))
    torch_fp4kv.quantize_and_store(k_data, k_scales, v_data, v_scales, *tokens)
    stored = [b.clone() for b in (k_data, v_data, k_scales, v_scales)]
    torch.ops.fp4kv.quantize_and_store(k_data, v_data, k_scales, v_scales, *tokens)
    assert all(torch.equal(a, b) for a, b in zip(stored, (k_data, v_data, k_scales, v_scales)))


def test_global_scale_rejected_for_recipe_without_one():
    args = _store_args("blockfp4")
    args["k_global_scale"] = torch.ones(1)
    with pytest.raises(ValueError, match="k_global_scale: recipe 'blockfp4' has no global scale"):
        torch_fp4kv.quantize_and_store(**args)


@pytest.mark.parametrize("d", [16, 48, 80])
def test_mxfp4_rejects_head_dim_not_multiple_of_32(d):
    with pytest.raises(ValueError, match=f"x: head_dim {d} is not a positive multiple of the mxfp4 block size 32"):
        torch_fp4kv.quantize(torch.randn(2, d), "mxfp4")


QUANTIZE_CASES = [
    ("x int", lambda: (torch.ones(2, 16, dtype=torch.int32), "nvfp4", None), TypeError, "x must have dtype"),
    ("x scalar", lambda: (torch.tensor(1.0), "nvfp4", None), ValueError, "x must have at least one dimension"),
    ("x head_dim", lambda: (torch.ones(2, 24), "blockfp4", None), ValueError, "x: head_dim 24"),
    ("global scale int", lambda: (torch.ones(2, 16), "nvfp4", 2), TypeError, "global_scale must be a float32 tensor"),
]


@pytest.mark.parametrize("make_args, error, text", [c[1:] for c in QUANTIZE_CASES], ids=[c[0] for c in QUANTIZE_CASES])
def test_quantize_rejects(make_args, error, text):
    with pytest.raises(error, match=text):
        torch_fp4kv.quantize(*make_args())


def _packed(d=64, recipe="nvfp4"):
    return torch.zeros(4, 2, d // 2, dtype=torch.uint8), torch.zeros(4, 2, d // FORMATS[recipe].block_size, dtype=torch.uint8)


DEQUANTIZE_CASES = [
    ("data dtype", lambda: (_packed()[0].to(torch.int8), _packed()[1], "nvfp4"), {}, TypeError, "data must have dtype"),
    ("scales shape", lambda: (_packed()[0], _packed()[1][..., :1], "nvfp4"), {}, ValueError, "scales must have shape"),
    ("scales device", lambda: (_packed()[0], _packed()[1].to(META), "nvfp4"), {}, ValueError, "scales is on meta"),
    ("fp8 scales for e8m0", lambda: (*(t for t in (_packed(64, "mxfp4")[0], _packed(64, "mxfp4")[1].view(torch.float8_e4m3fn))), "mxfp4"),
     {}, TypeError, "scales must have dtype"),
    ("output dtype int", lambda: (*_packed(), "nvfp4"), {"dtype": torch.int32}, TypeError, "dtype must be one of"),
    ("output dtype fp64", lambda: (*_packed(), "nvfp4"), {"dtype": torch.float64}, TypeError, "dtype must be one of"),
]


@pytest.mark.parametrize("make_args, kwargs, error, text", [c[1:] for c in DEQUANTIZE_CASES], ids=[c[0] for c in DEQUANTIZE_CASES])
def test_dequantize_rejects(make_args, kwargs, error, text):
    with pytest.raises(error, match=text):
        torch_fp4kv.dequantize(*make_args(), **kwargs)


def test_gather_dequantize_rejects():
    data, scales = _packed()
    with pytest.raises(TypeError, match="loc must have dtype"):
        torch_fp4kv.gather_dequantize(data, scales, torch.zeros(2, dtype=torch.int16), "nvfp4")
    with pytest.raises(ValueError, match=r"data must be 3-D"):
        torch_fp4kv.gather_dequantize(data[0], scales[0], torch.zeros(2, dtype=torch.int64), "nvfp4")
    with pytest.raises(ValueError, match="loc is on meta"):
        torch_fp4kv.gather_dequantize(data, scales, torch.zeros(2, dtype=torch.int64, device=META), "nvfp4")


def test_raw_op_checks_inside_the_kernel_before_writing():
    args = _store_args()
    args["k"] = args["k"][..., :40]
    args["v"] = args["v"][..., :40]
    before = args["k_data"].clone()
    with pytest.raises(ValueError, match="k: head_dim 40"):
        torch.ops.fp4kv.quantize_and_store(**args)
    assert torch.equal(args["k_data"], before)
    with pytest.raises(RuntimeError, match="global_scale"):
        torch.ops.fp4kv.quantize(torch.ones(2, 16), "nvfp4", 2.0)


# ---- accuracy options never bypass the checks ----------------------------------------------------
# With rotate, smooth_k, channel_scale_k or k_fp8 the layer cache transforms its inputs (casts,
# broadcasts against the K mean and channel scales, matmuls with the rotation) around the ops; a
# bad input must still get the ops' error, naming the argument, before the cache or its
# calibration state changes.

OPTION_SETS = [dict(rotate=rotate, smooth_k=smooth, channel_scale_k=scale, k_fp8=fp8)
               for rotate in (False, True) for smooth, scale in ((False, False), (True, False), (True, True))
               for fp8 in (False, True)]


def _option_id(options):
    return "+".join(name for name, on in options.items() if on) or "plain"


def _calibrated_method(options, recipe="nvfp4"):
    """One layer, every slot stored after a calibration, so that any write or recalibration shows."""
    method = torch_fp4kv.get_fp4_kv_cache_quant_method(recipe, **options)
    method.create_buffers(SLOTS, H, D, 1, "cpu")
    k, v = torch.randn(SLOTS, H, D) * 3 + 1, torch.randn(SLOTS, H, D)
    method.calibrate(0, k, v, torch.randn(SLOTS, 2 * H, D))
    method.quantize_and_store(0, torch.arange(SLOTS), k, v)
    return method


def _layer_state(method):
    return {name: tensor.clone() for name, tensor in method.layer(0).state_dict().items()}


def _assert_state_unchanged(method, before):
    after = method.layer(0).state_dict()
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name].view(torch.uint8), tensor.view(torch.uint8)), f"{name} changed"


def _bf16(*shape):
    return torch.randn(shape, dtype=torch.bfloat16)


def _loc():
    return torch.tensor([1, 5, 2])


TABLE, LENS = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32), torch.tensor([5, 3], dtype=torch.int32)
CU_SEQLENS = torch.tensor([0, 2, 3], dtype=torch.int32)


def _decode(q, **kwargs):
    return lambda m: m.decode_attention(0, q, TABLE, LENS, 4, **kwargs)


def _extend(q, **kwargs):
    return lambda m: m.extend_attention(0, q, CU_SEQLENS, TABLE, LENS, 4, **kwargs)


# (case id, call on a method, error type, the argument the message must name)
OPTION_CASES = [
    ("store k [T, 1, D]", lambda m: m.quantize_and_store(0, _loc(), _bf16(T, 1, D), _bf16(T, H, D)), ValueError, "k"),
    ("store int32 k, v", lambda m: m.quantize_and_store(0, _loc(), *(torch.ones(T, H, D, dtype=torch.int32),) * 2),
     TypeError, "k"),
    ("store float64 k, v", lambda m: m.quantize_and_store(0, _loc(), *(torch.ones(T, H, D, dtype=torch.float64),) * 2),
     TypeError, "k"),
    ("store head_dim 32", lambda m: m.quantize_and_store(0, _loc(), _bf16(T, H, 32), _bf16(T, H, 32)), ValueError, "k"),
    ("store v float16", lambda m: m.quantize_and_store(0, _loc(), _bf16(T, H, D), _bf16(T, H, D).half()),
     TypeError, "v"),
    ("store loc float", lambda m: m.quantize_and_store(0, _loc().float(), _bf16(T, H, D), _bf16(T, H, D)),
     TypeError, "loc"),
    ("read dtype int32", lambda m: m.dequantize_prev_kv(0, _loc(), torch.int32), TypeError, "dtype"),
    ("roundtrip k [T, 1, D]", lambda m: m.layer(0).roundtrip(_bf16(T, 1, D), _bf16(T, H, D)), ValueError, "k"),
    ("roundtrip int32 v", lambda m: m.layer(0).roundtrip(_bf16(T, H, D), torch.ones(T, H, D, dtype=torch.int32)),
     TypeError, "v"),
    ("calibrate k [T, 2H, D/2]", lambda m: m.calibrate(0, torch.randn(T, 2 * H, D // 2), torch.randn(T, H, D)),
     ValueError, "k"),
    ("calibrate v head_dim 32", lambda m: m.calibrate(0, torch.randn(T, H, D), torch.randn(T, H, 32)), ValueError, "v"),
    ("calibrate no tokens", lambda m: m.calibrate(0, torch.randn(0, H, D), torch.randn(0, H, D)), ValueError, "k"),
    ("calibrate q head_dim 32", lambda m: m.calibrate(0, torch.randn(T, H, D), torch.randn(T, H, D),
                                                     torch.randn(T, H, 32)), ValueError, "q"),
    ("calibrate q 3 heads", lambda m: m.calibrate(0, torch.randn(T, H, D), torch.randn(T, H, D),
                                                  torch.randn(T, 3, D)), ValueError, "q"),
    ("calibrate int q", lambda m: m.calibrate(0, torch.randn(T, H, D), torch.randn(T, H, D),
                                              torch.ones(T, H, D, dtype=torch.int32)), TypeError, "q"),
    ("decode q head_dim 128", _decode(_bf16(2, H, 128)), ValueError, "q"),
    ("decode q 3 heads", _decode(_bf16(2, 3, D)), ValueError, "q"),
    ("decode q float32", _decode(torch.randn(2, H, D)), TypeError, "q"),
    ("decode out float32", _decode(_bf16(2, H, D), out=torch.empty(2, H, D)), ValueError, "out"),
    ("decode out rows", _decode(_bf16(2, H, D), out=_bf16(1, H, D)), ValueError, "out"),
    ("extend q head_dim 128", _extend(_bf16(T, H, 128)), ValueError, "q"),
    ("extend out float32", _extend(_bf16(T, H, D), out=torch.empty(T, H, D)), ValueError, "out"),
    ("extend out rows", _extend(_bf16(T, H, D), out=_bf16(T - 1, H, D)), ValueError, "out"),
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=_option_id)
@pytest.mark.parametrize("call, error, name", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_options_check_before_transforming_or_writing(options, call, error, name):
    method = _calibrated_method(options)
    before = _layer_state(method)
    with pytest.raises(error) as info:
        call(method)
    assert re.search(rf"(^|[^\w.]){name}\b", str(info.value)), str(info.value)
    assert type(info.value) is error, repr(info.value)
    _assert_state_unchanged(method, before)


# (recipe, options, state dict of one good entry and one bad one, the entry the message names)
BAD_LOADS = [
    ("nvfp4", dict(smooth_k=True), {"layers.0.k_mean": torch.ones(H, D), "layers.0.k_scale": torch.ones(2),
                                    "layers.0.v_scale": torch.ones(1)}, "k_scale"),
    ("nvfp4", dict(smooth_k=True, k_fp8=True), {"layers.0.k_mean": torch.ones(H, D), "layers.0.k_scale": 0.5,
                                                "layers.0.v_scale": torch.ones(1, 3)}, "v_scale"),
    ("blockfp4", dict(smooth_k=True, k_fp8=True), {"layers.0.k_mean": torch.ones(H, D),
                                                   "layers.0.k_scale": torch.ones(2)}, "k_scale"),
    ("nvfp4", dict(smooth_k=True), {"layers.0.k_scale": 0.5, "layers.0.v_scale": 0.5,
                                    "layers.0.k_mean": torch.ones(H + 1, D)}, "k_mean"),
    ("nvfp4", dict(smooth_k=True), {"layers.0.k_scale": 0.5, "layers.0.v_scale": 0.5,
                                    "layers.0.k_mean": torch.ones(H, D).index_fill(1, torch.tensor([2]), float("nan"))},
     "k_mean"),
    *(("nvfp4", {}, {"layers.0.k_scale": 0.5, "layers.0.v_scale": bad}, "v_scale")
      for bad in (float("nan"), float("inf"), 0.0, -0.5, torch.tensor([float("nan")]))),
    ("nvfp4", {}, {"model.layers.0.self_attn.k_scale": 0.5, "model.layers.0.self_attn.v_scale": 0.5,
                   "vision.layers.0.self_attn.k_scale": 0.5, "vision.layers.0.self_attn.v_scale": 0.5}, "k_scale"),
    *(("nvfp4", dict(smooth_k=True, channel_scale_k=True),
       {"layers.0.k_mean": torch.ones(H, D), "layers.0.k_channel_scale": bad}, "k_channel_scale")
      for bad in (torch.ones(H, D + 1), torch.zeros(H, D), -torch.ones(H, D),
                  torch.ones(H, D).index_fill(1, torch.tensor([3]), float("nan")),
                  torch.ones(H, D).index_fill(1, torch.tensor([3]), float("inf")))),
]


@pytest.mark.parametrize("recipe, options, state, name", BAD_LOADS)
def test_load_scales_from_model_checks_every_entry_before_writing(recipe, options, state, name):
    method = _calibrated_method(options, recipe)
    before = _layer_state(method)
    with pytest.raises(ValueError, match=name):
        method.load_scales_from_model(state)
    _assert_state_unchanged(method, before)


@pytest.mark.parametrize("k_scale, v_scale, error, text", [
    (2.0, torch.ones(3), ValueError, r"v_scale must have one element; got shape \(3,\)"),
    ("2.0", 1.0, TypeError, "k_scale must be a number or a tensor, got str"),
    *((2.0, bad, ValueError, "v_scale is .*: a global scale must be finite and > 0")
      for bad in (float("nan"), float("-inf"), 0.0, -1.0)),
])
def test_set_global_scales_checks_both_before_writing(k_scale, v_scale, error, text):
    method = _calibrated_method({})
    before = _layer_state(method)
    with pytest.raises(error, match=text):
        method.set_global_scales(0, k_scale, v_scale)
    _assert_state_unchanged(method, before)


def test_set_k_mean_names_a_value_that_is_no_tensor():
    method = _calibrated_method(dict(smooth_k=True))
    before = _layer_state(method)
    with pytest.raises(TypeError, match="k_mean must be a number or a tensor, got str"):
        method.set_k_mean(0, "zeros")
    _assert_state_unchanged(method, before)


@pytest.mark.parametrize("value, error, text", [
    (torch.ones(H, D, 1), ValueError, r"k_channel_scale must have shape \(2, 64\)"),
    (torch.zeros(H, D), ValueError, "k_channel_scale must be finite and > 0"),
    ("ones", TypeError, "k_channel_scale must be a number or a tensor, got str"),
])
def test_set_k_channel_scale_checks_before_writing(value, error, text):
    method = _calibrated_method(dict(smooth_k=True, channel_scale_k=True))
    before = _layer_state(method)
    with pytest.raises(error, match=text):
        method.set_k_channel_scale(0, value)
    _assert_state_unchanged(method, before)
    plain = _calibrated_method(dict(smooth_k=True))
    with pytest.raises(ValueError, match="without channel_scale_k"):
        plain.set_k_channel_scale(0, torch.ones(H, D))


def test_calibrating_channel_scales_needs_the_queries():
    method = _calibrated_method(dict(smooth_k=True, channel_scale_k=True))
    before = _layer_state(method)
    with pytest.raises(ValueError, match="q: a cache that scales K channels calibrates on the queries"):
        method.calibrate(0, torch.randn(T, H, D), torch.randn(T, H, D))
    _assert_state_unchanged(method, before)
