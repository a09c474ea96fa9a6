"""A transformers model's decode step over an FP4Cache under torch.compile(fullgraph=True): one graph,
no graph breaks, no recompile across steps, the same logits and cache bytes as eager; on a GPU,
also under CUDA graphs (mode="reduce-overhead") with no cudagraph skip."""

import pytest
import torch

pytest.importorskip("transformers")

from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from transformers.cache_utils import Cache  # noqa: E402

from conftest import assert_same_bytes, requires_cuda  # noqa: E402
from torch_fp4kv import models  # noqa: E402
from torch_fp4kv.hf import FP4Cache  # noqa: E402

STEPS = 4


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


# Cache options: none, and full-precision sinks and recent ring (the FP4 range of Gemma's sliding
# layers, window 8, then rotates around its ring during the steps).
OPTIONS = {"plain": {}, "sink2-recent3": {"sink_tokens": 2, "recent_tokens": 3}}


def _decode(arch: str, device: str, compile_step, options=None, steps: int = STEPS, max_cache_len: int | None = None):
    """Prefill 10 tokens eagerly into two caches of `max_cache_len` (default: 10 + steps), then
    `steps` greedy steps: compiled on an FP4Cache, eager on the same layers in a plain Cache (no
    FP4Cache length check, so it runs past max_cache_len too). Returns both logits per step and
    both caches."""
    model = models.random_model(models.tiny_config(arch), device=device, attn_implementation="fp4kv")
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0)).to(device)
    length = max_cache_len or 10 + steps
    compiled_cache = FP4Cache(model.config, length, "nvfp4", **(options or {}))
    eager_cache = Cache(layers=FP4Cache(model.config, length, "nvfp4", **(options or {})).layers)
    step = compile_step(model)
    logits = []
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for cache in (compiled_cache, eager_cache):
            model(ids, past_key_values=cache)
        token = ids[:, -1:].clone()
        for i in range(steps):
            position = torch.full((2, 1), 10 + i, device=device)
            compiled = step(token, position_ids=position, past_key_values=compiled_cache).logits.clone()
            eager = model(token, position_ids=position, past_key_values=eager_cache).logits
            logits.append((compiled, eager))
            token = eager.argmax(-1)
    return logits, compiled_cache, eager_cache


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("arch", ["smollm2", "gemma3"])
def test_decode_step_compiles_once_without_graph_breaks(arch, options):
    _decode_compiled_like_eager(arch, options)


def _decode_compiled_like_eager(arch: str, options: dict, **decode_args) -> FP4Cache:
    """`_decode` on the CPU, compiled by Inductor: one graph, no graph break, the eager run's logits
    and cache contents. Returns the compiled run's cache."""
    counter = CompileCounterWithBackend("inductor")

    def compile_step(model):
        return torch.compile(model, fullgraph=True, backend=counter)

    logits, compiled_cache, eager_cache = _decode(arch, "cpu", compile_step, options, **decode_args)
    assert counter.frame_count == 1, "a decode step recompiled"
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    for compiled, eager in logits:
        torch.testing.assert_close(compiled, eager, atol=2e-3, rtol=0)  # fp16 decode rounding
    for compiled_layer, eager_layer in zip(compiled_cache.layers, eager_cache.layers):
        assert torch.equal(compiled_layer.real_tokens, eager_layer.real_tokens)
        _assert_same_contents(compiled_layer, eager_layer)  # the compiled steps wrote into the cache itself
    return compiled_cache


def _assert_same_contents(layer, expected) -> None:
    """The same FP4 bytes, and full-precision sinks and ring up to Inductor's rounding (it computes
    K's norms and RoPE in another order: the last bits differ)."""
    for written, wanted in zip(layer.fp4.buffers(), expected.fp4.buffers()):
        assert_same_bytes(written, wanted)
    for written, wanted in zip(layer.full_buffers, expected.full_buffers):
        torch.testing.assert_close(written, wanted, atol=1e-4, rtol=1e-2)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("arch", ["smollm2", "gemma3"])
def test_compiled_decode_past_max_cache_len_drops_tokens_on_full_layers(arch, options):
    """Four compiled steps after a 10-token prefill into a 12-slot cache: the last two positions are
    past max_cache_len. Still one graph and the eager layers' logits; full-attention layers hold
    the same bytes as a cache that stopped at 12 tokens (nothing overwritten), sliding layers
    (Gemma's window is 8) kept wrapping their ring."""
    compiled_cache = _decode_compiled_like_eager(arch, options, max_cache_len=12)
    _, _, full_cache = _decode(arch, "cpu", lambda m: m, options, steps=2, max_cache_len=12)
    for layer, full_layer in zip(compiled_cache.layers, full_cache.layers):
        if layer.is_sliding:
            assert not all(map(torch.equal, layer.fp4.buffers(), full_layer.fp4.buffers())), "the ring did not wrap"
        else:
            _assert_same_contents(layer, full_layer)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("arch", ["smollm2", "gemma3"])
def test_decode_step_replays_as_cuda_graph(arch, options):
    logits, _, _ = _decode(arch, "cuda", lambda m: torch.compile(m, fullgraph=True, mode="reduce-overhead"), options)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    for compiled, eager in logits:
        torch.testing.assert_close(compiled, eager, atol=2e-3, rtol=0)


@requires_cuda
@pytest.mark.gpu
def test_generate_compiles_the_decode_step_on_cuda():
    """generate() compiles decode steps for an FP4Cache by itself, as for StaticCache (CUDA only);
    asked for fullgraph=True, it gives the eager run's tokens."""
    from transformers import CompileConfig

    model = models.random_model(models.tiny_config("gemma3"), device="cuda", attn_implementation="fp4kv")
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0)).cuda()
    tokens = {}
    for compiled in (True, False):
        out = model.generate(ids, past_key_values=FP4Cache(model.config, 26, "nvfp4"), max_new_tokens=16,
                             do_sample=False, disable_compile=not compiled,
                             compile_config=CompileConfig(fullgraph=True))
        tokens[compiled] = out[:, 10:]
        if compiled:
            assert counters["stats"]["unique_graphs"] >= 1, "generate did not compile"
    assert torch.equal(tokens[True], tokens[False])
