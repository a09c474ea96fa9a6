"""K channel scales (`+chscale`, SmoothAttention): K stored as ((k - μ) / λ) @ R, queries multiplied
by λ wherever the cache attends over its own keys, reads multiplying λ back; the calibration rule
and its state-dict entry."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_fp4kv
from conftest import RECIPES, TRITON_DEVICE
from torch_fp4kv import FP4KVPool, KVCacheOptions, get_fp4_kv_cache_quant_method, ops
from torch_fp4kv.ops.backends import forced_backend

H, GROUP, D = 2, 3, 64
OPTION_SETS = [dict(smooth_k=True, channel_scale_k=True), dict(rotate=True, smooth_k=True, channel_scale_k=True)]
OPTION_IDS = ["smooth+chscale", "rot+smooth+chscale"]


def _samples(tokens, seed=0):
    """K with a per-channel offset and channels of very different spread (as real keys have),
    V plain normal, q [T, H * GROUP, D] whose channels matter unequally."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-1, 1.3, D)[torch.randperm(D, generator=g)]
    k = torch.randn(tokens, H, D, generator=g) * spread + 4 * torch.randn(H, D, generator=g)
    v = torch.randn(tokens, H, D, generator=g)
    q = torch.randn(tokens, H * GROUP, D, generator=g) * torch.logspace(1, -1, D)
    return k, v, q


def _calibrated(recipe, options, tokens=32, slots=None, device="cpu"):
    method = get_fp4_kv_cache_quant_method(recipe, **options)
    FP4KVPool(method, size=slots or tokens, head_num=H, head_dim=D, layer_num=1, device=device)
    k, v, q = (x.to(device) for x in _samples(tokens))
    method.calibrate(0, k, v, q)
    return method, k, v, q


def test_the_option_needs_smooth_and_spells_chscale():
    assert KVCacheOptions.parse("nvfp4+chscale+rot+smooth") == (
        "nvfp4", KVCacheOptions(rotate=True, smooth_k=True, channel_scale_k=True))
    assert KVCacheOptions(smooth_k=True, channel_scale_k=True).spell("nvfp4_4over6") == "nvfp4_4over6+smooth+chscale"
    with pytest.raises(ValueError, match=r"channel_scale_k \(\+chscale\) needs smooth_k"):
        KVCacheOptions.parse("nvfp4+chscale")
    with pytest.raises(ValueError, match="channel_scale_k"):
        get_fp4_kv_cache_quant_method("nvfp4", channel_scale_k=True)
    assert get_fp4_kv_cache_quant_method("nvfp4+smooth", channel_scale_k=True).options.channel_scale_k


@pytest.mark.parametrize("recipe", RECIPES)
def test_calibration_follows_the_rule_and_the_bytes_are_of_the_scaled_keys(recipe):
    """λ = sqrt(max|k - μ| / max|q|), q's maximum over each KV head's group of query heads; the
    stored bytes are those of (k - μ) / λ, and the global scale covers them."""
    method, k, v, q = _calibrated(recipe, dict(smooth_k=True, channel_scale_k=True))
    layer = method.layer(0)
    mean = k.mean(0)
    q_amax = q.abs().unflatten(1, (H, GROUP)).amax((0, 2))
    torch.testing.assert_close(layer.k_channel_scale, ((k - mean).abs().amax(0) / q_amax).sqrt())
    scaled = (k - mean) / layer.k_channel_scale
    if layer.k_global_scale is not None:
        torch.testing.assert_close(layer.k_global_scale, (scaled.abs().amax() / (448 * 6)).reshape(1))
    layer.store(torch.arange(k.shape[0]), k, v)
    assert torch.equal(layer.k_data, ops.quantize(scaled, layer.k_recipe, layer.k_global_scale)[0])


