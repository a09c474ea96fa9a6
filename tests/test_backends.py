"""The one selection table: which backend runs each call, the env override, and `info`.

GPUs are faked by patching the capability probe, so the SM100 (FlashInfer) row is tested here
without such a GPU."""

import importlib
import re
import subprocess
import sys
import types

import pytest
import torch

from torch_fp4kv.ops import FORMATS, Backend, backends, eager
from torch_fp4kv.ops.backends import ENV_VAR, SELECTION_TABLE, kernels_for, select_backend

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu((10, 0), flashinfer=True): CUDA calls see that capability and those packages."""

    def make(capability, flashinfer=True):
        monkeypatch.setattr(backends, "device_capability", lambda d: capability if d.type == "cuda" else (0, 0))
        monkeypatch.setattr(backends, "installed", lambda p: p == "triton" or (p == "flashinfer" and flashinfer))
        monkeypatch.delenv(ENV_VAR, raising=False)
        select_backend.cache_clear()

    yield make
    select_backend.cache_clear()


def _choice(op, recipe, device, dtype=torch.bfloat16):
    return select_backend(op, FORMATS[recipe], device, dtype)


def _every_choice(device) -> set[Backend]:
    """The backends chosen for every op and recipe on `device` (bf16)."""
    return {_choice(op, recipe, device) for op in backends.OPS for recipe in FORMATS}


def test_cpu_runs_eager(fake_gpu):
    fake_gpu((0, 0))
    assert _every_choice(CPU) == {Backend.EAGER}


def _flashinfer_row():
    return next(rule for rule in SELECTION_TABLE if rule.backend is Backend.FLASHINFER)


@pytest.mark.parametrize("capability", [(10, 0), (12, 0)])
def test_flashinfer_row_names_nvfp4_half_quantize_on_sm100_or_newer(fake_gpu, capability):
    fake_gpu(capability)
    row = _flashinfer_row()
    assert row.matches("quantize", "nvfp4", CUDA, torch.bfloat16)
    assert row.matches("quantize", "nvfp4", CUDA, torch.float16)
    assert not row.matches("quantize", "nvfp4", CUDA, torch.float32)  # FlashInfer takes half only
    assert not row.matches("quantize", "blockfp4", CUDA, torch.bfloat16)
    assert not row.matches("dequantize", "nvfp4", CUDA, torch.bfloat16)  # ours measured faster (docs/performance.md)
    assert not row.matches("quantize_and_store", "nvfp4", CUDA, torch.bfloat16)


def test_unverified_flashinfer_row_runs_only_when_forced(fake_gpu, monkeypatch):
    """The row has never run on an SM100 GPU: the table passes it over, the override reaches it."""
    fake_gpu((10, 0))
    assert not _flashinfer_row().verified
    assert _every_choice(CUDA) == {Backend.TRITON}
    monkeypatch.setenv(ENV_VAR, "flashinfer")
    assert _choice("quantize", "nvfp4", CUDA) is Backend.FLASHINFER


def test_hopper_uses_triton_everywhere(fake_gpu):
    fake_gpu((9, 0))
    assert _every_choice(CUDA) == {Backend.TRITON}


def test_pre_ampere_gpu_uses_eager(fake_gpu):
    fake_gpu((7, 5))
    assert _choice("quantize_and_store", "nvfp4", CUDA) is Backend.EAGER


def test_override_picks_a_possible_backend(fake_gpu, monkeypatch):
    fake_gpu((10, 0))
    monkeypatch.setenv(ENV_VAR, "eager")
    assert _choice("quantize", "nvfp4", CUDA) is Backend.EAGER
    monkeypatch.setenv(ENV_VAR, "flashinfer")
    assert _choice("dequantize", "nvfp4", CUDA) is Backend.FLASHINFER


_FLASHINFER_ONLY = "FlashInfer implements only quantize of nvfp4, dequantize of nvfp4/nvfp4_4over6"


def test_flashinfer_reads_4over6_bytes_but_does_not_write_them(fake_gpu, monkeypatch):
    """nvfp4_4over6 is NVFP4's bytes from another quantizer: FlashInfer's dequantize reads them,
    its quantize (plain amax / 6 scales) is never chosen for them, forced or not."""
    fake_gpu((10, 0))
    assert not _flashinfer_row().matches("quantize", "nvfp4_4over6", CUDA, torch.bfloat16)
    monkeypatch.setenv(ENV_VAR, "flashinfer")
    assert _choice("dequantize", "nvfp4_4over6", CUDA) is Backend.FLASHINFER
    with pytest.raises(RuntimeError, match=re.escape(_FLASHINFER_ONLY)):
        _choice("quantize", "nvfp4_4over6", CUDA)


@pytest.mark.parametrize(
    "forced, op, recipe, device, capability, message",
    [
        ("cuda", "quantize", "nvfp4", CPU, (0, 0), "is not a backend; valid: ['eager', 'triton', 'flashinfer']"),
        ("flashinfer", "quantize", "nvfp4", CPU, (0, 0), "FlashInfer needs a CUDA device; got cpu"),
        ("flashinfer", "quantize", "nvfp4", CUDA, (9, 0), "FlashInfer nvfp4 quantize needs SM100 or newer"),
        ("flashinfer", "quantize_and_store", "nvfp4", CUDA, (10, 0), _FLASHINFER_ONLY),
        ("flashinfer", "quantize", "mxfp4", CUDA, (10, 0), _FLASHINFER_ONLY),
        ("flashinfer", "quantize", "nvfp4_4over6", CUDA, (10, 0), _FLASHINFER_ONLY),
        ("triton", "quantize", "nvfp4", CUDA, (7, 5), "Triton kernels need SM80 or newer"),
    ],
)
def test_impossible_override_raises_instead_of_falling_back(fake_gpu, monkeypatch, forced, op, recipe, device, capability, message):
    fake_gpu(capability)
    monkeypatch.setenv(ENV_VAR, forced)
    with pytest.raises(RuntimeError, match=re.escape(message)) as info:
        _choice(op, recipe, device)
    assert str(info.value).startswith(f"{ENV_VAR}=")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    select_backend.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 for CPU tensors"):
            torch.ops.fp4kv.quantize(torch.ones(2, 16), "nvfp4")
    finally:
        select_backend.cache_clear()


def test_flashinfer_wrappers_reshape_to_its_2d_api(monkeypatch):
    """Our FlashInfer adapter, against a stand-in with FlashInfer's signatures (2-D in, 2-D out)."""
    fmt, calls = FORMATS["nvfp4"], []

    def nvfp4_kv_quantize(x, global_scale):
        calls.append(("quantize", x.shape, global_scale.dtype))
        return eager.quantize(x, fmt, global_scale)

    def nvfp4_kv_dequantize(data, scales, global_scale, output_dtype):
        calls.append(("dequantize", data.shape, scales.dtype))
        return eager.dequantize(data, scales, fmt, global_scale, output_dtype)

    monkeypatch.setitem(sys.modules, "flashinfer", types.SimpleNamespace(
        nvfp4_kv_quantize=nvfp4_kv_quantize, nvfp4_kv_dequantize=nvfp4_kv_dequantize))
    monkeypatch.delitem(sys.modules, "torch_fp4kv.ops.flashinfer_kernels", raising=False)
    adapter = importlib.import_module("torch_fp4kv.ops.flashinfer_kernels")
    monkeypatch.delitem(sys.modules, "torch_fp4kv.ops.flashinfer_kernels")

    x = torch.randn(3, 4, 64, dtype=torch.bfloat16)
    data, scales = adapter.quantize(x, fmt)
    assert data.shape == (3, 4, 32) and scales.shape == (3, 4, 4)
    out = adapter.dequantize(data, scales.view(torch.float8_e4m3fn), fmt, torch.tensor([2.0]), torch.float16)
    assert out.shape == x.shape and out.dtype == torch.float16
    assert calls == [("quantize", (12, 64), torch.float32), ("dequantize", (12, 32), torch.uint8)]
    expected = eager.dequantize(*eager.quantize(x, fmt), fmt, torch.tensor([2.0]), torch.float16)
    assert torch.equal(out, expected)


