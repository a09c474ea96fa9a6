"""torch_fp4kv.sglang: SGLang's FP4 KV cache interface, called the way SGLang's code calls it
(its unit tests, test/srt/test_fp4_kv_cache_quant_method.py, and its KV pool, mem_cache/memory_pool.py),
under PR #21954's names and today's (kv_cache_quant_method), checked against the primary API byte
for byte."""

import re
from types import SimpleNamespace

import pytest
import torch

import torch_fp4kv
from conftest import RMSE_BOUND, assert_same_bytes, random_kv
from torch_fp4kv.sglang import (
    FP4_KV_CACHE_QUANT_REGISTRY,
    BlockFP4KVMethod,
    BlockFP4KVQuantizeUtil,
    FP4KVCacheQuantMethod,
    FP4KVCacheRecipe,
    FP4MXBlock16KVQuantizeUtil,
    KVFP4QuantizeUtil,
    NVFP4KVMethod,
    NVFP4KVQuantizeUtil,
    get_fp4_kv_cache_quant_method,
)
from torch_fp4kv.sglang.kv_cache_quant_method import (
    KV_CACHE_QUANT_REGISTRY,
    KVCacheQuantMethod,
    MXFP4Method,
    NVFP4Method,
    get_kv_cache_quant_method,
)

SGLANG_RECIPES = ("blockfp4", "nvfp4")
FP8 = torch.float8_e4m3fn
H, D = 2, 64


def _sglang_method(recipe, num_layers=2):
    """As SGLang builds them: NVFP4 takes the layer count and device, block-FP4 nothing."""
    if recipe == "nvfp4":
        return get_fp4_kv_cache_quant_method("nvfp4", num_layers=num_layers, device="cpu", sm_version=120)
    return get_fp4_kv_cache_quant_method("blockfp4")


def _primary_method(recipe, size, layer_num, global_scales=()):
    """The primary API's method for the same recipe, holding its own buffers."""
    method = torch_fp4kv.get_fp4_kv_cache_quant_method(recipe)
    method.create_buffers(size, H, D, layer_num, "cpu")
    for layer_id, (k_g, v_g) in enumerate(global_scales):
        method.set_global_scales(layer_id, k_g, v_g)
    return method


def _as_primary_scales(recipe, scale_buffer):
    """SGLang keeps block-FP4 scales per token, [size, H*D/16]; the primary API per head."""
    return scale_buffer.view(scale_buffer.shape[0], H, -1) if recipe == "blockfp4" else scale_buffer


# ---- registry and factory (SGLang's TestKVCacheQuantRegistry) ----------------------------------


def test_registry_and_factory_as_sglang_calls_them():
    assert FP4_KV_CACHE_QUANT_REGISTRY == {"nvfp4": NVFP4KVMethod, "blockfp4": BlockFP4KVMethod}
    method = get_fp4_kv_cache_quant_method("nvfp4", num_layers=4, device="cpu", sm_version=120)
    assert isinstance(method, NVFP4KVMethod) and method.name == "nvfp4"
    method = get_fp4_kv_cache_quant_method("blockfp4")
    assert isinstance(method, BlockFP4KVMethod) and method.name == "blockfp4"
    with pytest.raises(ValueError, match=r"Unknown fp4_kv_cache_recipe: 'unknown_method'\. Available: \['nvfp4', 'blockfp4'\]"):
        get_fp4_kv_cache_quant_method("unknown_method")
    assert issubclass(NVFP4KVMethod, FP4KVCacheQuantMethod) and issubclass(BlockFP4KVMethod, FP4KVCacheQuantMethod)


def test_recipe_enum_numbers_as_sglang():
    assert FP4KVCacheRecipe.MXFP4.value == 1 and FP4KVCacheRecipe.NVFP4.value == 2


# ---- NVFP4KVMethod / BlockFP4KVMethod (SGLang's TestNVFP4KVMethod, TestBlockFP4KVMethod) --------


def test_nvfp4_method_attributes():
    m = NVFP4KVMethod(num_layers=4, device="cpu", sm_version=120)
    assert (m.name, m.SCALE_BLOCK_SIZE, m.num_layers, m.device, m.sm_version) == ("nvfp4", 16, 4, "cpu", 120)
    assert m.needs_dequant_workspace() and m.needs_global_scale()
    for scales in (m.k_scales_gpu, m.v_scales_gpu):
        assert scales.dtype == torch.float32 and scales.tolist() == [1.0] * 4
    assert NVFP4KVMethod(3, "cpu").sm_version == 120  # positional, default sm_version
    b = BlockFP4KVMethod()
    assert (b.name, b.SCALE_BLOCK_SIZE) == ("blockfp4", 16)
    assert b.needs_dequant_workspace() and not b.needs_global_scale()


