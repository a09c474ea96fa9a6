"""Bad input raises a ValueError/TypeError that names the argument, before any buffer is written.

The Python API (`torch_fp4kv.quantize_and_store`, ...) checks everything; the raw
`torch.ops.fp4kv.*` entry points check the same inside the kernel, except argument *types*, which
the dispatcher rejects first (a RuntimeError that names the argument)."""

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