def test_kernels_for_imports_the_selected_module(fake_gpu):
    fake_gpu((0, 0))
    assert kernels_for("quantize", FORMATS["nvfp4"], CPU, torch.float32) is eager


def test_info_prints_the_table_and_choices():
    result = subprocess.run([sys.executable, "-m", "torch_fp4kv.info"], capture_output=True, text=True, check=True)
    out = result.stdout
    assert "selection table (first matching row wins):" in out
    assert "flashinfer cuda >= SM100" in out
    # The op column is as wide as its longest name: the recipes line up.
    assert re.search(r"  quantize_and_store   nvfp4 +cpu   eager", out)
    assert re.search(r"  mla_decode_attention nvfp4 +cpu   eager", out)
    assert re.search(r"quantize_and_store +nvfp4_4over6\+k8 cpu   eager", out)


@pytest.mark.parametrize("capability, expected", [((8, 0), (True, False)), ((8, 9), (True, True)), ((9, 0), (True, True))])
def test_triton_output_casts_use_the_hardware_only_where_it_has_them(fake_gpu, capability, expected):
    """float8 E4M3 conversion instructions (and Triton's float8e4nv type) start at SM89; an A100
    must get the integer encoding, or FP8 dequantize would not compile there."""
    from torch_fp4kv.ops.triton_launch import hardware_casts

    fake_gpu(capability)
    assert hardware_casts(torch.device("cuda")) == expected
    assert hardware_casts(torch.device("cpu")) == (False, False)
