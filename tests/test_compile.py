"""torch.compile(fullgraph=True) over a module that stores K/V in an FP4 cache and reads them back:
no graph breaks, no recompile when the token count changes, the cache updated in place."""

import re

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from conftest import RECIPES, assert_same_bytes, random_kv, requires_cuda
from torch_fp4kv import FP4KVCache
from torch_fp4kv.mla_methods import LatentLayerCache

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
SLOTS, H, D = 64, 2, 64


class StoreThenRead(torch.nn.Module):
    """One attention layer's cache traffic: write this step's K/V, read a context back."""

    def __init__(self, recipe: str, device: str):
        super().__init__()
        self.cache = FP4KVCache(recipe, size=SLOTS, head_num=H, head_dim=D, layer_num=1, device=device)

    def forward(self, loc, k, v, context_loc):
        layer = self.cache.layers[0]
        layer.store(loc, k, v)
        k_ctx, v_ctx = layer.read(context_loc, torch.float32)
        return (k_ctx * v_ctx).sum(-1)


def _step(num_tokens: int, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randperm(SLOTS, generator=g)[:num_tokens].to(device)
    k = random_kv((num_tokens, H, D), torch.bfloat16, device, g)
    v = random_kv((num_tokens, H, D), torch.bfloat16, device, g)
    return loc, k, v, torch.arange(2 * num_tokens, device=device)


def _cache_buffers(module: StoreThenRead):
    return dict(module.cache.layers[0].named_buffers())


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_fullgraph_no_breaks_no_recompile_same_bytes(recipe, device):
    compiled_module, eager_module = StoreThenRead(recipe, device), StoreThenRead(recipe, device)
    compile_counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(compiled_module, backend=compile_counter, fullgraph=True)
    for seed, num_tokens in enumerate((3, 5, 9)):
        args = _step(num_tokens, device, seed)
        for x in args:
            torch._dynamo.mark_dynamic(x, 0)
        assert_same_bytes(compiled(*args), eager_module(*args))
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert compile_counter.frame_count == 1, "a changing token count recompiled"
    for name, buffer in _cache_buffers(eager_module).items():
        assert_same_bytes(_cache_buffers(compiled_module)[name], buffer)


def _call_arguments(code: str, op: str) -> list[str]:
    match = re.search(rf"torch\.ops\.fp4kv\.{op}\.default\(([^)]*)\)", code)
    assert match, f"no call to fp4kv.{op} in the generated code"
    return [a.strip() for a in match.group(1).split(",")]


@pytest.mark.parametrize("device", DEVICES)
def test_inductor_writes_the_cache_buffers_in_place(device):
    module = StoreThenRead("nvfp4", device)
    compiled = torch.compile(module, fullgraph=True)
    _, (code,) = run_and_get_code(compiled, *_step(4, device, 0))
    cache_args = _call_arguments(code, "quantize_and_store")[:4]
    graph_inputs = re.search(r"^\s*(arg\d+_1(?:, arg\d+_1)*) = args$", code, re.M).group(1).split(", ")
    # The op receives the graph inputs (the module's buffers) themselves, not temporaries...
    assert set(cache_args) <= set(graph_inputs), cache_args
    # ...and nothing clones a tensor or copies one back into a buffer afterwards.
    assert not re.search(r"\bclone\b|\.copy_\(|aten\.copy", code), "the generated code copies a tensor"


class LatentStoreThenRead(torch.nn.Module):
    """One MLA layer's cache traffic: write this step's c_kv and k_pe, read a context back."""

    def __init__(self, recipe: str, device: str):
        super().__init__()
        self.cache = LatentLayerCache(recipe, SLOTS, kv_lora_rank=64, rope_dim=16, device=device)

    def forward(self, loc, c_kv, k_pe, context_loc):
        self.cache.store(loc, c_kv, k_pe)
        c_ctx, k_ctx = self.cache.gather(context_loc, torch.float32)
        return c_ctx.sum(-1) + k_ctx.sum(-1)


@pytest.mark.parametrize("device", DEVICES)
def test_inductor_writes_the_latent_cache_buffers_in_place(device):
    module = LatentStoreThenRead("nvfp4", device)
    g = torch.Generator().manual_seed(0)
    kv = random_kv((4, 64 + 16), torch.bfloat16, device, g)  # c_kv, k_pe: column slices of kv_a's output
    args = (torch.randperm(SLOTS, generator=g)[:4].to(device), kv[:, :64], kv[:, 64:], torch.arange(8, device=device))
    _, (code,) = run_and_get_code(torch.compile(module, fullgraph=True), *args)
    cache_args = _call_arguments(code, "mla_store")[:3]
    graph_inputs = re.search(r"^\s*(arg\d+_1(?:, arg\d+_1)*) = args$", code, re.M).group(1).split(", ")
    assert set(cache_args) <= set(graph_inputs), cache_args
    assert not re.search(r"\bclone\b|\.copy_\(|aten\.copy", code), "the generated code copies a tensor"
    eager_module = LatentStoreThenRead("nvfp4", device)
    eager_module(*args)
    for name, buffer in eager_module.cache.named_buffers():
        assert_same_bytes(module.cache.get_buffer(name), buffer)
