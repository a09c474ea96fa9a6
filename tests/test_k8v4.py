"""K8V4: keys in FP8 E4M3 (one byte per element under the per-layer global scale), values in an FP4
recipe, named "<recipe>+k8" by the K-and-V ops and `k_fp8=True` by methods and FP4Cache."""

import inspect

import pytest
import torch
import torch.nn.functional as F

import torch_fp4kv
from conftest import RECIPES, TRITON_DEVICE, assert_same_bytes, random_kv
from torch_fp4kv import get_fp4_kv_cache_quant_method
from torch_fp4kv.ops import FP8_E4M3, KV_RECIPES, eager, get_kv_recipe

K8_RECIPES = [r + "+k8" for r in RECIPES]
FP8 = FP8_E4M3.name


def _k8_cache(recipe, slots, h, d, device="cpu"):
    """Zeroed K8V4 buffers (k_data, v_data, k_scales, v_scales) and the global scales the formats take."""
    kv = get_kv_recipe(recipe)
    data = [torch.zeros(slots, h, f.data_width(d), dtype=torch.uint8, device=device) for f in (kv.k, kv.v)]
    scales = [torch.zeros(slots, h, f.scales_width(d), dtype=torch.uint8, device=device) for f in (kv.k, kv.v)]
    kg = torch.tensor([0.02], device=device)
    vg = torch.tensor([0.005], device=device) if kv.v.has_global_scale else None
    return (data[0], data[1], scales[0], scales[1]), kg, vg


def _special(x):
    x = x.clone()
    x[0, 0, 1], x[1, 0, 2], x[1, 1, 3] = float("nan"), float("inf"), float("-inf")
    x[2, 0, :4] = torch.tensor([1e6, -1e6, 1e-9, -0.0])  # saturates; rounds to zero; keeps its sign
    return x


# ---- the FP8 E4M3 row --------------------------------------------------------------------------


def test_fp8_quantize_is_torchs_rne_satfinite_under_the_global_scale():
    g = torch.tensor([0.5])
    x = torch.tensor([[0.1, -3.3, 300.0, -1000.0, 1e-6, float("nan"), float("inf"), float("-inf")]])
    data, scales = torch_fp4kv.quantize(x, FP8, g)
    assert data.shape == (1, 8) and scales.shape == (1, 0) and data.dtype == scales.dtype == torch.uint8
    expected = (x[0, :5] / 0.5).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(data[0, :5], expected)
    assert data[0, 5:].tolist() == [0x7F] * 3  # non-finite: NaN, never a finite value
    back = torch_fp4kv.dequantize(data, scales, FP8, g, torch.float32)
    assert torch.equal(back[0, :5], expected.view(torch.float8_e4m3fn).float() * 0.5)
    assert back[0, 5:].isnan().all()
    bad = torch_fp4kv.quantize(x[:, :2], FP8, torch.tensor([0.0]))[0]
    assert bad.tolist() == [[0x7F, 0x7F]]  # an unusable global scale stores NaN