@pytest.mark.parametrize("options", OPTION_SETS, ids=OPTION_IDS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_restore_undoes_encode_and_reads_give_the_keys_back(recipe, options):
    method, k, v, _ = _calibrated(recipe, options)
    layer = method.layer(0)
    assert (layer.k_channel_scale - 1).abs().max() > 0.5  # calibrated, far from no scaling
    torch.testing.assert_close(layer.restore_k(layer.encode_k(k)), k, atol=1e-4, rtol=1e-5)
    loc = torch.arange(k.shape[0])
    layer.store(loc, k, v)
    k_back, _ = layer.read(loc, torch.float32)
    torch.testing.assert_close(k_back, layer.roundtrip(k, v)[0])
    # K back within the FP4 error of what was stored, multiplied by λ: a few percent of K's spread
    error = (k_back - k) / layer.k_channel_scale
    assert error.norm() < 0.2 * layer.encode_k(k).norm()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 16), rotate=st.booleans())
def test_scores_are_unchanged_before_quantization(seed, rotate):
    """(λq) R · ((k - μ) / λ) R = q·(k - μ) = q·k - q·μ, exactly in float64 with the calibrated
    λ, μ; and the layer's own encodings agree in float32."""
    method, k, _, q = _calibrated("nvfp4", dict(rotate=rotate, smooth_k=True, channel_scale_k=True), tokens=8)
    layer = method.layer(0)
    k, q = _samples(8, seed)[::2]
    mean, scale = layer.k_mean.double(), layer.k_channel_scale.double()
    rotation = layer.rotation.double() if rotate else torch.eye(D, dtype=torch.float64)
    q_heads = q.double().unflatten(1, (H, GROUP))
    stored = ((k.double() - mean) / scale) @ rotation  # [T, H, D]
    query = (q_heads * scale[:, None]) @ rotation  # [T, H, GROUP, D]
    scores = torch.einsum("shgd,thd->shgt", query, stored)
    want = torch.einsum("shgd,thd->shgt", q_heads, k.double() - mean)
    torch.testing.assert_close(scores, want, atol=1e-9, rtol=1e-12)
    got = torch.einsum("shgd,thd->shgt", layer._encode_q(q).unflatten(1, (H, GROUP)).double(),
                       layer.encode_k(k).double())
    torch.testing.assert_close(got, want, atol=1e-3 * want.abs().max().item(), rtol=1e-4)


def _dequantized_stored(layer, slots):
    """The stored (transformed) keys and values of `slots`, dequantized, float32 [T, H, D]."""
    return tuple(ops.gather_dequantize(data, scales, slots, recipe, g, torch.float32)
                 for data, scales, recipe, g in ((layer.k_data, layer.k_scales, layer.k_recipe, layer.k_global_scale),
                                                 (layer.v_data, layer.v_scales, layer.v_recipe, layer.v_global_scale)))


def _scaled_query(layer, q):
    """q [..., Hq, D] with each KV head's λ multiplied in and rotated, float32 (no rounding)."""
    x = q.float().unflatten(-2, (H, GROUP)) * layer.k_channel_scale[:, None]
    x = x.flatten(-3, -2)
    return x @ layer.rotation if layer.rotation is not None else x


def _reference(q, k, v, scale, causal_from=None):
    """Attention of q [Tq, Hq, D] over k, v [T, H, D] (float64), query i seeing keys <= causal_from + i."""
    k, v = (x.double().repeat_interleave(GROUP, 1) for x in (k, v))
    scores = torch.einsum("qhd,thd->hqt", q.double(), k) * scale
    if causal_from is not None:
        visible = (torch.arange(k.shape[0], device=k.device)[None]
                   <= causal_from + torch.arange(q.shape[0], device=k.device)[:, None])
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqt,thd->qhd", torch.softmax(scores, -1), v)


