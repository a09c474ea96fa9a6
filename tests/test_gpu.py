"""CUDA-only tests: opcheck on CUDA tensors, FlashInfer reading our bytes, and a decode step inside
CUDA graphs (manual capture and torch.compile's reduce-overhead). Skipped without a GPU; the Triton
and compile tests in the other files also run on CUDA when there is one."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import torch_fp4kv
from conftest import HAS_CUDA, OUTPUT_DTYPES, RECIPES, assert_same_bytes, global_scale_for, random_kv
from torch_fp4kv import FP4KVCache
from torch_fp4kv.ops import FORMATS

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

SLOTS, HKV, HQ, D = 256, 2, 8, 128


@pytest.mark.parametrize("recipe", RECIPES)
def test_opcheck_on_cuda(recipe):
    g = global_scale_for(recipe, "cuda")
    k, v = random_kv((6, HKV, D), torch.bfloat16, "cuda"), random_kv((6, HKV, D), torch.bfloat16, "cuda")
    data, scales = torch_fp4kv.quantize(k, recipe, g)
    cache = [torch.zeros(16, HKV, D // 2, dtype=torch.uint8, device="cuda") for _ in "kv"]
    cache += [torch.zeros(16, HKV, D // FORMATS[recipe].block_size, dtype=torch.uint8, device="cuda") for _ in "kv"]
    loc = torch.tensor([3, 9, 0, 15, -1, 7], device="cuda")
    ops = torch.ops.fp4kv
    torch.library.opcheck(ops.quantize.default, (k, recipe, g))
    torch.library.opcheck(ops.quantize_and_store.default, (*cache, loc, k, v, recipe, g, g))
    for dtype in OUTPUT_DTYPES:
        torch.library.opcheck(ops.dequantize.default, (data, scales, recipe, g, dtype))
        torch.library.opcheck(ops.gather_dequantize.default, (*cache[::2], loc, recipe, g, dtype))


@pytest.mark.parametrize("recipe", ["nvfp4", "nvfp4_4over6"])  # 4/6: NVFP4 bytes, other scale choices
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g_value", [1.0, 0.0173])
def test_flashinfer_dequantize_reads_our_nvfp4_bytes(recipe, dtype, g_value):
    flashinfer = pytest.importorskip("flashinfer")
    x = random_kv((4096, 8, D), dtype, "cuda")
    g = torch.tensor([g_value], device="cuda")
    data, scales = torch_fp4kv.quantize(x, recipe, g)
    theirs = flashinfer.nvfp4_kv_dequantize(data.view(-1, D // 2), scales.view(-1, D // 16), g, output_dtype=dtype)
    assert_same_bytes(theirs.view(x.shape), torch_fp4kv.dequantize(data, scales, recipe, g, dtype))


class DecodeStep(torch.nn.Module):
    """Store this step's K/V in the FP4 cache, read each sequence's context, attend (GQA)."""

    def __init__(self, recipe: str, batch: int, context: int):
        super().__init__()
        self.cache = FP4KVCache(recipe, size=SLOTS, head_num=HKV, head_dim=D, layer_num=1, device="cuda")
        self.batch, self.context = batch, context

    def forward(self, q, k, v, loc, context_loc, mask):
        layer = self.cache.layers[0]
        layer.store(loc, k, v)
        keys, values = layer.read(context_loc, q.dtype)
        keys = keys.view(self.batch, self.context, HKV, D).transpose(1, 2)
        values = values.view(self.batch, self.context, HKV, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def _decode_inputs(step: int, batch: int, context: int):
    """Step `step` of `batch` sequences, each owning `context` slots; positions <= step are visible."""
    g = torch.Generator().manual_seed(step)
    q = random_kv((batch, HQ, 1, D), torch.bfloat16, "cuda", g)
    k = random_kv((batch, HKV, D), torch.bfloat16, "cuda", g)
    v = random_kv((batch, HKV, D), torch.bfloat16, "cuda", g)
    base = torch.arange(batch, device="cuda") * context
    loc = base + step
    context_loc = (base[:, None] + torch.arange(context, device="cuda")[None, :]).reshape(-1)
    mask = (torch.arange(context, device="cuda") <= step).expand(batch, 1, 1, context).contiguous()
    return q, k, v, loc, context_loc, mask


def _set_global_scales(module: DecodeStep) -> None:
    layer = module.cache.layers[0]
    if layer.k_global_scale is not None:
        layer.k_global_scale.fill_(0.02)
        layer.v_global_scale.fill_(0.05)


@pytest.mark.parametrize("recipe", RECIPES)
def test_decode_step_replayed_from_a_cuda_graph_equals_eager(recipe):
    batch, context = 4, 32
    graphed, reference = DecodeStep(recipe, batch, context), DecodeStep(recipe, batch, context)
    for module in (graphed, reference):
        _set_global_scales(module)
    static = [x.clone() for x in _decode_inputs(0, batch, context)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graphed(*static)  # warm-up: Triton compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    reference(*static)  # the reference cache sees step 0 too
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = graphed(*static)
    for step in range(1, 6):
        inputs = _decode_inputs(step, batch, context)
        for buffer, x in zip(static, inputs):
            buffer.copy_(x)
        graph.replay()
        assert_same_bytes(static_out, reference(*inputs))
    for name, buffer in reference.cache.layers[0].named_buffers():
        assert_same_bytes(dict(graphed.cache.layers[0].named_buffers())[name], buffer)


def test_reduce_overhead_runs_the_decode_step_as_a_cuda_graph():
    batch, context = 4, 32
    compiled_module, reference = DecodeStep("nvfp4", batch, context), DecodeStep("nvfp4", batch, context)
    for module in (compiled_module, reference):
        _set_global_scales(module)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(compiled_module, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        inputs = _decode_inputs(step, batch, context)
        assert_same_bytes(compiled(*inputs).clone(), reference(*inputs))
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert sum(counters["graph_break"].values()) == 0
    # The step that follows must be a graph replay.
    inputs = _decode_inputs(4, batch, context)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = compiled(*inputs).clone()
        torch.cuda.synchronize()
    names = {event.name for event in prof.events()}
    assert "cudaGraphLaunch" in names, sorted(n for n in names if n.startswith("cuda"))
    assert_same_bytes(out, reference(*inputs))
    for name, buffer in reference.cache.layers[0].named_buffers():
        assert_same_bytes(dict(compiled_module.cache.layers[0].named_buffers())[name], buffer)


def test_cuda_graph_decode_example_on_gpu():
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "examples/cuda_graph_decode.py", "--steps", "16"], cwd=root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "decode step captured in a CUDA graph" in result.stdout
    print(result.stdout)


def test_bench_timer_waits_for_inputs_written_just_before():
    """The benchmark times each call on a stream of its own; inputs still being written on the
    default stream must be finished first (a half-written page table made decode read out of bounds)."""
    from torch_fp4kv.bench import timer

    x = torch.zeros(1, device="cuda")
    torch.cuda._sleep(100_000_000)  # keeps the default stream busy for tens of milliseconds
    x.fill_(1.0)
    seen = []
    timer(torch.device("cuda"))(lambda: seen.append(x.clone()))
    assert seen[0].item() == 1.0  # the first call runs eagerly, before any graph capture
