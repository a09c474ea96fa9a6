"""Strategies, registry, factory and the engine pool (SGLang's own interface: test_sglang.py)."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fp4kv
from conftest import RECIPES, RMSE_BOUND, assert_same_bytes, random_kv
from torch_fp4kv import (
    FP4_KV_CACHE_QUANT_REGISTRY,
    BlockFP4Method,
    FP4KVCacheQuantMethod,
    FP4KVPool,
    FP4KVPoolLayer,
    KVCacheOptions,
    MXFP4Method,
    NVFP4Method,
    get_fp4_kv_cache_quant_method,
    register_fp4_kv_cache_quant_method,
)

SIZE, H, D, LAYERS = 16, 2, 64, 3


@pytest.mark.parametrize("name", sorted(FP4_KV_CACHE_QUANT_REGISTRY))
def test_every_registered_name_builds_a_method_that_stores_and_reads_back(name):
    """What the factory gives for a name keeps that format: it stores K and V and reads them back
    within the format's documented round-trip error, one layer apart from the others."""
    method = get_fp4_kv_cache_quant_method(name)
    assert isinstance(method, FP4KVCacheQuantMethod) and method.fmt.name == name
    method.create_buffers(SIZE, H, D, LAYERS, "cpu")
    k, v = torch.randn(SIZE, H, D), torch.randn(SIZE, H, D)
    loc = torch.randperm(SIZE)
    method.quantize_and_store(1, loc, k, v)
    for original, read in zip((k, v), method.dequantize_prev_kv(1, loc, torch.float32)):
        assert (read - original).norm() / original.norm() < RMSE_BOUND[name]
    assert not method.dequantize_prev_kv(0, loc, torch.float32)[0].any()


def test_every_recipe_has_a_registered_method():
    for recipe in RECIPES:
        assert get_fp4_kv_cache_quant_method(recipe).fmt.name == recipe


def test_factory_lists_valid_names_for_unknown_name():
    with pytest.raises(ValueError, match=r"unknown FP4 KV cache method 'fp3'; valid: \['blockfp4', 'mxfp4', 'nvfp4', 'nvfp4_4over6'\]"):
        get_fp4_kv_cache_quant_method("fp3")


def test_register_third_party_method(monkeypatch):
    monkeypatch.setattr(torch_fp4kv.methods, "FP4_KV_CACHE_QUANT_REGISTRY", dict(FP4_KV_CACHE_QUANT_REGISTRY))

    @register_fp4_kv_cache_quant_method("nvfp4_bf16_prefill")
    class NVFP4WithBF16Prefill(NVFP4Method):
        prev_kv_dtype = torch.bfloat16

    method = get_fp4_kv_cache_quant_method("nvfp4_bf16_prefill")
    assert isinstance(method, NVFP4WithBF16Prefill) and not method.needs_dequant_workspace()
    with pytest.raises(ValueError, match="already registered"):
        register_fp4_kv_cache_quant_method("nvfp4")(NVFP4WithBF16Prefill)
    with pytest.raises(TypeError, match="not an FP4KVCacheQuantMethod subclass"):
        register_fp4_kv_cache_quant_method("plain")(object)


_INTERFACE = ("create_buffers", "quantize_and_store", "dequantize_prev_kv", "compute_cell_size")


@pytest.mark.parametrize("missing", _INTERFACE)
def test_a_method_must_implement_the_whole_interface(missing):
    """A subclass that implements the four operations engines call can be made; one that leaves any
    of them out cannot, and the error names what is missing."""
    body = {name: lambda self, *args: None for name in _INTERFACE}
    type("Complete", (FP4KVCacheQuantMethod,), body)()
    del body[missing]
    with pytest.raises(TypeError, match=missing):
        type("Partial", (FP4KVCacheQuantMethod,), body)()
    with pytest.raises(TypeError):
        FP4KVCacheQuantMethod()