@pytest.mark.parametrize("backend_name", ["eager", "triton"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=OPTION_IDS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_decode_and_extend_are_attention_over_the_stored_cache_with_q_scaled(recipe, options, backend_name):
    """decode_attention / extend_attention equal attention of (λq) R over the dequantized stored
    keys and values (the output rotated back), and the log-sum-exp is that of the keys as given
    (q·μ added back)."""
    device = "cpu" if backend_name == "eager" else TRITON_DEVICE
    tokens, new = 21, 5
    method, k, v, q_all = _calibrated(recipe, options, tokens, slots=32, device=device)
    layer = method.layer(0)
    slots = torch.arange(tokens, device=device)
    layer.store(slots, k, v)
    k_stored, v_stored = _dequantized_stored(layer, slots)
    rotation = layer.rotation if layer.rotation is not None else torch.eye(D, device=device)
    table = torch.arange(4, dtype=torch.int32, device=device)[None]
    lens = torch.tensor([tokens], dtype=torch.int32, device=device)
    q = (0.05 * q_all[-new:]).to(torch.bfloat16)
    with forced_backend(backend_name):
        lse = torch.empty(1, H * GROUP, device=device)
        out = layer.decode_attention(q[-1:], table, lens, 8, lse=lse)
        extended = layer.extend_attention(q, torch.tensor([0, new], dtype=torch.int32, device=device), table, lens,
                                          8)
    # the op sees q rounded to bf16 once, after scaling and rotating
    query = _scaled_query(layer, q).to(torch.bfloat16)
    want = _reference(query[-1:], k_stored, v_stored, D ** -0.5) @ rotation.double()
    torch.testing.assert_close(out.double(), want, atol=1e-2, rtol=1e-2)
    want = _reference(query, k_stored, v_stored, D ** -0.5, causal_from=tokens - new) @ rotation.double()
    torch.testing.assert_close(extended.double(), want, atol=1e-2, rtol=1e-2)
    k_back = layer.read(slots, torch.float32)[0].repeat_interleave(GROUP, 1)
    scores = torch.einsum("hd,thd->ht", q[-1].double(), k_back.double()) * D ** -0.5
    torch.testing.assert_close(lse[0].double(), torch.logsumexp(scores, -1), atol=5e-2, rtol=2e-3)


@pytest.mark.parametrize("recipe", RECIPES)
def test_calibration_state_dict_round_trip(recipe, tmp_path):
    method, k, v, _ = _calibrated(recipe, dict(rotate=True, smooth_k=True, channel_scale_k=True))
    state = method.calibration_state_dict()
    names = {"k_mean", "k_channel_scale"} | ({"k_scale", "v_scale"} if torch_fp4kv.FORMATS[recipe].has_global_scale
                                             else set())
    assert set(state) == {f"layers.0.{name}" for name in names}
    torch.save(state, tmp_path / "calib.pt")
    fresh = get_fp4_kv_cache_quant_method(recipe, rotate=True, smooth_k=True, channel_scale_k=True)
    fresh.create_buffers(k.shape[0], H, D, 1, "cpu")
    loaded = torch.load(tmp_path / "calib.pt")
    assert fresh.load_scales_from_model({f"model.layers.0.self_attn.{key[9:]}": t for key, t in loaded.items()}) == 1
    for key, tensor in fresh.calibration_state_dict().items():
        assert torch.equal(tensor, state[key]), key
    assert torch.equal(fresh.buffers.k_channel_scales[0], method.layer(0).k_channel_scale)
    loc = torch.arange(k.shape[0])
    for m in (method, fresh):
        m.quantize_and_store(0, loc, k, v)
    assert torch.equal(method.buffers.k_data[0], fresh.buffers.k_data[0])
    # set_k_channel_scale writes in place
    buffer = fresh.layer(0).k_channel_scale
    fresh.set_k_channel_scale(0, torch.full((H, D), 2.0))
    assert fresh.layer(0).k_channel_scale is buffer and torch.equal(buffer, torch.full((H, D), 2.0))


def test_scales_follow_to_but_keep_float32():
    method = get_fp4_kv_cache_quant_method("nvfp4", smooth_k=True, channel_scale_k=True)
    pool = FP4KVPool(method, size=4, head_num=H, head_dim=D, layer_num=1)
    pool.to(torch.bfloat16)
    assert pool.layers[0].k_channel_scale.dtype == torch.float32
