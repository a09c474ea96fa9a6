"""What every Triton launcher of ops decides the same way, from the device and the arguments alone.

The quantize, dequantize and attention launchers all pass these to their kernels, so each rule is
stated once: whether the kernels run on the CPU interpreter (fp32 tiles), which casts the GPU
does itself (hardware_casts), the global scales as one HAS_G flag (global_scale_pair), and whether a
Gluon kernel of this package can serve on the GPU (hopper_gluon).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from . import backends


def fp32_tiles(device: torch.device) -> bool:
    """Whether kernels on `device` decode to float32 tiles: off CUDA, that is under the Triton
    interpreter (CPU tensors, in CI), whose bf16 casts and arithmetic round differently from the
    GPU's; the float32 values are the same exact products."""
    return device.type != "cuda"


def hardware_casts(device: torch.device) -> tuple[bool, bool]:
    """(bf16, float8 E4M3) output casts done by the GPU's conversion instructions: bf16 on every
    GPU these kernels run on (SM80+), E4M3 from SM89 (the first with an FP8 conversion). The
    interpreter, whose casts round differently, gets the integer code for both."""
    if fp32_tiles(device):
        return False, False
    return True, backends.device_capability(device) >= (8, 9)


def global_scale_pair(k_global_scale, v_global_scale, device):
    """Both scales or neither: kernels take one HAS_G flag, so a lone scale gets 1.0 beside it."""
    if (k_global_scale is None) == (v_global_scale is None):
        return k_global_scale, v_global_scale
    ones = torch.ones(1, dtype=torch.float32, device=device)
    return (ones if k_global_scale is None else k_global_scale), (ones if v_global_scale is None else v_global_scale)


def hopper_gluon(device: torch.device, module: str) -> ModuleType | None:
    """The Gluon kernel module `module` of this package on an SM90 GPU (wgmma is SM90-only), else
    None, as with a Triton too old to have Gluon's Hopper API. The caller asks the module whether it
    serves the call's shapes."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return None
    try:
        return importlib.import_module(f".{module}", __package__)
    except ImportError:
        return None
