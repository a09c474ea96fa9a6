"""Which kernel runs each op: one selection table, first matching row wins.

`TORCH_FP4KV_BACKEND=eager|triton|flashinfer` overrides the table; a backend that cannot run the
call raises a RuntimeError that says why (never a silent fallback). With `TRITON_INTERPRET=1`,
the Triton backend also runs on CPU tensors: that is how CI tests the Triton kernels. A row whose
path has never run on the devices it names is listed unverified: the table skips it, and only the
override reaches that backend, so nothing untested runs unless asked for.
"""

from __future__ import annotations

import enum
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

from .environment import environment_variable
from .formats import KV_RECIPES, LATENT_RECIPES, TENSOR_FORMATS, FP4Format, KVRecipe, LatentRecipe

ENV_VAR = "TORCH_FP4KV_BACKEND"
OPS = ("quantize", "dequantize", "quantize_and_store", "gather_dequantize", "decode_attention", "extend_attention",
       "mla_store", "mla_decode_attention")
KV_OPS = frozenset({"quantize_and_store", "decode_attention", "extend_attention"})  # recipe: a KV_RECIPES name
LATENT_OPS = frozenset({"mla_store", "mla_decode_attention"})  # recipe: a LATENT_RECIPES name


class Backend(str, enum.Enum):
    EAGER = "eager"
    TRITON = "triton"
    FLASHINFER = "flashinfer"


@dataclass(frozen=True)
class Rule:
    """Use `backend` for calls on `device_type` with at least `min_capability`, for the listed
    ops, recipes and dtypes (None: any). The dtype is the input's for quantize ops and the
    output's for dequantize ops. An unverified row (`verified=False`: not yet run on such a
    device) is never chosen by the table; TORCH_FP4KV_BACKEND opts in to its backend."""

    backend: Backend
    why: str
    device_type: str | None = None
    min_capability: tuple[int, int] | None = None
    ops: frozenset[str] | None = None
    recipes: frozenset[str] | None = None
    dtypes: frozenset[torch.dtype] | None = None
    verified: bool = True

    def matches(self, op: str, recipe: str, device: torch.device, dtype: torch.dtype) -> bool:
        return (
            (self.device_type is None or device.type == self.device_type)
            and (self.min_capability is None or device_capability(device) >= self.min_capability)
            and (self.ops is None or op in self.ops)
            and (self.recipes is None or recipe in self.recipes)
            and (self.dtypes is None or dtype in self.dtypes)
        )


_HALF_DTYPES = frozenset({torch.bfloat16, torch.float16})
# What FlashInfer implements, op -> the recipes it serves. Its dequantize reads NVFP4's bytes
# whichever quantizer chose the scales; nvfp4_kv_quantize writes plain NVFP4 scales (amax / 6
# alone), so nvfp4_4over6 quantizes with the other backends.
FLASHINFER_RECIPES = {
    "quantize": frozenset({"nvfp4"}),
    "dequantize": frozenset({"nvfp4", "nvfp4_4over6"}),
}