@pytest.mark.parametrize("recipe", RECIPES)
def test_create_buffers_and_exact_cell_size(recipe):
    method = get_fp4_kv_cache_quant_method(recipe)
    buffers = method.create_buffers(SIZE, H, D, LAYERS, "cpu")
    block = method.fmt.block_size
    assert buffers.store_dtype == torch.uint8
    for name, last in (("k_data", D // 2), ("v_data", D // 2), ("k_scales", D // block), ("v_scales", D // block)):
        tensors = getattr(buffers, name)
        assert len(tensors) == LAYERS and all(t.shape == (SIZE, H, last) and t.dtype == torch.uint8 for t in tensors)
    allocated = [t for name in ("k_data", "v_data", "k_scales", "v_scales") for t in getattr(buffers, name)]
    if buffers.dequant_workspace is not None:
        allocated += list(buffers.dequant_workspace)
    total = sum(t.numel() * t.element_size() for t in allocated)
    assert method.compute_cell_size(H, D, LAYERS) * SIZE == total
    nvfp4_family = torch_fp4kv.FORMATS[recipe].has_global_scale  # nvfp4, nvfp4_4over6
    assert method.needs_global_scale() == nvfp4_family
    assert method.needs_dequant_workspace() == nvfp4_family
    assert (buffers.dequant_workspace is not None) == method.needs_dequant_workspace()


def test_cell_size_matches_the_design_table():
    # 2 tensors x H x (D/2 + D/block) per layer; D=128: 72 bytes per head per tensor.
    assert BlockFP4Method().compute_cell_size(head_num=8, head_dim=128, layer_num=1) == 2 * 8 * 72
    assert MXFP4Method().compute_cell_size(head_num=8, head_dim=128, layer_num=1) == 2 * 8 * 68
    # NVFP4 adds one layer's FP8 workspace, shared by all layers.
    assert NVFP4Method().compute_cell_size(head_num=8, head_dim=128, layer_num=4) == 4 * 2 * 8 * 72 + 2 * 8 * 128


def test_create_buffers_rejects_bad_sizes():
    with pytest.raises(ValueError, match="head_dim: head_dim 48 is not a positive multiple of the mxfp4 block size 32"):
        MXFP4Method().create_buffers(SIZE, H, 48, 1, "cpu")
    with pytest.raises(ValueError, match="layer_num must be an int >= 1, got 0"):
        BlockFP4Method().create_buffers(SIZE, H, D, 0, "cpu")
    with pytest.raises(ValueError, match="size must be an int >= 1, got 0"):
        BlockFP4Method().create_buffers(0, H, D, 1, "cpu")


def test_using_a_method_before_create_buffers_says_so():
    with pytest.raises(RuntimeError, match="call create_buffers"):
        NVFP4Method().quantize_and_store(0, torch.arange(1), torch.randn(1, H, D), torch.randn(1, H, D))


def test_nvfp4_global_scales_are_float32_device_tensors_default_one():
    buffers = NVFP4Method().create_buffers(SIZE, H, D, LAYERS, "cpu")
    for scales in (buffers.k_global_scales, buffers.v_global_scales):
        assert len(scales) == LAYERS
        assert all(s.dtype == torch.float32 and s.shape == (1,) and s.item() == 1.0 for s in scales)
    assert BlockFP4Method().create_buffers(SIZE, H, D, 1, "cpu").k_global_scales is None


@pytest.mark.parametrize("recipe", RECIPES)
def test_store_and_dequantize_prev_kv_match_the_ops(recipe):
    method = get_fp4_kv_cache_quant_method(recipe)
    method.create_buffers(SIZE, H, D, LAYERS, "cpu")
    k, v = random_kv((5, H, D)), random_kv((5, H, D))
    loc = torch.tensor([3, 0, 9, 12, 7])
    method.quantize_and_store(1, loc, k, v)
    k_g, v_g = method.global_scales(1)
    k_out, v_out = method.dequantize_prev_kv(1, loc, torch.bfloat16)
    assert_same_bytes(k_out, torch_fp4kv.dequantize(*torch_fp4kv.quantize(k, recipe, k_g), recipe, k_g))
    assert_same_bytes(v_out, torch_fp4kv.dequantize(*torch_fp4kv.quantize(v, recipe, v_g), recipe, v_g))
    untouched = method.dequantize_prev_kv(0, loc, torch.float32)[0]
    assert torch.equal(untouched, torch.zeros_like(untouched))


def test_nvfp4_prev_kv_lands_in_the_fp8_workspace():
    method = NVFP4Method()
    buffers = method.create_buffers(SIZE, H, D, LAYERS, "cpu")
    loc = torch.tensor([4, 1, 2])
    method.quantize_and_store(2, loc, random_kv((3, H, D)), random_kv((3, H, D)))
    k, v = method.dequantize_prev_kv(2, loc)
    k_ws, v_ws = buffers.dequant_workspace
    assert k.dtype == v.dtype == torch.float8_e4m3fn
    assert k.data_ptr() == k_ws.data_ptr() and v.data_ptr() == v_ws.data_ptr()
    assert_same_bytes(k, method.dequantize_prev_kv(2, loc, torch.bfloat16)[0].to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="dequant workspace holds 16"):
        method.dequantize_prev_kv(2, torch.zeros(SIZE + 1, dtype=torch.long))


def test_calibrate_sets_amax_over_448_times_6():
    method = NVFP4Method()
    method.create_buffers(SIZE, H, D, LAYERS, "cpu")
    k, v = torch.randn(10, H, D), torch.randn(10, H, D) * 100
    method.calibrate(1, k, v)
    k_g, v_g = method.global_scales(1)
    assert k_g.item() == pytest.approx(k.abs().max().item() / (448 * 6))
    assert v_g.item() == pytest.approx(v.abs().max().item() / (448 * 6))
    assert method.global_scales(0)[0].item() == 1.0


def test_calibrated_scale_avoids_saturation():
    method = NVFP4Method()
    method.create_buffers(SIZE, H, D, 1, "cpu")
    k = torch.randn(4, H, D) * 1e4  # far above 448 * 6: saturates with global scale 1.0
    loc = torch.arange(4)
    method.quantize_and_store(0, loc, k, k)
    saturated = (method.dequantize_prev_kv(0, loc, torch.float32)[0] - k).norm() / k.norm()
    method.calibrate(0, k, k)
    method.quantize_and_store(0, loc, k, k)
    calibrated = (method.dequantize_prev_kv(0, loc, torch.float32)[0] - k).norm() / k.norm()
    assert saturated > 0.5 and calibrated < 0.12


class _Attention(nn.Module):
    def __init__(self, k_scale, v_scale):
        super().__init__()
        self.register_buffer("k_scale", torch.tensor(k_scale))
        self.register_buffer("v_scale", torch.tensor(v_scale))


def test_load_scales_from_model_attention_modules():
    model = nn.Sequential(*(nn.Sequential(nn.Linear(2, 2), _Attention(0.5 + i, 2.0 + i)) for i in range(LAYERS)))
    method = NVFP4Method()
    method.create_buffers(SIZE, H, D, LAYERS, "cpu")
    assert method.load_scales_from_model(model) == LAYERS
    assert [tuple(s.item() for s in method.global_scales(i)) for i in range(LAYERS)] == [(0.5, 2.0), (1.5, 3.0), (2.5, 4.0)]


def test_load_scales_from_modelopt_state_dict():
    state = {
        "model.layers.2.self_attn.k_proj.weight": torch.zeros(1),
        "model.layers.2.self_attn.k_scale": torch.tensor(0.25),
        "model.layers.2.self_attn.v_scale": torch.tensor([0.125]),
        "model.layers.0.self_attn.k_scale": torch.tensor(4.0),
        "model.layers.0.self_attn.v_scale": torch.tensor(8.0),
        "model.layers.1.self_attn.k_scale": 2.0,
        "model.layers.1.self_attn.v_scale": 0.5,
    }
    method = NVFP4Method()
    buffers = method.create_buffers(SIZE, H, D, LAYERS, "cpu")
    before = [s.data_ptr() for s in buffers.k_global_scales]
    assert method.load_scales_from_model(state) == 3
    assert [s.item() for s in buffers.k_global_scales] == [4.0, 2.0, 0.25]
    assert [s.item() for s in buffers.v_global_scales] == [8.0, 0.5, 0.125]
    assert [s.data_ptr() for s in buffers.k_global_scales] == before, "scales must be updated in place"


def test_load_scales_from_model_takes_the_layer_from_module_names():
    """Scales on `model.layers.1` are layer 1's, whatever the module order; layer 0 without them
    is an error naming it, not a silent 1.0."""
    layers = nn.ModuleList([nn.Linear(2, 2), nn.Sequential(_Attention(0.25, 0.5)), nn.Linear(2, 2)])
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = layers
    method = NVFP4Method()
    method.create_buffers(SIZE, H, D, LAYERS, "cpu")
    with pytest.raises(ValueError, match=r"k_scale found for layers \[1\] but not for layer 0"):
        method.load_scales_from_model(model)
    for i in (0, 2):
        layers[i] = _Attention(1.0 + i, 2.0 + i)
    assert method.load_scales_from_model(model) == LAYERS
    assert [tuple(s.item() for s in method.global_scales(i)) for i in range(LAYERS)] == [(1.0, 2.0), (0.25, 0.5), (3.0, 4.0)]


def test_load_scales_from_a_quantized_model_converts_its_format():
    """A model whose config names FP8 KV scales (compressed-tensors' kv_cache_scheme) gives NVFP4
    global scales amax / (448 * 6): its scales / 6, as checkpoint_scales.load_kv_scales reads them."""
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([nn.Module() for _ in range(LAYERS)])
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = _Attention(0.6 * (i + 1), 1.2 * (i + 1))
    model.config = SimpleNamespace(
        to_dict=lambda: {"num_hidden_layers": LAYERS,
                         "quantization_config": {"kv_cache_scheme": {"type": "float", "num_bits": 8}}},
        quantization_config={"kv_cache_scheme": {"type": "float", "num_bits": 8}})
    method = NVFP4Method()
    method.create_buffers(SIZE, H, D, LAYERS, "cpu")
    assert method.load_scales_from_model(model) == LAYERS
    for i in range(LAYERS):
        k, v = (s.item() for s in method.global_scales(i))
        assert k == pytest.approx(0.1 * (i + 1)) and v == pytest.approx(0.2 * (i + 1))


def test_load_scales_errors():
    method = NVFP4Method()
    method.create_buffers(SIZE, H, D, 1, "cpu")
    with pytest.raises(ValueError, match="no model.layers.0.attn.v_scale"):
        method.load_scales_from_model({"model.layers.0.attn.k_scale": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"k_scale found for layer 5, but the cache's layers are \[0\]"):
        method.load_scales_from_model({"layers.5.k_scale": torch.tensor(1.0), "layers.5.v_scale": torch.tensor(1.0)})
    with pytest.raises(TypeError, match="source must be an nn.Module or a state dict"):
        method.load_scales_from_model([1.0, 2.0])
    plain = BlockFP4Method()
    plain.create_buffers(SIZE, H, D, 1, "cpu")
    assert plain.load_scales_from_model({"layers.0.k_scale": 2.0, "layers.0.v_scale": 2.0}) == 0  # none to set


@pytest.mark.parametrize("recipe", RECIPES)
def test_cache_module_and_its_method_share_one_cache(recipe):
    """What the method stores, the module's buffers hold and its layer reads, and the other way
    round; the module's state dict carries the cache."""
    cache = FP4KVPool(recipe, SIZE, H, D, LAYERS)
    layer = cache.layers[1]
    k, v = random_kv((4, H, D)), random_kv((4, H, D))
    loc = torch.tensor([1, 5, 2, 11])
    g = torch.tensor([0.37]) if torch_fp4kv.FORMATS[recipe].has_global_scale else None
    if g is not None:
        cache.method.set_global_scales(1, g, g)
    cache.method.quantize_and_store(1, loc, k, v)
    k_data, k_scales = torch_fp4kv.quantize(k, recipe, g)
    assert_same_bytes(layer.k_data[loc], k_data)
    assert_same_bytes(cache.state_dict()["layers.1.k_scales"][loc], k_scales)
    assert_same_bytes(layer.read(loc, torch.float32)[0], torch_fp4kv.dequantize(k_data, k_scales, recipe, g, torch.float32))
    assert not cache.layers[0].k_data.any() and not cache.layers[2].k_data.any()
    layer.store(loc, v, k)  # and the module's stores are what the method reads
    assert_same_bytes(cache.method.dequantize_prev_kv(1, loc, torch.float32)[1],
                      torch_fp4kv.dequantize(*torch_fp4kv.quantize(k, recipe, g), recipe, g, torch.float32))
    assert cache.bytes_per_token() == cache.method.compute_cell_size(H, D, LAYERS)


def test_cache_module_needs_a_table_method():
    class Opaque(FP4KVCacheQuantMethod):
        create_buffers = quantize_and_store = dequantize_prev_kv = compute_cell_size = None

    with pytest.raises(TypeError, match="method must be a TableFP4Method"):
        FP4KVPool(Opaque(), SIZE, H, D, 1)


def test_method_scales_follow_the_cache_module_when_it_moves():
    """Calibration and scale loading write the tensors the stores use, also after a device move:
    on the tensors left behind they would fail (a meta value cannot be copied to the CPU), or on
    a GPU, silently change nothing the stores read."""
    cache = FP4KVPool("nvfp4", SIZE, H, D, 1).to("meta")
    method = cache.method
    k = torch.randn(4, H, D, device="meta")
    method.calibrate(0, k, k)
    method.set_global_scales(0, 2.0, 3.0)
    method.load_scales_from_model({"layers.0.k_scale": torch.tensor(0.5), "layers.0.v_scale": torch.tensor(0.5)})
    method.quantize_and_store(0, torch.arange(4, device="meta"), k, k)
    for scale in method.global_scales(0):
        assert scale.device.type == "meta" and scale.dtype == torch.float32


def test_cache_module_keeps_global_scales_float32_under_dtype_casts():
    cache = FP4KVPool("nvfp4", SIZE, H, D, 1).to(torch.bfloat16)
    assert cache.layers[0].k_global_scale.dtype == torch.float32
    assert cache.layers[0].k_data.dtype == torch.uint8
    assert cache.workspace.k.dtype == torch.float8_e4m3fn  # the prefill kernels' input stays FP8


@pytest.mark.parametrize("spelling", ["nvfp4", "nvfp4+rot+smooth+k8", "mxfp4+smooth"])
def test_pool_and_its_method_stay_one_set_of_tensors_after_to(spelling):
    """The layer modules own the tensors: the method's buffers lists, its layers and the pool's
    modules are the same tensors, before and after `.to()` (also the FP8 prefill workspace)."""
    pool = FP4KVPool(spelling, SIZE, H, D, LAYERS)

    def same_tensors():
        buffers = pool.method.buffers
        for i, layer in enumerate(pool.layers):
            assert pool.method.layer(i) is layer
            for listed, owned in ((buffers.k_data, layer.k_data), (buffers.v_scales, layer.v_scales),
                                  (buffers.k_global_scales, layer.k_global_scale), (buffers.k_means, layer.k_mean)):
                assert listed is None and owned is None or listed[i] is owned
        assert buffers.rotation is pool.layers[0].rotation
        if pool.workspace is not None:
            assert buffers.dequant_workspace == (pool.workspace.k, pool.workspace.v)

    same_tensors()
    pool.to("meta")
    same_tensors()
    buffers = pool.method.buffers
    moved = [*buffers.k_data, *buffers.v_data, *(buffers.dequant_workspace or ())]
    assert all(t.device.type == "meta" for t in moved)
    k = torch.randn(4, H, D, device="meta")
    pool.method.quantize_and_store(1, torch.arange(4, device="meta"), k, k)
    assert pool.method.dequantize_prev_kv(1, torch.arange(4, device="meta"))[0].device.type == "meta"


def test_pool_and_methods_take_options_spelled_or_whole():
    pool = FP4KVPool("nvfp4+rot+k8", SIZE, H, D, 1)
    assert pool.method.options == KVCacheOptions(rotate=True, k_fp8=True)
    assert pool.layers[0].recipe == "nvfp4+k8" and pool.layers[0].rotation is not None
    whole = get_fp4_kv_cache_quant_method("mxfp4", options=KVCacheOptions(smooth_k=True))
    assert isinstance(whole, MXFP4Method) and whole.options == KVCacheOptions(smooth_k=True)
    assert get_fp4_kv_cache_quant_method("nvfp4+rot", smooth_k=True).options == KVCacheOptions(rotate=True,
                                                                                              smooth_k=True)
    with pytest.raises(ValueError, match=r"rotate=False contradicts the recipe's \+rot"):
        get_fp4_kv_cache_quant_method("nvfp4+rot", rotate=False)
    with pytest.raises(ValueError, match="a method keeps every token in FP4"):
        get_fp4_kv_cache_quant_method("nvfp4+sink4")
    with pytest.raises(ValueError, match="unknown FP4 KV cache method 'int4'"):
        get_fp4_kv_cache_quant_method("int4+rot")


def test_layer_factory_checks_its_sizes():
    layer = FP4KVPoolLayer.allocate("nvfp4", KVCacheOptions(k_fp8=True, smooth_k=True), 8, H, D)
    assert layer.recipe == "nvfp4+k8" and layer.k_data.shape == (8, H, D) and layer.v_data.shape == (8, H, D // 2)
    assert layer.k_mean.shape == (H, D) and layer.k_global_scale.item() == layer.v_global_scale.item() == 1.0
    with pytest.raises(ValueError, match="slots must be an int >= 1"):
        FP4KVPoolLayer.allocate("nvfp4", KVCacheOptions(), 0, H, D)
    with pytest.raises(ValueError, match="a layer cache keeps every token in FP4"):
        FP4KVPoolLayer.allocate("nvfp4", KVCacheOptions(recent_tokens=4), 8, H, D)
    with pytest.raises(ValueError, match="fmt='fp3' is not a known recipe"):
        FP4KVPoolLayer.allocate("fp3", KVCacheOptions(), 8, H, D)


def test_former_names_still_work():
    """Deprecated aliases, kept for one release: the same classes and methods under the old names."""
    assert torch_fp4kv.FP4KVCache is FP4KVPool and torch_fp4kv.FP4KVLayerCache is FP4KVPoolLayer
    assert torch_fp4kv.NVFP4KVMethod is NVFP4Method and torch_fp4kv.BlockFP4KVMethod is BlockFP4Method
    assert torch_fp4kv.MXFP4KVMethod is MXFP4Method and torch_fp4kv.TableFP4KVMethod is torch_fp4kv.TableFP4Method
    pool = torch_fp4kv.FP4KVCache("nvfp4", 32, H, D, 1)
    method = torch_fp4kv.NVFP4KVMethod(rotate=True)
    method.create_buffers(32, H, D, 1, "cpu")
    layer = method.layer(0)
    assert isinstance(pool.layers[0], torch_fp4kv.FP4KVLayerCache)
    k = torch.randn(32, H, D)
    layer.store(torch.arange(32), k, k)
    q = torch.randn(1, H, D, dtype=torch.bfloat16)
    table, lens = torch.arange(2, dtype=torch.int32)[None], torch.tensor([32], dtype=torch.int32)
    torch.testing.assert_close(layer.decode(q, table, lens, 16), layer.decode_attention(q, table, lens, 16))
    cu = torch.tensor([0, 1], dtype=torch.int32)
    torch.testing.assert_close(layer.extend(q, cu, table, lens, 16), layer.extend_attention(q, cu, table, lens, 16))
    torch.testing.assert_close(layer.decode_k(k), layer.restore_k(k))
    torch.testing.assert_close(layer.decode_v(k), layer.restore_v(k))


@pytest.mark.parametrize("recipe", RECIPES)
def test_methods_say_how_attention_reads_them(recipe):
    method = get_fp4_kv_cache_quant_method(recipe)
    assert method.attention_read("decode") is torch_fp4kv.AttentionRead.NATIVE_FP4
    assert method.attention_read("extend") is torch_fp4kv.AttentionRead.NATIVE_FP4
    assert method.attention_read("prefill") is torch_fp4kv.AttentionRead.DEQUANTIZED
    with pytest.raises(ValueError, match="phase must be"):
        method.attention_read("train")


def test_method_decode_attention_reads_its_layer():
    """Attention over layer 1's cache, as its own dequantized K/V give it; layer 0 differs."""
    method = NVFP4Method()
    method.create_buffers(32, H, D, 2, "cpu")
    method.set_global_scales(1, 0.01, 0.02)
    k, v = torch.randn(32, H, D), torch.randn(32, H, D)
    method.quantize_and_store(1, torch.arange(32), k, v)
    q = torch.randn(2, 2 * H, D, dtype=torch.bfloat16)
    table = torch.arange(32, dtype=torch.int32).view(2, 16)
    lens = torch.tensor([16, 9], dtype=torch.int32)
    lse = torch.empty(2, 2 * H)
    out = method.decode_attention(1, q, table, lens, page_size=1, lse=lse)
    for b, n in enumerate(lens.tolist()):
        k_seq, v_seq = method.dequantize_prev_kv(1, table[b, :n], torch.float32)
        expected = F.scaled_dot_product_attention(q[b, :, None].float(), k_seq.transpose(0, 1), v_seq.transpose(0, 1),
                                                  enable_gqa=True)[:, 0]
        torch.testing.assert_close(out[b].float(), expected, atol=1e-2, rtol=1e-2)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k_seq.repeat_interleave(2, 1)) * D ** -0.5
        torch.testing.assert_close(lse[b], torch.logsumexp(scores, -1), atol=1e-4, rtol=1e-5)
    assert not torch.equal(out, method.decode_attention(0, q, table, lens, page_size=1))


@pytest.mark.parametrize("options", [{}, dict(rotate=True, smooth_k=True)])
def test_method_extend_attention_reads_its_layer(options):
    """Speculative verification through a method: 3 draft tokens per sequence, stored first, then
    attended causally over layer 1's cache as its own read-back K/V give it (with the accuracy
    options too: the rotation applied to q and undone on the output)."""
    method = get_fp4_kv_cache_quant_method("nvfp4", **options)
    method.create_buffers(32, H, D, 2, "cpu")
    method.set_global_scales(1, 0.01, 0.02)
    method.quantize_and_store(1, torch.arange(32), torch.randn(32, H, D), torch.randn(32, H, D))
    q = torch.randn(6, 2 * H, D, dtype=torch.bfloat16)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    table = torch.arange(32, dtype=torch.int32).view(2, 16)
    lens = torch.tensor([16, 9], dtype=torch.int32)
    out = method.extend_attention(1, q, cu, table, lens, page_size=1)
    for b, n in enumerate(lens.tolist()):
        k_seq, v_seq = method.layer(1).read(table[b, :n], torch.float32)
        for i in range(3):
            seen = n - 3 + i + 1
            expected = F.scaled_dot_product_attention(q[3 * b + i, :, None].float(), k_seq[:seen].transpose(0, 1),
                                                      v_seq[:seen].transpose(0, 1), enable_gqa=True)[:, 0]
            torch.testing.assert_close(out[3 * b + i].float(), expected, atol=2e-2, rtol=2e-2)
    given = torch.empty_like(q)
    assert method.extend_attention(1, q, cu, table, lens, 1, out=given) is given and torch.equal(given, out)


@pytest.mark.parametrize("options", [{}, dict(rotate=True), dict(smooth_k=True)])
def test_reads_saturate_at_the_dtype_like_the_ops(options):
    """A value stored past fp16's range reads back as fp16's largest finite value, never inf, with
    the accuracy options too (their K/V are restored in float32 and then cast)."""
    method = get_fp4_kv_cache_quant_method("nvfp4", **options)
    method.create_buffers(SIZE, H, D, 1, "cpu")
    method.set_global_scales(0, 1000.0, 1000.0)  # room for the rotation's sqrt(D) growth
    big = torch.full((4, H, D), 1e5)
    method.quantize_and_store(0, torch.arange(4), big, big)
    for read in method.layer(0).read(torch.arange(4), torch.float16):
        assert read.isfinite().all() and read.abs().max() == torch.finfo(torch.float16).max
    # blockfp4 rounds 60000 up to 4 * 2^14, past fp16's range: a round trip in fp16 saturates too
    # (through the K mean's float32 restore).
    layer = FP4KVPoolLayer.allocate("blockfp4", KVCacheOptions(smooth_k=True), 1, H, D)
    near_max = torch.full((1, H, D), 60000.0, dtype=torch.float16)
    for back in layer.roundtrip(near_max, near_max):
        assert back.isfinite().all() and back.abs().max() == torch.finfo(torch.float16).max


def test_attention_without_out_takes_q_of_any_strides():
    """No `out` given: the op allocates a contiguous one, whatever q's strides (a permuted q is
    read as it is)."""
    method = get_fp4_kv_cache_quant_method("nvfp4", rotate=True)
    method.create_buffers(32, H, D, 1, "cpu")
    method.quantize_and_store(0, torch.arange(32), torch.randn(32, H, D), torch.randn(32, H, D))
    table = torch.arange(32, dtype=torch.int32).view(2, 16)
    lens = torch.tensor([16, 9], dtype=torch.int32)
    q = torch.randn(2 * H, 2, D, dtype=torch.bfloat16).transpose(0, 1)  # [2, 2H, D], heads outermost in memory
    assert not q.is_contiguous()
    torch.testing.assert_close(method.decode_attention(0, q, table, lens, 1),
                               method.decode_attention(0, q.contiguous(), table, lens, 1), atol=0, rtol=0)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    torch.testing.assert_close(method.extend_attention(0, q, cu, table, lens, 1),
                               method.extend_attention(0, q.contiguous(), cu, table, lens, 1), atol=0, rtol=0)


def test_calibration_leaves_out_rows_holding_nan_or_inf():
    """An overflowed sample row (inf) or a NaN one takes no part in the mean, the channel scales or
    the global scales, which stay finite and equal to those of the other rows; a head no finite row
    reaches keeps what it had."""
    options = dict(smooth_k=True, channel_scale_k=True)
    clean, dirty = (get_fp4_kv_cache_quant_method("nvfp4", **options) for _ in range(2))
    for method in (clean, dirty):
        method.create_buffers(SIZE, H, D, 1, "cpu")
    k, v, q = torch.randn(10, H, D), torch.randn(10, H, D), torch.randn(10, 2 * H, D)
    clean.calibrate(0, k, v, q)
    k_bad, v_bad, q_bad = (torch.cat([x, x[:2]]) for x in (k, v, q))
    k_bad[10, :, 3], k_bad[11, :, 0], v_bad[10:, :, 5], q_bad[10:, :, 7] = float("inf"), float("nan"), -float("inf"), float("inf")
    dirty.calibrate(0, k_bad, v_bad, q_bad)
    for name, expected in clean.calibration_state_dict().items():
        torch.testing.assert_close(dirty.calibration_state_dict()[name], expected, msg=name)
    before = dirty.calibration_state_dict()
    dirty.calibrate(0, torch.full((3, H, D), float("nan")), torch.full((3, H, D), float("inf")), q)
    for name, expected in before.items():
        torch.testing.assert_close(dirty.calibration_state_dict()[name], expected, msg=name)


def test_cell_size_checks_its_sizes_as_create_buffers_does():
    method = NVFP4Method()
    for sizes, match in (((-8, 128, 1), "head_num must be an int >= 1, got -8"),
                         ((8, 100, 1), "head_dim 100 is not a positive multiple"),
                         ((8.5, 128, 1), "head_num must be an int >= 1, got 8.5"),
                         ((8, 128, 0), "layer_num must be an int >= 1, got 0")):
        with pytest.raises(ValueError, match=match):
            method.compute_cell_size(*sizes)
    with pytest.raises(ValueError, match="power of two with rotate=True"):
        get_fp4_kv_cache_quant_method("nvfp4", rotate=True).compute_cell_size(8, 96, 1)


def test_a_method_serves_one_pool():
    """A second pool from the same method instance would leave the first one's layers behind the
    method's back: refused, naming the argument."""
    method = NVFP4Method()
    FP4KVPool(method, SIZE, H, D, 1)
    with pytest.raises(ValueError, match="method: this NVFP4Method holds buffers already"):
        FP4KVPool(method, SIZE, H, D, 1)


def test_prev_kv_in_an_explicit_dtype_is_fresh_even_the_workspaces():
    """The FP8 workspace is what dequantize_prev_kv returns only with dtype left at its default: a
    dtype given, even float8_e4m3fn, gets tensors the next layer's read cannot overwrite."""
    method = NVFP4Method()
    method.create_buffers(SIZE, H, D, 2, "cpu")
    loc = torch.arange(4)
    method.quantize_and_store(0, loc, torch.ones(4, H, D), torch.ones(4, H, D))
    method.quantize_and_store(1, loc, -torch.ones(4, H, D), -torch.ones(4, H, D))
    k0, _ = method.dequantize_prev_kv(0, loc, dtype=torch.float8_e4m3fn)
    method.dequantize_prev_kv(1, loc, dtype=torch.float8_e4m3fn)
    method.dequantize_prev_kv(1, loc)
    assert k0.data_ptr() != method.workspace.k.data_ptr() and (k0.float() == 1).all()
