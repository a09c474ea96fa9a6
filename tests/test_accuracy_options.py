"""Accuracy options of the table methods: Hadamard rotation of K/V and per-channel K smoothing,
through store, read, dequantize_prev_kv and decode_attention (eager and Triton), and the
calibration state dict."""

import pytest
import torch

import torch_fp4kv
from conftest import RECIPES, RMSE_BOUND, TRITON_DEVICE, assert_same_bytes
from torch_fp4kv import FP4KVPool, get_fp4_kv_cache_quant_method, ops
from torch_fp4kv.layer_cache import hadamard
from torch_fp4kv.ops.backends import forced_backend

H, D = 2, 64


@pytest.mark.parametrize("n", [1, 2, 64, 128, 256])
def test_hadamard_is_orthogonal_symmetric_and_scipys(n):
    h = hadamard(n, torch.float64)
    assert torch.equal(h, h.T)
    torch.testing.assert_close(h @ h, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    torch.testing.assert_close(h, torch.from_numpy(scipy_linalg.hadamard(n)).double() / n ** 0.5)


def test_rotation_needs_a_power_of_two_head_dim():
    with pytest.raises(ValueError, match="power of two"):
        hadamard(48)
    with pytest.raises(ValueError, match="power of two with rotate=True; got 48"):
        get_fp4_kv_cache_quant_method("nvfp4", rotate=True).create_buffers(4, 1, 48, 1, "cpu")
    with pytest.raises(TypeError, match="rotate must be a bool"):
        get_fp4_kv_cache_quant_method("nvfp4", rotate="yes")


def _outlier_kv(tokens, mean_scale=0.0):
    """K with a few large outlier channels (what real post-RoPE keys have) plus an optional
    per-channel offset; V plain normal."""
    k = torch.randn(tokens, H, D)
    k[:, :, ::16] *= 30
    k += mean_scale * torch.randn(H, D)
    return k, torch.randn(tokens, H, D)


@pytest.mark.parametrize("recipe", RECIPES)
def test_rotation_stores_rotated_values_and_reads_them_back(recipe):
    k, v = _outlier_kv(32)
    loc = torch.randperm(64)[:32]
    for rotate in (False, True):
        method = get_fp4_kv_cache_quant_method(recipe, rotate=rotate)
        b = method.create_buffers(64, H, D, 1, "cpu")
        method.quantize_and_store(0, loc, k, v)
        if rotate:  # the bytes are those of k @ H, v @ H
            rot = hadamard(D)
            g_k, g_v = (None, None) if b.k_global_scales is None else (b.k_global_scales[0], b.v_global_scales[0])
            assert_same_bytes(b.k_data[0][loc], ops.quantize(k @ rot, recipe, g_k)[0])
            assert_same_bytes(b.v_data[0][loc], ops.quantize(v @ rot, recipe, g_v)[0])
        k_back, v_back = method.dequantize_prev_kv(0, loc, torch.float32)
        # rotated, the outliers are spread over the head (near the N(0, 1) bound); not rotated,
        # each block's outlier sets its scale, and its other values round to few levels
        bound = 0.13 if rotate else 0.2
        assert (k_back - k).norm() / k.norm() < bound
        assert (v_back - v).norm() / v.norm() < RMSE_BOUND[recipe] + 0.01


def test_dequantize_prev_kv_into_the_fp8_workspace_rotates_back():
    k, v = _outlier_kv(16)
    method = get_fp4_kv_cache_quant_method("nvfp4", rotate=True, smooth_k=True)
    method.create_buffers(16, H, D, 1, "cpu")
    method.calibrate(0, k, v)
    loc = torch.arange(16)
    method.quantize_and_store(0, loc, k, v)
    k_fp8, v_fp8 = method.dequantize_prev_kv(0, loc)
    assert k_fp8.dtype == torch.float8_e4m3fn
    k32, v32 = method.dequantize_prev_kv(0, loc, torch.float32)
    torch.testing.assert_close(k_fp8.float(), k32.to(torch.float8_e4m3fn).float())
    assert (k32 - k).norm() / k.norm() < 0.13


def _paged(method, k, v, page_size=8):
    """Store k, v [T, H, D] of one sequence into pages 3, 0, 2, ... of a fresh cache."""
    tokens = k.shape[0]
    pages = -(-tokens // page_size)
    cache = FP4KVPool(method, size=(pages + 2) * page_size, head_num=H, head_dim=D, layer_num=1, device=k.device)
    table = torch.randperm(pages + 2)[:pages].to(torch.int32)[None].to(k.device)
    slots = (table[0, torch.arange(tokens) // page_size].long() * page_size + torch.arange(tokens, device=k.device) % page_size)
    cache.layers[0].store(slots, k, v)
    return cache.layers[0], table, torch.tensor([tokens], dtype=torch.int32, device=k.device), slots


def _attention(q, k, v, scale):
    """q [Hq, D] over k, v [T, Hkv, D], float64."""
    group = q.shape[0] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    w = torch.softmax(torch.einsum("hd,thd->ht", q.double(), k) * scale, -1)
    return torch.einsum("ht,thd->hd", w, v)


@pytest.mark.parametrize("backend_name", ["eager", "triton"])
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("options", [dict(rotate=True), dict(smooth_k=True), dict(rotate=True, smooth_k=True)],
                         ids=["rotate", "smooth", "rotate+smooth"])
def test_decode_equals_attention_over_the_values_read_back(backend_name, recipe, options):
    """decode_attention of the transformed cache (q rotated in, output rotated back; the K mean
    left to softmax) equals attention over what `read` gives back (rotated back, mean added); so
    does its log-sum-exp (the K mean's shift of the scores added back)."""
    device = "cpu" if backend_name == "eager" else TRITON_DEVICE
    k, v = _outlier_kv(21, mean_scale=8.0)
    k, v = k.to(device), v.to(device)
    method = get_fp4_kv_cache_quant_method(recipe, **options)
    layer, table, lens, slots = _paged(method, k, v)
    if options.get("smooth_k"):
        method.calibrate(0, k, v)
        layer.store(slots, k, v)
        assert layer.k_mean.abs().max() > 1
    q = (0.1 * torch.randn(1, 2 * H, D, device=device)).to(torch.float16)  # logits of a few units
    with forced_backend(backend_name):
        out = layer.decode_attention(q, table, lens, 8)
        given = torch.empty_like(out)
        lse = torch.empty(q.shape[:2], device=device)
        assert layer.decode_attention(q, table, lens, 8, out=given, lse=lse) is given
        k_back, v_back = layer.read(slots, torch.float32)
    expected = _attention(q[0].float(), k_back, v_back, D ** -0.5)
    torch.testing.assert_close(out[0].double(), expected, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(given, out)
    scores = torch.einsum("hd,thd->ht", q[0].double(), k_back.double().repeat_interleave(2, 1)) * D ** -0.5
    torch.testing.assert_close(lse[0].double(), torch.logsumexp(scores, -1), atol=2e-2, rtol=2e-3)
    # and it is attention over (nearly) the original K/V: the transforms are undone
    assert (out[0].double() - _attention(q[0].float(), k, v, D ** -0.5)).norm() < 0.25 * expected.norm()


@pytest.mark.parametrize("recipe", RECIPES)
def test_smoothing_leaves_softmax_unchanged_and_changes_the_bytes(recipe):
    """K with a large per-channel offset: decode with the mean subtracted is the same attention
    (within FP4 error of the exact one, and closer than without), and the stored K bytes differ."""
    k, v = _outlier_kv(40, mean_scale=20.0)
    q = (0.1 * torch.randn(1, 2 * H, D)).to(torch.bfloat16)
    exact = _attention(q[0].float(), k, v, D ** -0.5)
    outs, k_bytes = {}, {}
    for smooth in (False, True):
        method = get_fp4_kv_cache_quant_method(recipe, smooth_k=smooth)
        layer, table, lens, slots = _paged(method, k, v)
        if smooth:
            method.calibrate(0, k, v)
            torch.testing.assert_close(layer.k_mean, k.mean(0))
            layer.store(slots, k, v)
        outs[smooth] = layer.decode_attention(q, table, lens, 8)[0].double()
        k_bytes[smooth] = layer.k_data[slots].clone()
        # a mean of zero is no smoothing at all: the same bytes
    assert not torch.equal(k_bytes[False], k_bytes[True])
    err = {s: (o - exact).norm() / exact.norm() for s, o in outs.items()}
    torch.testing.assert_close(outs[True], outs[False], atol=0.3, rtol=0.3)
    assert err[True] < 0.15 and err[True] < err[False], err


def test_zero_mean_is_no_smoothing():
    k, v = _outlier_kv(8)
    loc = torch.arange(8)
    data = []
    for smooth in (False, True):
        method = get_fp4_kv_cache_quant_method("mxfp4", smooth_k=smooth)
        b = method.create_buffers(8, H, D, 1, "cpu")
        method.quantize_and_store(0, loc, k, v)
        data.append(b.k_data[0].clone())
    assert torch.equal(*data)


@pytest.mark.parametrize("recipe", RECIPES)
def test_calibration_state_dict_saves_and_loads(recipe, tmp_path):
    layers = 2
    samples = [_outlier_kv(16, mean_scale=5.0) for _ in range(layers)]
    method = get_fp4_kv_cache_quant_method(recipe, rotate=True, smooth_k=True)
    method.create_buffers(16, H, D, layers, "cpu")
    for i, (k, v) in enumerate(samples):
        method.calibrate(i, k, v)
    state = method.calibration_state_dict()
    has_global_scale = torch_fp4kv.FORMATS[recipe].has_global_scale
    expected_keys = {f"layers.{i}.{n}" for i in range(layers)
                     for n in (("k_mean", "k_scale", "v_scale") if has_global_scale else ("k_mean",))}
    assert set(state) == expected_keys
    if has_global_scale:  # the global scale covers what is quantized: the smoothed, rotated K
        layer = method.layer(1)
        torch.testing.assert_close(state["layers.1.k_scale"],
                                   (layer.encode_k(samples[1][0]).abs().amax() / (448 * 6)).reshape(1))
    torch.save(state, tmp_path / "calib.pt")

    fresh = get_fp4_kv_cache_quant_method(recipe, rotate=True, smooth_k=True)
    fresh.create_buffers(16, H, D, layers, "cpu")
    loaded = torch.load(tmp_path / "calib.pt")
    assert fresh.load_scales_from_model({f"model.{key[:9]}self_attn.{key[9:]}": t for key, t in loaded.items()}) == layers
    for key, tensor in fresh.calibration_state_dict().items():
        assert torch.equal(tensor, state[key]), key
    loc = torch.arange(16)
    for m in (method, fresh):
        m.quantize_and_store(1, loc, *samples[1])
    assert torch.equal(method.buffers.k_data[1], fresh.buffers.k_data[1])
    assert torch.equal(method.buffers.k_scales[1], fresh.buffers.k_scales[1])

    with pytest.raises(ValueError, match="k_mean must have shape"):
        fresh.set_k_mean(0, torch.zeros(D))
    with pytest.raises(ValueError, match="k_mean found for layer 5, but the cache's layers are"):
        fresh.load_scales_from_model({"layers.5.k_mean": torch.zeros(H, D)})
    with pytest.raises(ValueError, match=r"k_mean found for layers \[1\] but not for layer 0"):
        fresh.load_scales_from_model({"layers.1.k_mean": torch.zeros(H, D)})
    plain = get_fp4_kv_cache_quant_method(recipe)
    plain.create_buffers(16, H, D, layers, "cpu")
    with pytest.raises(ValueError, match="without smooth_k"):
        plain.set_k_mean(0, torch.zeros(H, D))


# ---- transformers: FP4Cache and the window protocol's round trip ---------------------------------


@pytest.mark.parametrize("channel_scale_k", [False, True], ids=["rot+smooth", "rot+smooth+chscale"])
@pytest.mark.parametrize("arch", ["smollm2", "gemma3"])
def test_fp4cache_with_options_matches_attention_over_the_transformed_round_trip(arch, channel_scale_k, tmp_path):
    """Calibrate a tiny random model (observer on its real post-RoPE q/K/V), save and load the state
    dict, and generate through FP4Cache(rotate, smooth_k[, channel_scale_k], calibration) (decode
    multiplies q by the channel scales, prefill reads K with them multiplied back): the same tokens, and logits
    within fp16-decode noise, as transformers' eager attention over keys/values rounded through the
    same transforms (`roundtrip_attention` with the options), and different from plain FP4's."""
    pytest.importorskip("transformers")
    import inspect

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    from torch_fp4kv import FP4KVPoolLayer, KVCacheOptions, models
    from torch_fp4kv.calibration import load_calibration
    from torch_fp4kv.hf import FP4Cache, calibrate, layer_calibration

    model = models.random_model(models.tiny_config(arch))
    calib_ids = torch.randint(3, 256, (2, 32), generator=torch.Generator().manual_seed(7))
    options = dict(rotate=True, smooth_k=True, channel_scale_k=channel_scale_k)
    state = calibrate(model, calib_ids, "nvfp4", **options)
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    names = {"k_mean", "k_scale", "v_scale"} | ({"k_channel_scale"} if channel_scale_k else set())
    assert {key.rsplit(".", 1)[1] for key in state} == names
    assert len(state) == len(names) * layers and all(state[f"layers.{i}.k_mean"].abs().sum() > 0
                                                     for i in range(layers))
    if channel_scale_k:
        assert all((state[f"layers.{i}.k_channel_scale"] - 1).abs().max() > 0.1 for i in range(layers))
    torch.save(state, tmp_path / "calib.pt")
    state = torch.load(tmp_path / "calib.pt")
    reference_layers = {}

    def attention(module, query, key, value, attention_mask, **kwargs):  # the cached part rounded
        index = module.layer_idx
        if index not in reference_layers:
            reference_layers[index] = FP4KVPoolLayer.allocate("nvfp4", KVCacheOptions(**options), 1, key.shape[1],
                                                              key.shape[3], key.device)
            load_calibration([reference_layers[index]], layer_calibration(state, index))
        new = query.shape[2]
        cached = key.shape[2] if new == 1 else key.shape[2] - new
        k, v = reference_layers[index].roundtrip(key[:, :, :cached].transpose(1, 2), value[:, :, :cached].transpose(1, 2))
        key = torch.cat((k.transpose(1, 2), key[:, :, cached:]), 2)
        value = torch.cat((v.transpose(1, 2), value[:, :, cached:]), 2)
        return inspect.getmodule(module).eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("test_fp4_options_reference", attention)
    AttentionMaskInterface.register("test_fp4_options_reference", eager_mask)
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))

    def generate(attn, **cache_kwargs):
        model.set_attn_implementation(attn)
        kwargs = {"past_key_values": FP4Cache(model.config, 28, "nvfp4", **cache_kwargs)} if cache_kwargs else {}
        out = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, **kwargs)
        return out.sequences[:, 12:], torch.stack(out.logits, 1)

    tokens, scores = generate("fp4kv", calibration=state, **options)
    ref_tokens, ref_scores = generate("test_fp4_options_reference")
    _, plain_scores = generate("fp4kv", rotate=False)
    assert torch.equal(tokens, ref_tokens)
    error, difference = (scores - ref_scores).abs().mean(), (plain_scores - ref_scores).abs().mean()
    assert error < 0.02 and error < 0.2 * difference, (error, difference)

    # the window protocol's round trip is the same one
    from torch_fp4kv.hf import roundtrip_attention

    name = roundtrip_attention("nvfp4", calibration=state, **options)
    model.set_attn_implementation(name)
    with torch.no_grad():
        window = model(ids, use_cache=False).logits
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    assert 0 < (window - full).abs().mean()


@pytest.mark.parametrize("channel_scale_k", [False, True], ids=["rot+smooth", "rot+smooth+chscale"])
def test_options_compile_fullgraph_without_recompiles(channel_scale_k):
    """store, read and decode of a rotated, smoothed (and channel-scaled) cache trace as one graph
    (no breaks), and a changing token count does not recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def make():
        method = get_fp4_kv_cache_quant_method("nvfp4", rotate=True, smooth_k=True, channel_scale_k=channel_scale_k)
        cache = FP4KVPool(method, size=32, head_num=H, head_dim=D, layer_num=1)
        method.set_k_mean(0, torch.randn(H, D))
        if channel_scale_k:
            method.set_k_channel_scale(0, torch.rand(H, D) * 4 + 0.25)
        return cache.layers[0]

    def step(layer, loc, k, v, q, table, lens):
        layer.store(loc, k, v)
        k_back, _ = layer.read(loc, torch.float32)
        return layer.decode_attention(q, table, lens, 8), k_back

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    layers = make(), make()
    layers[1].load_state_dict(layers[0].state_dict())
    table = torch.arange(4, dtype=torch.int32)[None]
    for tokens in (3, 5, 9):
        k, v = _outlier_kv(tokens)
        loc = torch.arange(tokens)
        torch._dynamo.mark_dynamic(k, 0), torch._dynamo.mark_dynamic(v, 0), torch._dynamo.mark_dynamic(loc, 0)
        q = (0.1 * torch.randn(1, 2 * H, D)).to(torch.bfloat16)
        lens = torch.tensor([tokens], dtype=torch.int32)
        got, want = compiled(layers[0], loc, k, v, q, table, lens), step(layers[1], loc, k, v, q, table, lens)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1
    torch._dynamo.reset()