SELECTION_TABLE: tuple[Rule, ...] = (
    Rule(
        Backend.FLASHINFER,
        "nvfp4_kv_quantize needs SM100/SM120 (cvt.rn.satfinite.e2m1x2); unverified, so only "
        f"{ENV_VAR}=flashinfer selects it",
        device_type="cuda",
        min_capability=(10, 0),
        ops=frozenset({"quantize"}),
        recipes=FLASHINFER_RECIPES["quantize"],
        dtypes=_HALF_DTYPES,
        verified=False,
    ),
    # FlashInfer's nvfp4_kv_dequantize is not listed: ours is faster (docs/performance.md).
    Rule(Backend.TRITON, "fused Triton kernels, bit-exact with eager", device_type="cuda", min_capability=(8, 0)),
    Rule(Backend.EAGER, "pure-PyTorch reference; any device"),
)


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability; (0, 0) off CUDA. Tests patch this to fake a GPU."""
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(
    backend: Backend, op: str, recipe: str, device: torch.device, dtype: torch.dtype
) -> str | None:
    """None if `backend` can run this call here, else a sentence saying why not."""
    if backend is Backend.EAGER:
        return None
    if backend is Backend.TRITON:
        if not installed("triton"):
            return "triton is not installed"
        if device.type == "cuda":
            return None if device_capability(device) >= (8, 0) else "Triton kernels need SM80 or newer"
        if device.type == "cpu" and _triton_interpreting():
            return None
        return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tensors); got {device.type}"
    if not installed("flashinfer"):
        return "flashinfer is not installed (pip install torch-fp4kv[flashinfer])"
    if recipe not in FLASHINFER_RECIPES.get(op, ()):
        return ("FlashInfer implements only "
                + ", ".join(f"{op} of {'/'.join(sorted(names))}" for op, names in FLASHINFER_RECIPES.items()))
    if device.type != "cuda":
        return f"FlashInfer needs a CUDA device; got {device.type}"
    if dtype not in _HALF_DTYPES:
        return f"FlashInfer's nvfp4 kernels take and give bfloat16/float16 only; got {dtype}"
    needed = (10, 0) if op == "quantize" else (8, 0)
    if device_capability(device) < needed:
        return f"FlashInfer nvfp4 {op} needs SM{needed[0]}{needed[1]} or newer"
    return None


@functools.lru_cache(maxsize=None)
def _select(op: str, recipe: str, device: torch.device, dtype: torch.dtype, forced: str | None) -> Backend:
    if forced:
        try:
            backend = Backend(forced)
        except ValueError:
            raise RuntimeError(f"{ENV_VAR}={forced!r} is not a backend; valid: {[b.value for b in Backend]}") from None
        reason = unavailable_reason(backend, op, recipe, device, dtype)
        if reason:
            raise RuntimeError(f"{ENV_VAR}={forced} cannot run fp4kv.{op} ({recipe}, {device}, {dtype}): {reason}")
        return backend
    for rule in SELECTION_TABLE:
        if (rule.verified and rule.matches(op, recipe, device, dtype)
                and unavailable_reason(rule.backend, op, recipe, device, dtype) is None):
            return rule.backend
    raise AssertionError("the eager row matches everything")  # pragma: no cover


def select_backend(op: str, fmt: FP4Format | KVRecipe | LatentRecipe, device: torch.device, dtype: torch.dtype) -> Backend:
    return _select(op, fmt.name, device, dtype, os.environ.get(ENV_VAR) or None)


select_backend.cache_clear = _select.cache_clear  # tests that patch the capability clear this


def forced_backend(name: str | None):
    """Run the block with TORCH_FP4KV_BACKEND=name (None: the selection table), then restore it."""
    return environment_variable(ENV_VAR, name)


_MODULES = {Backend.EAGER: "eager", Backend.TRITON: "triton_kernels", Backend.FLASHINFER: "flashinfer_kernels"}
_OP_MODULES = {  # exceptions to _MODULES
    (Backend.TRITON, "decode_attention"): "decode",  # Gluon or Triton
    (Backend.TRITON, "extend_attention"): "triton_extend",
    (Backend.EAGER, "mla_store"): "mla",
    (Backend.EAGER, "mla_decode_attention"): "mla",
    (Backend.TRITON, "mla_store"): "triton_mla",
    (Backend.TRITON, "mla_decode_attention"): "triton_mla",
}


def kernels_for(op: str, fmt: FP4Format | KVRecipe | LatentRecipe, device: torch.device, dtype: torch.dtype):
    """The module whose function `op` runs this call (imported on first use)."""
    backend = select_backend(op, fmt, device, dtype)
    module = _OP_MODULES.get((backend, op), _MODULES[backend])
    return importlib.import_module(f".{module}", __package__)


def describe(devices) -> list[tuple[str, str, str, str]]:
    """(op, recipe, device, chosen backend or error) for every op and recipe on `devices`."""
    rows = []
    for device in devices:
        for op in OPS:
            table = KV_RECIPES if op in KV_OPS else LATENT_RECIPES if op in LATENT_OPS else TENSOR_FORMATS
            for recipe in table:
                try:
                    choice = select_backend(op, table[recipe], torch.device(device), torch.bfloat16).value
                except RuntimeError as error:
                    choice = f"error: {error}"
                rows.append((op, recipe, str(device), choice))
    return rows
