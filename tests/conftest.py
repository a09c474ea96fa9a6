"""Shared helpers. Without a GPU, Triton kernels run under the interpreter on CPU tensors; the
variable must be set before triton.jit runs, hence here, at import time."""

import os
import sys
import types

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from torch_fp4kv.ops import FORMATS  # noqa: E402
from torch_fp4kv.ops.backends import ENV_VAR, select_backend  # noqa: E402
from torch_fp4kv.testing.scenarios import bytes_mismatch, global_scale_for  # noqa: E402,F401  (tests import it)

# Property tests draw the same examples on every run, so a CI result is reproducible and a clean
# clone cannot fail on a draw no one has seen; HYPOTHESIS_PROFILE=explore draws fresh ones.
settings.register_profile("reproducible", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))

RECIPES = sorted(FORMATS)
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
OUTPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
# Documented bound on the relative RMSE of a round trip on N(0, 1) data (README's formats table);
# measured: nvfp4 ~0.095, nvfp4_4over6 ~0.087, blockfp4 ~0.113, mxfp4 ~0.115.
RMSE_BOUND = {"nvfp4": 0.10, "nvfp4_4over6": 0.095, "blockfp4": 0.12, "mxfp4": 0.125}
HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # CPU means the Triton interpreter

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
requires_hopper = pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() != (9, 0),
                                     reason="needs an SM90 GPU")


def assert_same_bytes(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-for-bit equality, except that any NaN equals any NaN (the check's rule: bytes_mismatch)."""
    problem = bytes_mismatch(actual, expected)
    assert problem is None, problem


def random_kv(shape, dtype=torch.bfloat16, device="cpu", generator=None) -> torch.Tensor:
    """Normal values with a per-row spread of magnitudes, so blocks see many scales."""
    x = torch.randn(shape, generator=generator) * torch.exp2(torch.randint(-8, 9, (*shape[:-1], 1), generator=generator).float())
    return x.to(dtype).to(device)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws the same random data on every run."""
    torch.manual_seed(0)


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches and counters start empty, so a test counts only its own graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def backend(monkeypatch):
    """Force a backend for the ops called in a test: backend("triton")."""

    def force(name: str) -> None:
        monkeypatch.setenv(ENV_VAR, name)

    yield force
    select_backend.cache_clear()


@pytest.fixture
def fake_flashinfer(monkeypatch):
    """A stand-in `flashinfer` module with the paged wrappers as far as torch_fp4kv.testing.paged
    uses them, and the MLA one (flashinfer.mla) as far as torch_fp4kv.bench.mla does: `.calls`
    records each wrapper's ("init", class name, layout (None for MLA), kwargs), ("plan", args,
    kwargs) and ("run", q, cache, kwargs); run gives a copy of q (MLA: of q_nope) back; plan raises
    for a kv_data_type, or an MLA backend, put in `.rejects`. MLAPlanMetadata.csr gives its
    keyword arguments back as a dict."""
    calls: list = []
    rejects: set = set()

    class Wrapper:
        def __init__(self, workspace, layout, **kwargs):
            calls.append(("init", type(self).__name__, layout, kwargs))

        def plan(self, *args, **kwargs):
            if kwargs.get("kv_data_type") in rejects:
                raise RuntimeError(f"the stand-in rejects kv_data_type {kwargs['kv_data_type']}")
            calls.append(("plan", args, kwargs))

        def run(self, q, cache, **kwargs):
            calls.append(("run", q, cache, kwargs))
            return q.clone()

    class MLA:
        def __init__(self, workspace, backend="auto"):
            self.backend = backend
            calls.append(("init", "MLA", None, {"backend": backend}))

        def plan(self, **kwargs):
            for rejected in (kwargs["kv_data_type"], self.backend):
                if rejected in rejects:
                    raise RuntimeError(f"the stand-in rejects {rejected}")
            calls.append(("plan", (), kwargs))

        def run(self, *, query, kv_cache, **kwargs):
            calls.append(("run", query, kv_cache, kwargs))
            return query[0].clone()

    mla = types.SimpleNamespace(BatchMLAPagedAttentionWrapper=MLA,
                                MLAPlanMetadata=types.SimpleNamespace(csr=lambda **metadata: metadata))
    module = types.SimpleNamespace(BatchDecodeWithPagedKVCacheWrapper=type("Decode", (Wrapper,), {}),
                                   BatchPrefillWithPagedKVCacheWrapper=type("Prefill", (Wrapper,), {}),
                                   mla=mla, calls=calls, rejects=rejects)
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    return module