def test_bytes_per_token():
    """FP8 K: D bytes per token and head; V its recipe's D/2 + D/block."""
    h, d = 8, 128
    for recipe, fmt in ((r, torch_fp4kv.FORMATS[r]) for r in RECIPES):
        assert KV_RECIPES[recipe + "+k8"].bytes_per_token(h, d) == h * (d + d // 2 + d // fmt.block_size)
    assert KV_RECIPES["nvfp4+k8"].bytes_per_token(h, d) == 1600  # vs 1152 nvfp4, 4096 bf16
    method = get_fp4_kv_cache_quant_method("nvfp4", k_fp8=True)
    assert method.compute_cell_size(h, d, 3) == 3 * 1600 + 2 * h * d  # + the FP8 prefill workspace
    b = method.create_buffers(4, h, d, 3, "cpu")
    assert b.k_data[0].shape == (4, h, d) and b.k_scales[0].shape == (4, h, 0) and b.v_data[0].shape == (4, h, d // 2)
    total = sum(t.numel() for t in (*b.k_data, *b.v_data, *b.k_scales, *b.v_scales))
    assert total == 4 * 3 * 1600


# ---- opcheck ----------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", K8_RECIPES)
def test_opcheck(recipe):
    t, h, d, slots = 5, 2, 64, 9
    (k_data, v_data, k_scales, v_scales), kg, vg = _k8_cache(recipe, slots, h, d)
    k, v = random_kv((t, h, d)), random_kv((t, h, d))
    loc = torch.tensor([3, 0, 8, -1, 3])
    torch.library.opcheck(torch.ops.fp4kv.quantize_and_store.default,
                          (k_data, v_data, k_scales, v_scales, loc, k, v, recipe, kg, vg))
    torch.ops.fp4kv.quantize_and_store(k_data, v_data, k_scales, v_scales, torch.arange(t), k, v, recipe, kg, vg)
    for dtype in (torch.bfloat16, torch.float32, torch.float8_e4m3fn):
        torch.library.opcheck(torch.ops.fp4kv.quantize.default, (k, FP8, kg))
        torch.library.opcheck(torch.ops.fp4kv.dequantize.default, (k_data, k_scales, FP8, kg, dtype))
        torch.library.opcheck(torch.ops.fp4kv.gather_dequantize.default, (k_data, k_scales, loc, FP8, kg, dtype))
    q = torch.randn(2, 4, d, dtype=torch.bfloat16)
    table, lens = torch.tensor([[0, 1, 2], [4, 3, 5]], dtype=torch.int32), torch.tensor([7, 0], dtype=torch.int32)
    slots_paged = torch.zeros(18, h, d, dtype=torch.uint8)  # 6 pages of 3 slots
    torch.library.opcheck(torch.ops.fp4kv.decode_attention.default,
                          (torch.empty_like(q), q, slots_paged, torch.zeros(18, h, 0, dtype=torch.uint8),
                           torch.zeros(18, h, d // 2, dtype=torch.uint8),
                           torch.zeros(18, h, v_scales.shape[-1], dtype=torch.uint8), table, lens, 3, recipe,
                           d ** -0.5, kg, vg))


# ---- Triton (the interpreter on CPU) against eager ----------------------------------------------


@pytest.mark.parametrize("recipe", K8_RECIPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_store_and_gather_are_eagers_bytes(backend, recipe, dtype):
    t, h, d, slots = 6, 2, 64, 10
    k, v = _special(random_kv((t, h, d), dtype)), _special(random_kv((t, h, d), dtype))
    loc = torch.tensor([4, 9, 4, -1, 12, 0])  # a duplicate (the last wins) and two out of range
    caches = {}
    for name in ("eager", "triton"):
        backend(name)
        device = "cpu" if name == "eager" else TRITON_DEVICE
        buffers, kg, vg = _k8_cache(recipe, slots, h, d, device)
        k_data, v_data, k_scales, v_scales = buffers
        torch_fp4kv.quantize_and_store(k_data, k_scales, v_data, v_scales, loc.to(device), k.to(device), v.to(device),
                                       recipe, kg, vg)
        gathered = [torch_fp4kv.gather_dequantize(buffers[i], buffers[i + 2], torch.tensor([9, 4, -3, 0], device=device),
                                                  f.name, g, torch.bfloat16)
                    for i, f, g in ((0, get_kv_recipe(recipe).k, kg), (1, get_kv_recipe(recipe).v, vg))]
        caches[name] = (*buffers, *gathered)
    for actual, expected in zip(caches["triton"], caches["eager"]):
        assert_same_bytes(actual, expected)


@pytest.mark.parametrize("recipe", K8_RECIPES)
@pytest.mark.parametrize("d, hq, hkv, page", [(64, 8, 2, 16), (128, 4, 1, 5)])
def test_triton_decode_reads_fp8_keys_like_eager(backend, recipe, d, hq, hkv, page):
    """The Triton kernel (K_FP8) against eager, which gathers, dequantizes and runs attention."""
    g = torch.Generator().manual_seed(0)
    batch, max_pages = 3, 4
    pages = batch * max_pages + 1
    (k_data, v_data, k_scales, v_scales), kg, vg = _k8_cache(recipe, pages * page, hkv, d)
    k = torch.randn(pages * page, hkv, d, generator=g) * 0.5
    v = torch.randn(pages * page, hkv, d, generator=g) * 0.03
    backend("eager")
    torch_fp4kv.quantize_and_store(k_data, k_scales, v_data, v_scales, torch.arange(pages * page), k, v, recipe, kg, vg)
    table = torch.randperm(pages, generator=g)[: batch * max_pages].view(batch, max_pages).int()
    lens = torch.tensor([max_pages * page, 1, 0], dtype=torch.int32)
    q = torch.randn(batch, hq, d, generator=g).to(torch.bfloat16)
    args = (k_data, k_scales, v_data, v_scales, table, lens, page, recipe, kg, vg)
    expected = torch_fp4kv.decode_attention(q, *args)
    backend("triton")
    actual = torch_fp4kv.decode_attention(q.to(TRITON_DEVICE), *(a.to(TRITON_DEVICE) if isinstance(a, torch.Tensor)
                                                                   else a for a in args))
    torch.testing.assert_close(actual.cpu().float(), expected.float(), atol=2e-2, rtol=2e-2)
    # eager itself: SDPA over the dequantized cache
    backend("eager")
    n = int(lens[0])
    slots = eager.paged_slots(table[:1], page)[0, :n]
    kk = torch_fp4kv.gather_dequantize(k_data, k_scales, slots, FP8, kg, torch.float32)
    vv = torch_fp4kv.gather_dequantize(v_data, v_scales, slots, recipe.removesuffix("+k8"), vg, torch.float32)
    ref = F.scaled_dot_product_attention(q[:1, :, None].float(), kk.transpose(0, 1)[None], vv.transpose(0, 1)[None],
                                         enable_gqa=True)
    torch.testing.assert_close(expected[0].float(), ref[0, :, 0], atol=1e-2, rtol=1e-2)


def test_gluon_never_serves_fp8_keys():
    from torch_fp4kv.ops import gluon_decode
    from torch_fp4kv.ops.paged_kv import PagedKV
    from torch_fp4kv.testing.paged import random_cache

    q = torch.empty(1, 8, 128)
    kv = PagedKV(*random_cache("nvfp4+k8", 16, 2, 128), torch.zeros(1, 1, dtype=torch.int32),
                 torch.ones(1, dtype=torch.int32), 16)
    assert not gluon_decode.supported(q, kv, get_kv_recipe("nvfp4+k8"))


# ---- bad input ----------------------------------------------------------------------------------


def _store_args(recipe="nvfp4+k8", **changes):
    (k_data, v_data, k_scales, v_scales), kg, vg = _k8_cache(recipe if recipe in KV_RECIPES else "nvfp4+k8", 8, 2, 64)
    args = dict(k_data=k_data, v_data=v_data, k_scales=k_scales, v_scales=v_scales, loc=torch.tensor([0, 3]),
                k=torch.randn(2, 2, 64), v=torch.randn(2, 2, 64), recipe=recipe, k_global_scale=kg, v_global_scale=vg)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, error, text", [
    (dict(k_data=torch.zeros(8, 2, 32, dtype=torch.uint8)), ValueError,
     "k of [H, D] = (2, 64) does not fit k_data of [H, D] = (2, 32) (fp8_e4m3 needs (2, 64))"),
    (dict(k_data=torch.zeros(8, 2, 32, dtype=torch.uint8), v_data=torch.zeros(8, 2, 16, dtype=torch.uint8),
          v_scales=torch.zeros(8, 2, 2, dtype=torch.uint8)), ValueError, "does not fit k_data of [H, D] = (2, 32)"),
    (dict(k_data=torch.zeros(8, 2, 64, dtype=torch.float8_e4m3fn)), TypeError, "k_data must have dtype uint8"),
    (dict(k_scales=torch.zeros(8, 2, 4, dtype=torch.uint8)), ValueError, "k_scales must have shape (8, 2, 0)"),
    (dict(v_data=torch.zeros(8, 2, 64, dtype=torch.uint8)), ValueError,
     "v of [H, D] = (2, 64) does not fit v_data of [H, D/2] = (2, 64) (nvfp4 needs (2, 32))"),
    (dict(recipe="nvfp4+k4"), ValueError, "recipe='nvfp4+k4' is not a known recipe"),
    (dict(recipe="fp8_e4m3"), ValueError, "recipe='fp8_e4m3' is not a known recipe"),
    (dict(k_global_scale=0.5), TypeError, "k_global_scale must be a float32 tensor"),
])
def test_store_rejects_before_writing(changes, error, text):
    args = _store_args(**changes)
    before = {n: args[n].clone() for n in ("k_data", "v_data", "k_scales", "v_scales")}
    with pytest.raises(error) as info:
        torch_fp4kv.quantize_and_store(**args)
    assert text in str(info.value), str(info.value)
    assert all(torch.equal(args[n], b) for n, b in before.items())


def test_v_global_scale_rejected_where_only_the_keys_have_one():
    with pytest.raises(ValueError, match="v_global_scale: recipe 'blockfp4' has no global scale"):
        torch_fp4kv.quantize_and_store(**_store_args("blockfp4+k8", v_global_scale=torch.ones(1)))


def test_decode_rejects_an_fp4_key_cache_for_a_k8_recipe():
    (k_data, v_data, k_scales, v_scales), kg, vg = _k8_cache("nvfp4", 16, 2, 64)  # FP4 keys
    q = torch.randn(1, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"k_scales must have shape \(16, 2, 0\)"):
        torch_fp4kv.decode_attention(q, k_data, k_scales, v_data, v_scales, torch.zeros(1, 1, dtype=torch.int32),
                                     torch.ones(1, dtype=torch.int32), 16, "nvfp4+k8", kg, vg)
    with pytest.raises(ValueError, match=r"\(16, 2, 64\) in nvfp4 against \(16, 2, 32\) in fp8_e4m3"):
        torch_fp4kv.decode_attention(q, k_data, k_scales[..., :0].contiguous(), v_data, v_scales,
                                     torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 16,
                                     "nvfp4+k8", kg, vg)


# ---- the method option --------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("options", [{}, dict(rotate=True, smooth_k=True)], ids=["plain", "rot+smooth"])
def test_method_stores_reads_and_decodes(recipe, options):
    h, d, slots = 2, 64, 32
    method = get_fp4_kv_cache_quant_method(recipe, k_fp8=True, **options)
    method.create_buffers(slots, h, d, 2, "cpu")
    k = torch.randn(slots, h, d) + 0.5 * torch.randn(1, h, d)  # a channel offset for smoothing
    v = torch.randn(slots, h, d)
    method.calibrate(1, k, v)
    layer = method.layer(1)
    assert layer.recipe == recipe + "+k8" and layer.k_recipe == FP8
    encoded = layer.encode_k(k)
    torch.testing.assert_close(layer.k_global_scale, encoded.abs().amax().reshape(1) / 448)  # FP8's calibration
    method.quantize_and_store(1, torch.arange(slots), k, v)
    k_back, v_back = method.dequantize_prev_kv(1, torch.arange(slots), torch.float32)
    assert (k_back - k).norm() / k.norm() < 0.04  # FP8: ~2^-5 relative; FP4 would be ~0.1
    assert (v_back - v).norm() / v.norm() < 0.13
    has_workspace = torch_fp4kv.FORMATS[recipe].has_global_scale  # the NVFP4 methods
    ws_k, _ = method.dequantize_prev_kv(1, torch.arange(slots)) if has_workspace else (k_back, None)
    assert ws_k.shape == (slots, h, d)
    q = torch.randn(2, 4, d, dtype=torch.bfloat16)
    table, lens = torch.tensor([[0, 1], [3, 2]], dtype=torch.int32), torch.tensor([16, 9], dtype=torch.int32)
    out = method.decode_attention(1, q, table, lens, 8)
    for b in range(2):
        s = eager.paged_slots(table[b:b + 1], 8)[0, : int(lens[b])]
        ref = F.scaled_dot_product_attention(q[b:b + 1, :, None].float(), k_back[s].transpose(0, 1)[None],
                                             v_back[s].transpose(0, 1)[None], enable_gqa=True)
        torch.testing.assert_close(out[b].float(), ref[0, :, 0], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("recipe", RECIPES)
def test_calibration_state_dict_round_trips_with_fp8_keys(recipe):
    method = get_fp4_kv_cache_quant_method(recipe, k_fp8=True)
    method.create_buffers(4, 2, 64, 2, "cpu")
    method.calibrate(1, torch.randn(8, 2, 64) * 3, torch.randn(8, 2, 64))
    state = method.calibration_state_dict()
    assert set(state) == {"layers.0.k_scale", "layers.1.k_scale"} | (
        {"layers.0.v_scale", "layers.1.v_scale"} if torch_fp4kv.FORMATS[recipe].has_global_scale else set())
    other = get_fp4_kv_cache_quant_method(recipe, k_fp8=True)
    other.create_buffers(4, 2, 64, 2, "cpu")
    assert other.load_scales_from_model(state) == 2
    assert torch.equal(other.layer(1).k_global_scale, method.layer(1).k_global_scale)
    assert other.layer(1).k_global_scale.item() != 1.0


def test_k_fp8_must_be_a_bool():
    with pytest.raises(TypeError, match="k_fp8 must be a bool"):
        get_fp4_kv_cache_quant_method("nvfp4", k_fp8="yes")


# ---- transformers: FP4Cache and the eval --------------------------------------------------------


def _register_k8_reference(recipe: str) -> str:
    """transformers' eager attention with keys rounded through FP8 and values through `recipe`
    where an FP4Cache holds them (test_hf_cache's reference, K8V4)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    from torch_fp4kv.hf.simulate import roundtrip

    def attention(module, query, key, value, attention_mask, **kwargs):
        new = query.shape[2]
        cached = key.shape[2] if new == 1 else key.shape[2] - new
        key = torch.cat((roundtrip(key[:, :, :cached], FP8), key[:, :, cached:]), 2)
        value = torch.cat((roundtrip(value[:, :, :cached], recipe), value[:, :, cached:]), 2)
        return inspect.getmodule(module).eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    name = f"test_k8_reference_{recipe}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, eager_mask)
    return name


@pytest.mark.parametrize("arch", ["smollm2", "gemma3"])
def test_fp4cache_with_fp8_keys_generates_like_the_reference(arch):
    pytest.importorskip("transformers")
    from torch_fp4kv import models
    from torch_fp4kv.hf import FP4Cache, kv_cache_bytes

    model = models.random_model(models.tiny_config(arch))
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))

    def generate(attn, cache=None):
        model.set_attn_implementation(attn)
        kwargs = {} if cache is None else {"past_key_values": cache}
        out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, **kwargs)
        return out.sequences[:, 12:], torch.stack(out.logits, 1)

    model.set_attn_implementation("fp4kv")
    cache = FP4Cache(model.config, 24, "nvfp4", k_fp8=True)
    tokens, logits = generate("fp4kv", cache)
    ref_tokens, ref_logits = generate(_register_k8_reference("nvfp4"))
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().mean() < 0.02
    config = model.config.get_text_config(decoder=True)
    per_token = config.num_key_value_heads * (config.head_dim + config.head_dim // 2 + config.head_dim // 16)
    sizes = kv_cache_bytes(model.config, 24, 2, "nvfp4", k_fp8=True)
    global_scales = 2 * 4 * config.num_hidden_layers
    capacity = sum(min(24, layer.capacity) for layer in cache.layers) * 2  # slots over all layers, batch 2
    assert cache.kv_bytes() == sizes["fp4"] == capacity * per_token + global_scales


def test_eval_window_protocol_with_k8():
    pytest.importorskip("transformers")
    from torch_fp4kv import accuracy, models

    assert accuracy.parse_cache("nvfp4+rot+k8") == ("nvfp4", torch_fp4kv.KVCacheOptions(rotate=True, k_fp8=True))
    model = models.random_model(models.tiny_config("smollm2"))
    config = model.config.get_text_config(decoder=True)
    assert accuracy.kv_bytes_per_token(model, "nvfp4+smooth+k8") == config.num_hidden_layers * KV_RECIPES[
        "nvfp4+k8"].bytes_per_token(config.num_key_value_heads, config.head_dim)
    windows = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))

    class Bar:
        def update(self, n):
            pass

    settings = accuracy.settings_for(["nvfp4", "nvfp4+k8", "nvfp4+rot+smooth+k8"], ["window"])
    totals = accuracy.window_metrics(model, windows, settings, 2, Bar(),
                                     accuracy.calibrations_for(model, settings, windows))
    kl = {s.cache: totals[s].summary()["kl"] for s in settings}
    assert 0 < kl["nvfp4+k8"] < kl["nvfp4"]  # FP8 keys are closer to full precision
    assert kl["nvfp4+rot+smooth+k8"] > 0


@pytest.mark.usefixtures("fresh_dynamo")
def test_store_read_and_decode_compile_fullgraph():
    """The +k8 calls under torch.compile(fullgraph=True): no graph break, the same results as eager."""
    method = get_fp4_kv_cache_quant_method("nvfp4", k_fp8=True)
    method.create_buffers(32, 2, 64, 1, "cpu")
    layer = method.layer(0)
    table, lens = torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([20], dtype=torch.int32)

    def step(loc, k, v, q):
        layer.store(loc, k, v)
        k_back, _ = layer.read(loc, torch.float32)
        return k_back, layer.decode_attention(q, table, lens, 16)

    args = (torch.arange(20), torch.randn(20, 2, 64), torch.randn(20, 2, 64), torch.randn(1, 4, 64, dtype=torch.bfloat16))
    compiled = torch.compile(step, fullgraph=True)(*args)
    expected = step(*args)
    for actual, wanted in zip(compiled, expected):
        torch.testing.assert_close(actual, wanted, atol=0, rtol=0)