@pytest.mark.parametrize("recipe", SGLANG_RECIPES)
def test_create_buffers_keys_shapes_dtypes(recipe):
    size, heads, dim, layers = 64, 8, 128, 4
    bufs = _sglang_method(recipe, layers).create_buffers(size, heads, dim, layers, "cpu")
    assert set(bufs) == {"k_buffer", "v_buffer", "k_scale_buffer", "v_scale_buffer", "dq_k_buffer", "dq_v_buffer",
                         "store_dtype"}
    scale_shape = (size, heads * dim // 16) if recipe == "blockfp4" else (size, heads, dim // 16)
    for name, shape in (("k_buffer", (size, heads, dim // 2)), ("v_buffer", (size, heads, dim // 2)),
                        ("k_scale_buffer", scale_shape), ("v_scale_buffer", scale_shape)):
        assert len(bufs[name]) == layers
        assert all(t.shape == shape and t.dtype == torch.uint8 for t in bufs[name]), name
    for name in ("dq_k_buffer", "dq_v_buffer"):
        assert bufs[name].shape == (size, heads, dim) and bufs[name].dtype == FP8
    assert bufs["store_dtype"] == torch.uint8
    keyword = _sglang_method(recipe, layers).create_buffers(size=16, head_num=heads, head_dim=dim, layer_num=2,
                                                             device="cpu")
    assert keyword["k_buffer"][1].shape == (16, heads, dim // 2)


def test_create_buffers_rejects_bad_sizes_before_allocating():
    with pytest.raises(ValueError, match="head_dim 40 is not a positive multiple of the blockfp4 block size 16"):
        BlockFP4KVMethod().create_buffers(8, H, 40, 1, "cpu")
    with pytest.raises(ValueError, match="layer_num must be an int >= 1, got 0"):
        NVFP4KVMethod(1, "cpu").create_buffers(8, H, D, 0, "cpu")


@pytest.mark.parametrize("recipe", SGLANG_RECIPES)
def test_compute_cell_size(recipe):
    # SGLang's own figure: FP4 8*64*4*2 = 4096, scales 8*8*4*2 = 512, FP8 workspace 8*128*2 = 2048.
    method = _sglang_method(recipe, 4)
    assert method.compute_cell_size(head_num=8, head_dim=128, num_layers=4, kv_size=1) == 4096 + 512 + 2048
    assert method.compute_cell_size(8, 128, 4, 2) == 2 * (4096 + 512 + 2048)


@pytest.mark.parametrize("recipe", SGLANG_RECIPES)
@pytest.mark.parametrize("keywords", [False, True], ids=["positional", "keyword-scales"])
def test_quantize_and_store_writes_the_primary_apis_bytes(recipe, keywords):
    m = _sglang_method(recipe)
    bufs = m.create_buffers(16, H, D, 2, "cpu")
    k, v = random_kv((5, H, D)), random_kv((5, H, D))
    loc = torch.tensor([3, 0, 9, 12, 7])
    args = (bufs["k_buffer"][1], bufs["v_buffer"][1], bufs["k_scale_buffer"][1], bufs["v_scale_buffer"][1], loc, k, v)
    k_g, v_g = torch.tensor([0.37]), torch.tensor([2.5])
    if recipe == "blockfp4":
        m.quantize_and_store(*args)
    elif keywords:  # SGLang's unit tests
        m.quantize_and_store(*args, k_scale=k_g, v_scale=v_g)
    else:  # SGLang's pool
        m.quantize_and_store(*args, k_g, v_g)
    primary = _primary_method(recipe, 16, 2, [(1.0, 1.0), (0.37, 2.5)] if recipe == "nvfp4" else ())
    primary.quantize_and_store(1, loc, k, v)
    for layer in (0, 1):
        for ours, theirs, scales in (("k_buffer", "k_data", "k_scale_buffer"), ("v_buffer", "v_data", "v_scale_buffer")):
            assert_same_bytes(bufs[ours][layer], getattr(primary.buffers, theirs)[layer])
            assert_same_bytes(_as_primary_scales(recipe, bufs[scales][layer]),
                              getattr(primary.buffers, theirs.replace("data", "scales"))[layer])
    assert bufs["k_buffer"][1][loc].any(), "the store wrote nothing"


def test_nvfp4_store_accepts_a_python_float_scale_as_sglang_does():
    m = NVFP4KVMethod(1, "cpu")
    bufs = m.create_buffers(8, H, D, 1, "cpu")
    k = random_kv((3, H, D))
    loc = torch.arange(3)
    m.quantize_and_store(bufs["k_buffer"][0], bufs["v_buffer"][0], bufs["k_scale_buffer"][0], bufs["v_scale_buffer"][0],
                         loc, k, k, 0.5, torch.tensor(0.5))
    data, scales = torch_fp4kv.quantize(k, "nvfp4", torch.tensor([0.5]))
    assert_same_bytes(bufs["k_buffer"][0][loc], data)
    assert_same_bytes(bufs["v_scale_buffer"][0][loc], scales)


@pytest.mark.parametrize("recipe", SGLANG_RECIPES)
def test_dequantize_prev_kv_equals_the_primary_fp8_read(recipe):
    m = _sglang_method(recipe, num_layers=2)
    bufs = m.create_buffers(16, H, D, 2, "cpu")
    scales = [(1.0, 1.0), (0.37, 2.5)] if recipe == "nvfp4" else ()
    if recipe == "nvfp4":
        m.k_scales_gpu.copy_(torch.tensor([1.0, 0.37]))
        m.v_scales_gpu.copy_(torch.tensor([1.0, 2.5]))
    k, v = random_kv((6, H, D)), random_kv((6, H, D))
    loc = torch.tensor([15, 2, 4, 8, 0, 11])
    m.quantize_and_store(bufs["k_buffer"][1], bufs["v_buffer"][1], bufs["k_scale_buffer"][1], bufs["v_scale_buffer"][1],
                         loc, k, v, *(m.k_scales_gpu[1:2], m.v_scales_gpu[1:2]) if recipe == "nvfp4" else ())
    idx = loc[[4, 0, 2]]
    k_fp4, k_scales = bufs["k_buffer"][1][idx], bufs["k_scale_buffer"][1][idx]
    v_fp4, v_scales = bufs["v_buffer"][1][idx], bufs["v_scale_buffer"][1][idx]
    if recipe == "nvfp4":
        k_scales = k_scales.view(FP8)  # later SGLang pools hand NVFP4 scales over as an FP8 view
    k_out, v_out = m.dequantize_prev_kv(k_fp4, k_scales, v_fp4, v_scales, 1)
    assert k_out.shape == (3, H, D) and k_out.dtype == v_out.dtype == FP8
    primary = _primary_method(recipe, 16, 2, scales)
    primary.quantize_and_store(1, loc, k, v)
    k_ref, v_ref = primary.dequantize_prev_kv(1, idx, FP8)
    assert_same_bytes(k_out, k_ref)
    assert_same_bytes(v_out, v_ref)
    assert (k_out.float() - k[[4, 0, 2]].float()).norm() / k[[4, 0, 2]].float().norm() < RMSE_BOUND[recipe] + 0.02


@pytest.mark.parametrize("recipe", SGLANG_RECIPES)
def test_fp8_read_rounds_as_sglangs_bf16_then_fp8_when_the_bf16_step_is_exact(recipe):
    """SGLang dequantizes to bf16 and casts that to FP8; we round once from float32. Code times
    block scale is exact in bf16, so with no global scale, or a power of two, the bytes agree."""
    m = _sglang_method(recipe)
    if recipe == "nvfp4":
        m.k_scales_gpu.fill_(0.25)
    x = random_kv((4, H, D))
    data, scales = torch_fp4kv.quantize(x, recipe, torch.tensor([0.25]) if recipe == "nvfp4" else None)
    sglang_scales = scales.flatten(1) if recipe == "blockfp4" else scales
    k_out, _ = m.dequantize_prev_kv(data, sglang_scales, data, sglang_scales, 0)
    via_bf16 = torch_fp4kv.dequantize(data, scales, recipe, torch.tensor([0.25]) if recipe == "nvfp4" else None)
    assert_same_bytes(k_out, via_bf16.to(FP8))


@pytest.mark.parametrize("recipe", SGLANG_RECIPES)
def test_store_and_prefill_read_compile_fullgraph(recipe):
    """Under torch.compile the method writes the pool's buffers in place (block-FP4's scales
    through their per-head view) and reads back what eager does."""
    m = _sglang_method(recipe, num_layers=1)
    scales = (m.k_scales_gpu[0:1], m.v_scales_gpu[0:1]) if recipe == "nvfp4" else ()

    def step(k_buffer, v_buffer, k_scale_buffer, v_scale_buffer, loc, k):
        m.quantize_and_store(k_buffer, v_buffer, k_scale_buffer, v_scale_buffer, loc, k, k, *scales)
        return m.dequantize_prev_kv(k_buffer[loc], k_scale_buffer[loc], v_buffer[loc], v_scale_buffer[loc], 0)

    k, loc = random_kv((5, H, D)), torch.tensor([1, 3, 5, 7, 9])
    compiled, eager = (m.create_buffers(16, H, D, 1, "cpu") for _ in range(2))
    names = ("k_buffer", "v_buffer", "k_scale_buffer", "v_scale_buffer")
    out = torch.compile(step, fullgraph=True)(*(compiled[n][0] for n in names), loc, k)
    ref = step(*(eager[n][0] for n in names), loc, k)
    for name in names:
        assert_same_bytes(compiled[name][0], eager[name][0])
    assert_same_bytes(out[0], ref[0])
    assert compiled["k_scale_buffer"][0][loc].any()


# ---- bad input: a clear error naming the argument, nothing written -----------------------------


def test_nvfp4_store_without_a_global_scale_names_it_and_writes_nothing():
    m = NVFP4KVMethod(1, "cpu")
    bufs = m.create_buffers(8, H, D, 1, "cpu")
    layer = [bufs[name][0] for name in ("k_buffer", "v_buffer", "k_scale_buffer", "v_scale_buffer")]
    k = random_kv((2, H, D))
    with pytest.raises(ValueError, match="v_scale: NVFP4 needs the layer's global scale"):
        m.quantize_and_store(*layer, torch.arange(2), k, k, k_scale=m.k_scales_gpu[0:1])
    with pytest.raises(TypeError, match="k_scale must be a torch.Tensor, got str"):
        m.quantize_and_store(*layer, torch.arange(2), k, k, "1.0", 1.0)
    assert not any(t.any() for t in layer)


def test_block_fp4_store_with_per_head_scales_names_the_buffer():
    m = BlockFP4KVMethod()
    bufs = m.create_buffers(8, H, D, 1, "cpu")
    k = random_kv((2, H, D))
    per_head = torch.zeros(8, H, D // 16, dtype=torch.uint8)  # NVFP4's layout, not block-FP4's
    with pytest.raises(ValueError, match=r"k_scale_buffer must be 2-D \[8, 2 \* N/16\]"):
        m.quantize_and_store(bufs["k_buffer"][0], bufs["v_buffer"][0], per_head, bufs["v_scale_buffer"][0],
                             torch.arange(2), k, k)
    assert not bufs["k_buffer"][0].any() and not bufs["v_scale_buffer"][0].any()


def test_dequantize_prev_kv_rejects_a_layer_without_scales():
    m = NVFP4KVMethod(2, "cpu")
    data, scales = torch_fp4kv.quantize(random_kv((1, H, D)), "nvfp4")
    with pytest.raises(ValueError, match="layer_id 2 is outside k_scales_gpu's 2 layers"):
        m.dequantize_prev_kv(data, scales, data, scales, 2)


def test_padding_slots_are_skipped_where_sglang_would_index_from_the_end():
    """Deliberate difference: SGLang's `k_buffer[loc] = ...` writes loc -1 into the last slot;
    the ops skip slots outside the buffer, as engines padding CUDA-graph batches need."""
    m = BlockFP4KVMethod()
    bufs = m.create_buffers(8, H, D, 1, "cpu")
    k = random_kv((2, H, D))
    m.quantize_and_store(bufs["k_buffer"][0], bufs["v_buffer"][0], bufs["k_scale_buffer"][0], bufs["v_scale_buffer"][0],
                         torch.tensor([1, -1]), k, k)
    assert bufs["k_buffer"][0][1].any() and not bufs["k_buffer"][0][7].any()


# ---- the tensor utilities (kvfp4_tensor) --------------------------------------------------------


@pytest.mark.parametrize("global_scale", [torch.tensor([0.5]), torch.tensor(0.5), 0.5], ids=["[1]", "0-d", "float"])
def test_nvfp4_util_round_trip_matches_the_ops(global_scale):
    x = random_kv((2, 3, D))
    fp4_data, block_scales, gs = NVFP4KVQuantizeUtil.quantize(x, global_scale)
    assert fp4_data.shape == (2, 3, D // 2) and fp4_data.dtype == torch.uint8
    assert block_scales.shape == (2, 3, D // 16) and block_scales.dtype == FP8
    assert gs.dtype == torch.float32 and gs.shape == (1,) and gs.item() == 0.5
    data, scales = torch_fp4kv.quantize(x, "nvfp4", torch.tensor([0.5]))
    assert_same_bytes(fp4_data, data)
    assert_same_bytes(block_scales.view(torch.uint8), scales)
    recon = NVFP4KVQuantizeUtil.dequantize(fp4_data, block_scales, gs)
    assert_same_bytes(recon, torch_fp4kv.dequantize(data, scales, "nvfp4", torch.tensor([0.5])))
    half = NVFP4KVQuantizeUtil.dequantize(fp4_data, block_scales, global_scale, dtype=torch.float16)
    assert_same_bytes(half, torch_fp4kv.dequantize(data, scales, "nvfp4", torch.tensor([0.5]), torch.float16))


def test_nvfp4_util_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="global_scale: NVFP4 needs"):
        NVFP4KVQuantizeUtil.quantize(random_kv((1, 2, D)), None)
    with pytest.raises(ValueError, match=r"tensor must be 3-D \[B, M, N\]"):
        NVFP4KVQuantizeUtil.quantize(random_kv((2, D)), 1.0)


def test_block_fp4_util_flattens_scales_per_row_as_sglang():
    """Scale j of row (b, m) sits at [b, m * N/16 + j]: byte ceil(log2(amax / 6)) + 127."""
    b, m, n = 2, 3, 32
    exponents = torch.arange(b * m * n // 16).reshape(b, m, n // 16) - 5
    x = (torch.exp2(exponents.float()) * 6).repeat_interleave(16, dim=-1)  # each block's amax is 6 * 2^e
    data, scales = BlockFP4KVQuantizeUtil.batched_quantize(x)
    assert data.shape == (b, m, n // 2) and scales.shape == (b, m * n // 16) and scales.dtype == torch.uint8
    assert torch.equal(scales, (exponents + 127).to(torch.uint8).reshape(b, m * n // 16))
    assert torch.equal(BlockFP4KVQuantizeUtil.batched_dequantize(data, scales, torch.float32), x)


def test_block_fp4_util_matches_the_ops():
    assert KVFP4QuantizeUtil is BlockFP4KVQuantizeUtil
    x = random_kv((4, 8, D))
    packed, scales = BlockFP4KVQuantizeUtil.batched_quantize(x)
    data, per_head = torch_fp4kv.quantize(x, "blockfp4")
    assert_same_bytes(packed, data)
    assert_same_bytes(scales, per_head.flatten(1))
    assert_same_bytes(BlockFP4KVQuantizeUtil.batched_dequantize(packed, scales), torch_fp4kv.dequantize(data, per_head, "blockfp4"))
    with pytest.raises(ValueError, match=r"quant_tensor must be 3-D"):
        BlockFP4KVQuantizeUtil.batched_dequantize(packed[0], scales[0])
    with pytest.raises(ValueError, match=r"scale_factors must be 2-D \[4, 8 \* N/16\]"):
        BlockFP4KVQuantizeUtil.batched_dequantize(packed, per_head)


# ---- load_scales_from_model(model_runner) --------------------------------------------------------


def _attention(layer_id, k_scale=None, v_scale=None):
    return SimpleNamespace(layer_id=layer_id, k_scale=k_scale, v_scale=v_scale)


def _model_runner(*layers):
    """What SGLang's NVFP4KVMethod reads: model_runner.model.model.layers[i].<attention>."""
    return SimpleNamespace(model=SimpleNamespace(model=SimpleNamespace(layers=list(layers))))


def test_load_scales_from_model_reads_every_sglang_attention_location():
    runner = _model_runner(
        SimpleNamespace(self_attn=SimpleNamespace(attn=_attention(0, torch.tensor(0.5), torch.tensor(0.25)))),
        SimpleNamespace(self_attn=SimpleNamespace(attn_mqa=_attention(1, torch.tensor([2.0]), 4.0))),
        SimpleNamespace(attn=_attention(2, torch.tensor(3.0))),  # no v_scale: 1.0
        SimpleNamespace(attention=SimpleNamespace(attn=_attention(3, 0.125, 0.0625))),
        SimpleNamespace(mlp=None),  # no attention (e.g. a linear-attention layer)
    )
    m = NVFP4KVMethod(num_layers=4, device="cpu")
    k_scales_before = m.k_scales_gpu
    assert m.load_scales_from_model(runner) is None
    assert m.k_scales_gpu.tolist() == [0.5, 2.0, 3.0, 0.125]
    assert m.v_scales_gpu.tolist() == [0.25, 4.0, 1.0, 0.0625]
    assert m.k_scales_gpu is k_scales_before, "written in place: captured CUDA graphs keep reading it"
    m.load_scales_from_model(runner, sm_version=100)  # TRT-LLM XQA on SM100 expects amax / 448
    assert m.sm_version == 100 and m.k_scales_gpu.tolist() == [3.0, 12.0, 18.0, 0.75]


def test_load_scales_from_model_grows_for_sparse_global_layer_ids():
    # Hybrid models (e.g. with linear-attention layers) number attention layers by global id.
    m = NVFP4KVMethod(num_layers=2, device="cpu")
    m.load_scales_from_model(_model_runner(SimpleNamespace(attn=_attention(5, 0.5, 0.75))))
    assert m.k_scales_gpu.tolist() == [1.0] * 5 + [0.5] and m.v_scales_gpu.tolist() == [1.0] * 5 + [0.75]


def test_load_scales_from_model_resolves_qwen3_omni_thinker():
    class Qwen3OmniMoeForConditionalGeneration:
        thinker = SimpleNamespace(model=SimpleNamespace(layers=[SimpleNamespace(attn=_attention(0, 0.5, 0.5))]))

    m = NVFP4KVMethod(num_layers=1, device="cpu")
    m.load_scales_from_model(SimpleNamespace(model=Qwen3OmniMoeForConditionalGeneration()))
    assert m.k_scales_gpu.tolist() == [0.5]
    assert BlockFP4KVMethod().load_scales_from_model(None) is None  # no scales to load


# ---- a KV pool ported from SGLang ----------------------------------------------------------------


class SGLangStylePool:
    """The FP4 path of SGLang's MHATokenToKVPool, calling the method as the pool does: buffers for
    size + page_size slots (one padding page), per-layer stores with the method's own global
    scales, and prefill's dequantized prefixes packed into the shared FP8 workspace."""

    def __init__(self, factory, name, size, page_size, head_num, head_dim, layer_num, start_layer, device):
        kwargs = {"num_layers": start_layer + layer_num, "device": device} if name == "nvfp4" else {}
        self.quant_method = factory(name, **kwargs)
        self.size, self.page_size, self.start_layer = size, page_size, start_layer
        buf = self.quant_method.create_buffers(size + page_size, head_num, head_dim, layer_num, device)
        self.k_buffer, self.v_buffer = buf["k_buffer"], buf["v_buffer"]
        self.k_scale_buffer, self.v_scale_buffer = buf.get("k_scale_buffer"), buf.get("v_scale_buffer")
        self.dq_k_buffer, self.dq_v_buffer = buf.get("dq_k_buffer"), buf.get("dq_v_buffer")
        self.store_dtype = buf.get("store_dtype", torch.uint8)

    def tensors(self):
        per_layer = self.k_buffer + self.v_buffer + self.k_scale_buffer + self.v_scale_buffer
        return per_layer + [self.dq_k_buffer, self.dq_v_buffer]

    def _quantized_scales(self, global_layer_id, k_scale, v_scale):
        if k_scale is None and hasattr(self.quant_method, "k_scales_gpu"):
            k_scale = self.quant_method.k_scales_gpu[global_layer_id: global_layer_id + 1]
            v_scale = self.quant_method.v_scales_gpu[global_layer_id: global_layer_id + 1]
        return k_scale, v_scale

    def set_kv_buffer(self, layer_id, loc, cache_k, cache_v, k_scale=None, v_scale=None):
        local = layer_id - self.start_layer
        k_scale, v_scale = self._quantized_scales(layer_id, k_scale, v_scale)
        self.quant_method.quantize_and_store(
            self.k_buffer[local], self.v_buffer[local], self.k_scale_buffer[local], self.v_scale_buffer[local],
            loc, cache_k, cache_v, k_scale, v_scale,
        )

    def prepare_extend_workspace(self, layer_id, req_to_token, req_pool_indices, prefix_lens):
        """Each request's cached prefix, dequantized to FP8, at page-aligned workspace offsets
        from one page in; returns each request's (start, end) in the workspace."""
        local = layer_id - self.start_layer
        k_fp4, v_fp4 = self.k_buffer[local], self.v_buffer[local]
        k_scales, v_scales = self.k_scale_buffer[local], self.v_scale_buffer[local]
        spans, start = [], self.page_size
        for req_idx, prev_len in zip(req_pool_indices, prefix_lens):
            prev_indices = req_to_token[req_idx, :prev_len]
            k_prev, v_prev = self.quant_method.dequantize_prev_kv(
                k_fp4[prev_indices], k_scales[prev_indices], v_fp4[prev_indices], v_scales[prev_indices], layer_id,
            )
            self.dq_k_buffer[start: start + prev_len] = k_prev
            self.dq_v_buffer[start: start + prev_len] = v_prev
            spans.append((start, start + prev_len))
            start = (start + prev_len + self.page_size - 1) // self.page_size * self.page_size
        return spans


# (SGLang's factory, its name for the recipe, this library's recipe): PR #21954's names and today's.
SGLANG_FACTORIES = [(get_fp4_kv_cache_quant_method, "nvfp4", "nvfp4"), (get_fp4_kv_cache_quant_method, "blockfp4", "blockfp4"),
                    (get_kv_cache_quant_method, "nvfp4", "nvfp4"), (get_kv_cache_quant_method, "mxfp4", "blockfp4")]


@pytest.mark.parametrize("factory, name, recipe", SGLANG_FACTORIES,
                         ids=[f"{f.__name__}-{n}" for f, n, _ in SGLANG_FACTORIES])
def test_sglang_style_pool_sized_stored_and_read_for_prefill(factory, name, recipe):
    page_size, layer_num, start_layer = 4, 2, 3  # a pipeline stage holding global layers 3 and 4
    sizing = factory(name, **({"num_layers": start_layer + layer_num, "device": "cpu"} if name == "nvfp4" else {}))
    kv_size = torch.empty((), dtype=torch.uint8).element_size()  # SGLang: the storage dtype's size
    cell = sizing.compute_cell_size(H, D, layer_num, kv_size)
    budget = 40 * 1024
    max_total_num_tokens = budget // cell
    size = max_total_num_tokens - page_size
    pool = SGLangStylePool(factory, name, size, page_size, H, D, layer_num, start_layer, "cpu")
    allocated = sum(t.numel() * t.element_size() for t in pool.tensors())
    assert allocated == cell * (size + page_size) <= budget, "compute_cell_size must size the pool exactly"

    global_scales = [(0.5, 0.25), (3.0, 0.125)]
    if recipe == "nvfp4":
        pool.quant_method.load_scales_from_model(_model_runner(*(
            SimpleNamespace(self_attn=SimpleNamespace(attn=_attention(start_layer + i, k_g, v_g)))
            for i, (k_g, v_g) in enumerate(global_scales))))
    primary = _primary_method(recipe, size + page_size, layer_num, global_scales if recipe == "nvfp4" else ())

    req_to_token = (torch.randperm(size)[:30] + page_size).view(3, 10)  # slots below page_size: padding
    prefix_lens = [10, 7, 3]
    for local in range(layer_num):
        for req, prev_len in enumerate(prefix_lens):
            loc = req_to_token[req, :prev_len]
            k, v = random_kv((prev_len, H, D)), random_kv((prev_len, H, D))
            pool.set_kv_buffer(start_layer + local, loc, k, v)
            primary.quantize_and_store(local, loc, k, v)
    for local in range(layer_num):
        assert_same_bytes(pool.k_buffer[local], primary.buffers.k_data[local])
        assert_same_bytes(pool.v_buffer[local], primary.buffers.v_data[local])
        assert_same_bytes(_as_primary_scales(recipe, pool.k_scale_buffer[local]), primary.buffers.k_scales[local])
        spans = pool.prepare_extend_workspace(start_layer + local, req_to_token, [2, 0, 1],
                                              [prefix_lens[2], prefix_lens[0], prefix_lens[1]])
        assert spans == [(4, 7), (8, 18), (20, 27)]
        for (begin, end), req in zip(spans, [2, 0, 1]):
            k_ref, v_ref = primary.dequantize_prev_kv(local, req_to_token[req, :end - begin], FP8)
            assert_same_bytes(pool.dq_k_buffer[begin:end], k_ref)
            assert_same_bytes(pool.dq_v_buffer[begin:end], v_ref)


# ---- errors name SGLang's arguments --------------------------------------------------------------


def _store_call(recipe, **changes):
    """A quantize_and_store call on a fresh pool layer with `changes` to its arguments; returns the
    method, the call's arguments and the pool's buffers."""
    m = _sglang_method(recipe, num_layers=1)
    bufs = m.create_buffers(8, H, D, 1, "cpu")
    args = dict(k_buffer=bufs["k_buffer"][0], v_buffer=bufs["v_buffer"][0], k_scale_buffer=bufs["k_scale_buffer"][0],
                v_scale_buffer=bufs["v_scale_buffer"][0], loc=torch.arange(2), cache_k=random_kv((2, H, D)),
                cache_v=random_kv((2, H, D)))
    if recipe == "nvfp4":
        args.update(k_scale=torch.ones(1), v_scale=torch.ones(1))
    args.update({name: value(args) if callable(value) else value for name, value in changes.items()})
    return m, args, [bufs[name][0] for name in ("k_buffer", "v_buffer", "k_scale_buffer", "v_scale_buffer")]


# (case id, recipe, changes to the store's arguments, error, SGLang's name, a name the message must not use)
SGLANG_STORE_CASES = [
    ("k_scale float64", "nvfp4", dict(k_scale=torch.ones(1, dtype=torch.float64)), TypeError, "k_scale",
     "k_global_scale"),
    ("v_scale shape", "nvfp4", dict(v_scale=torch.ones(2)), ValueError, "v_scale", "v_global_scale"),
    ("cache_k int32", "nvfp4", dict(cache_k=lambda a: a["cache_k"].int()), TypeError, "cache_k", "k"),
    ("cache_v shape", "blockfp4", dict(cache_v=lambda a: a["cache_v"][:, :1]), ValueError, "cache_v", "v"),
    *((f"k_buffer [size, H, D] {recipe}", recipe, dict(k_buffer=torch.zeros(8, H, D, dtype=torch.uint8)), ValueError,
       "k_buffer", "k_scale_buffer") for recipe in SGLANG_RECIPES),
    *((f"v_buffer short {recipe}", recipe, dict(v_buffer=lambda a: a["v_buffer"][:4]), ValueError, "v_buffer",
       "v_scale_buffer") for recipe in SGLANG_RECIPES),
    ("k_buffer int8", "blockfp4", dict(k_buffer=lambda a: a["k_buffer"].view(torch.int8)), TypeError, "k_buffer",
     "k_data"),
    ("v_scale_buffer float", "nvfp4", dict(v_scale_buffer=lambda a: a["v_scale_buffer"].float()), TypeError,
     "v_scale_buffer", "v_scales"),
    ("v_scale_buffer width", "blockfp4", dict(v_scale_buffer=lambda a: a["v_scale_buffer"][:, :4].contiguous()),
     ValueError, "v_scale_buffer", "v_scales"),
]


@pytest.mark.parametrize("recipe, changes, error, name, internal", [c[1:] for c in SGLANG_STORE_CASES],
                         ids=[c[0] for c in SGLANG_STORE_CASES])
def test_store_errors_name_sglangs_arguments(recipe, changes, error, name, internal):
    m, args, layer = _store_call(recipe, **changes)
    with pytest.raises(error) as info:
        m.quantize_and_store(**args)
    message = str(info.value)
    assert re.search(rf"\b{name}\b", message), message
    assert not re.search(rf"\b{internal}\b", message), message
    assert not any(t.any() for t in layer)


def _prev_kv_args(recipe):
    data, scales = torch_fp4kv.quantize(random_kv((3, H, D)), recipe)
    sglang_scales = scales.flatten(1) if recipe == "blockfp4" else scales
    return dict(k_fp4=data, k_scales=sglang_scales, v_fp4=data.clone(), v_scales=sglang_scales.clone(), layer_id=0)


# (case id, recipe, changes to dequantize_prev_kv's arguments, error, SGLang's name, a name not to use)
PREV_KV_CASES = [
    ("k_fp4 int8", "nvfp4", dict(k_fp4=lambda a: a["k_fp4"].view(torch.int8)), TypeError, "k_fp4", "data"),
    ("v_scales width", "nvfp4", dict(v_scales=lambda a: a["v_scales"][..., :2]), ValueError, "v_scales", "scales"),
    ("v_fp4 head_dim", "blockfp4", dict(v_fp4=lambda a: a["v_fp4"][..., :4]), ValueError, "v_fp4", "v_scales"),
    ("k_scales float", "blockfp4", dict(k_scales=lambda a: a["k_scales"].float()), TypeError, "k_scales", "scales"),
]


@pytest.mark.parametrize("recipe, changes, error, name, internal", [c[1:] for c in PREV_KV_CASES],
                         ids=[c[0] for c in PREV_KV_CASES])
def test_dequantize_prev_kv_errors_name_sglangs_arguments(recipe, changes, error, name, internal):
    args = _prev_kv_args(recipe)
    args.update({key: value(args) for key, value in changes.items()})
    with pytest.raises(error) as info:
        _sglang_method(recipe).dequantize_prev_kv(**args)
    assert re.search(rf"\b{name}\b", str(info.value)), str(info.value)
    assert not re.search(rf"\b{internal}\b", str(info.value)), str(info.value)


UTIL_CASES = [
    ("nvfp4 tensor int32", lambda: NVFP4KVQuantizeUtil.quantize(torch.ones(1, H, D, dtype=torch.int32), 1.0),
     TypeError, "tensor", "x"),
    ("nvfp4 global_scale float64", lambda: NVFP4KVQuantizeUtil.quantize(random_kv((1, H, D)), torch.ones(1).double()),
     TypeError, "global_scale", "x"),
    ("nvfp4 block_scales width", lambda: NVFP4KVQuantizeUtil.dequantize(
        *torch_fp4kv.quantize(random_kv((1, H, D)), "nvfp4")[:1], torch.zeros(1, H, 2, dtype=torch.uint8), 1.0),
     ValueError, "block_scales", "scales"),
    ("nvfp4 quant_tensor int8", lambda: NVFP4KVQuantizeUtil.dequantize(
        torch.zeros(1, H, D // 2, dtype=torch.int8), torch.zeros(1, H, D // 16, dtype=torch.uint8), 1.0),
     TypeError, "quant_tensor", "data"),
    ("blockfp4 tensor head_dim", lambda: BlockFP4KVQuantizeUtil.batched_quantize(random_kv((1, H, 40))),
     ValueError, "tensor", "x"),
    ("blockfp4 quant_tensor int8", lambda: BlockFP4KVQuantizeUtil.batched_dequantize(
        torch.zeros(1, H, D // 2, dtype=torch.int8), torch.zeros(1, H * D // 16, dtype=torch.uint8)),
     TypeError, "quant_tensor", "scale_factors"),
    ("blockfp4 scale_factors float", lambda: BlockFP4KVQuantizeUtil.batched_dequantize(
        torch.zeros(1, H, D // 2, dtype=torch.uint8), torch.zeros(1, H * D // 16)),
     TypeError, "scale_factors", "scales"),
]


@pytest.mark.parametrize("call, error, name, internal", [c[1:] for c in UTIL_CASES], ids=[c[0] for c in UTIL_CASES])
def test_tensor_util_errors_name_sglangs_arguments(call, error, name, internal):
    with pytest.raises(error) as info:
        call()
    assert re.search(rf"\b{name}\b", str(info.value)), str(info.value)
    assert not re.search(rf"\b{internal}\b", str(info.value)), str(info.value)


@pytest.mark.parametrize("num_layers", [-1, 0, 2.0])
def test_nvfp4_method_rejects_a_bad_layer_count(num_layers):
    with pytest.raises(ValueError, match=rf"num_layers must be an int >= 1, got {num_layers}"):
        NVFP4KVMethod(num_layers, "cpu")


# ---- today's SGLang names (kv_cache_quant_method) --------------------------------------------------


def test_todays_registry_factory_and_names():
    assert KV_CACHE_QUANT_REGISTRY == {"nvfp4": NVFP4Method, "mxfp4": MXFP4Method}
    assert KVCacheQuantMethod is FP4KVCacheQuantMethod and NVFP4Method is NVFP4KVMethod
    assert issubclass(MXFP4Method, BlockFP4KVMethod) and FP4MXBlock16KVQuantizeUtil is BlockFP4KVQuantizeUtil
    nvfp4 = get_kv_cache_quant_method("nvfp4", num_layers=2, device="cpu", sm_version=120)
    mxfp4 = get_kv_cache_quant_method("mxfp4")
    assert (nvfp4.name, nvfp4.scale_block_size, mxfp4.name, mxfp4.scale_block_size) == ("nvfp4", 16, "mxfp4", 16)
    assert nvfp4.needs_global_scale() and not mxfp4.needs_global_scale() and mxfp4.needs_dequant_workspace()
    with pytest.raises(ValueError, match=r"Unknown fp4_kv_cache_recipe: 'blockfp4'\. Available: \['nvfp4', 'mxfp4'\]"):
        get_kv_cache_quant_method("blockfp4")


def test_scale_block_size_is_a_class_attribute_under_both_names():
    """SGLang reads `scale_block_size` off the class (`NVFP4Method.scale_block_size`); the PR spells
    it SCALE_BLOCK_SIZE. One value under both names, whichever a subclass sets."""
    assert NVFP4Method.scale_block_size == NVFP4Method.SCALE_BLOCK_SIZE == 16
    assert MXFP4Method.scale_block_size * 8 == 128 and KVCacheQuantMethod.scale_block_size == 1

    class Block32(NVFP4Method):
        scale_block_size = 32

    assert Block32.SCALE_BLOCK_SIZE == 32


def test_a_method_that_sizes_no_pool_need_not_compute_a_cell_size():
    """compute_cell_size is an ordinary method, as in SGLang's base class (its NoneMethod implements
    only the three abstract ones)."""

    class NoneMethod(KVCacheQuantMethod):
        name = "none"

        def create_buffers(self, size, head_num, head_dim, layer_num, device):
            return {}

        def quantize_and_store(self, *args, **kwargs):
            pass

        def dequantize_prev_kv(self, k_fp4, k_scales, v_fp4, v_scales, layer_id):
            return k_fp4, v_fp4

    with pytest.raises(NotImplementedError, match="NoneMethod does not compute a cell size"):
        NoneMethod().compute_cell_size(8, 128, 2, 1)


def test_cell_size_checks_its_sizes_as_create_buffers_does():
    method = get_kv_cache_quant_method("nvfp4", num_layers=2, device="cpu")
    for sizes, match in (((-8, 128, 2, 1), "head_num must be an int >= 1, got -8"),
                         ((8, 100, 2, 1), "head_dim 100 is not a positive multiple"),
                         ((8, 128, 0, 1), "num_layers must be an int >= 1, got 0"),
                         ((8, 128, 2, -1), "kv_size must be an int >= 1, got -1")):
        with pytest.raises(ValueError, match=match):
            method.compute_cell_size(*sizes)


def test_todays_mxfp4_is_the_block16_recipe_not_ocp_mxfp4():
    """SGLang's MXFP4Method stores its block-16 E8M0 recipe (this library's blockfp4), the bytes
    BlockFP4KVMethod writes, never OCP MXFP4's 32-element blocks."""
    k, v = random_kv((6, H, D)), random_kv((6, H, D))
    loc = torch.tensor([5, 0, 3, 7, 1, 2])
    written = []
    for method in (MXFP4Method(), BlockFP4KVMethod()):
        bufs = method.create_buffers(8, H, D, 1, "cpu")
        layer = [bufs[name][0] for name in ("k_buffer", "v_buffer", "k_scale_buffer", "v_scale_buffer")]
        method.quantize_and_store(*layer, loc, k, v)
        written.append((layer, method.dequantize_prev_kv(layer[0][loc], layer[2][loc], layer[1][loc], layer[3][loc], 0)))
    (ours, read), (theirs, their_read) = written
    for a, b in zip(ours + list(read), theirs + list(their_read)):
        assert_same_bytes(a, b)
    assert ours[2].shape == (8, H * D // 16)  # per-token scales, one per 16 elements
    assert_same_bytes(ours[0][loc], torch_fp4kv.quantize(k, "blockfp4")[0])


def test_native_prefill_allocates_and_counts_no_workspace():
    method = NVFP4Method(2, "cpu", native_prefill=True)
    assert not method.needs_dequant_workspace() and NVFP4Method(2, "cpu").needs_dequant_workspace()
    bufs = method.create_buffers(16, 8, 128, 2, "cpu")
    assert bufs["dq_k_buffer"] is None and bufs["dq_v_buffer"] is None
    allocated = sum(t.numel() * t.element_size() for name in ("k_buffer", "v_buffer", "k_scale_buffer", "v_scale_buffer")
                    for t in bufs[name])
    assert method.compute_cell_size(8, 128, 2, 1) * 16 == allocated  # SGLang's own counts the workspace anyway
    assert NVFP4Method(2, "cpu").compute_cell_size(8, 128, 2, 1) == method.compute_cell_size(8, 128, 2, 1) + 2 * 8 * 128
    k = random_kv((3, H, D))
    data, scales = torch_fp4kv.quantize(k, "nvfp4")
    k_out, _ = NVFP4Method(1, "cpu", native_prefill=True).dequantize_prev_kv(data, scales, data, scales, 0)
    assert_same_bytes(k_out, torch_fp4kv.dequantize(data, scales, "nvfp4", torch.ones(1), FP8))
    with pytest.raises(TypeError, match="native_prefill must be a bool"):
        NVFP4Method(1, "cpu", native_prefill="yes")


def test_nvfp4_util_dequantize_takes_the_prs_layer_id_and_the_shorter_call():
    fp4_data, block_scales, gs = NVFP4KVQuantizeUtil.quantize(random_kv((2, 3, D)), 0.5)
    expected = torch_fp4kv.dequantize(fp4_data, block_scales.view(torch.uint8), "nvfp4", gs, torch.float16)
    for call in (lambda: NVFP4KVQuantizeUtil.dequantize(fp4_data, block_scales, gs, 7, torch.float16),  # PR #21954
                 lambda: NVFP4KVQuantizeUtil.dequantize(fp4_data, block_scales, gs, torch.float16),  # SGLang's
                 lambda: NVFP4KVQuantizeUtil.dequantize(fp4_data, block_scales, gs, layer_id=0, dtype=torch.float16)):
        assert_same_bytes(call(), expected)
    assert NVFP4KVQuantizeUtil.dequantize(fp4_data, block_scales, gs, 3).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="layer_id must be an int, got str"):
        NVFP4KVQuantizeUtil.dequantize(fp4_data, block_scales, gs, "0")
    with pytest.raises(TypeError, match="dtype twice"):
        NVFP4KVQuantizeUtil.dequantize(fp4_data, block_scales, gs, torch.float16, dtype=torch.bfloat16)


def test_load_scales_from_a_calibration_state_dict():
    """torch_fp4kv's calibration state dicts (a checkpoint's scales through
    checkpoint_scales.load_kv_scales, or hf.calibrate's) load like a model runner's attention layers."""
    m = NVFP4Method(num_layers=2, device="cpu")
    before = m.k_scales_gpu
    state = {"layers.0.k_scale": torch.tensor([0.5]), "layers.0.v_scale": torch.tensor([0.25]),
             "model.layers.1.self_attn.k_scale": torch.tensor(2.0), "model.layers.1.self_attn.v_scale": 4.0}
    assert m.load_scales_from_model(state) is None
    assert m.k_scales_gpu.tolist() == [0.5, 2.0] and m.v_scales_gpu.tolist() == [0.25, 4.0]
    assert m.k_scales_gpu is before
    m.load_scales_from_model({"layers.3.k_scale": 1.0, "layers.3.v_scale": 0.5}, sm_version=100)
    # as SGLang: a layer id past the tensors reallocates them (at 1.0), and SM100 multiplies by 6
    assert m.k_scales_gpu.tolist() == [1.0, 1.0, 1.0, 6.0] and m.v_scales_gpu.tolist() == [1.0, 1.0, 1.0, 3.0]
    with pytest.raises(ValueError, match=r"k_scale for layers \[0\] but v_scale for layers \[\]"):
        m.load_scales_from_model({"layers.0.k_scale": 1.0})
    with pytest.raises(ValueError, match="layer 0's v_scale must have one element"):
        m.load_scales_from_model({"layers.0.k_scale": 1.0, "layers.0.v_scale": torch.ones(2)})
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="layer 1's v_scale is .*: a global scale must be finite and > 0"):
            m.load_scales_from_model({"layers.1.k_scale": 1.0, "layers.1.v_scale": bad})


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -2.0])
def test_load_scales_from_a_model_runner_checks_each_value(bad):
    """A model runner's attention scales that cannot be global scales are errors naming the layer."""
    m = NVFP4Method(num_layers=2, device="cpu")
    with pytest.raises(ValueError, match="layer 1's k_scale is .*: a global scale must be finite and > 0"):
        m.load_scales_from_model(_model_runner(SimpleNamespace(attn=_attention(0, 0.5, 0.75)),
                                               SimpleNamespace(attn=_attention(1, bad, 0.75))))
    assert m.k_scales_gpu.tolist() == [1.0, 1.0], "nothing is written"
