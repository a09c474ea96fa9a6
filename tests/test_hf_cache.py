"""FP4Cache under transformers: the layer's storage rules against a token-list reference, then tiny
random-weight Llama (SmolLM2-shaped) and Gemma 3 (sliding window 8) models under generate() and
hand-written loops, against transformers' own eager attention with a DynamicCache whose keys and
values are rounded through the format exactly where the cache holds FP4."""

import inspect

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AttentionInterface, DynamicCache  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402

from conftest import RECIPES, requires_cuda  # noqa: E402
from torch_fp4kv import KVCacheOptions, models  # noqa: E402
from torch_fp4kv.hf import FP4Cache, FP4CacheLayer, cache_argument, kv_cache_bytes  # noqa: E402
from torch_fp4kv.hf.simulate import roundtrip  # noqa: E402

ARCHS = ["smollm2", "gemma3"]


# ---- the layer against a list of tokens ----------------------------------------------------------


def _reference_attention(q, keys, values, positions, q_pos, window, scaling):
    """q [Hq, D] over the listed keys [N, Hkv, D] a token at q_pos may see, in float64."""
    visible = [i for i, p in enumerate(positions) if p <= q_pos and (window is None or q_pos - p < window)]
    k, v = keys[visible].double(), values[visible].double()
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [N, Hq, D]
    weights = torch.softmax(torch.einsum("hd,nhd->hn", q.double(), k) * scaling, -1)
    return torch.einsum("hn,nhd->hd", weights, v)


FULL_PRECISION = [(0, 0), (2, 3), (0, 1), (3, 0), (1, 30)]  # (sink_tokens, recent_tokens)


# (sliding_window, max_cache_len): a full layer; one that overflows (19 real tokens; a 7-token chunk
# straddles its end); a ring.
LAYERS = [(None, 24), (None, 6), (6, 24)]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("window, max_cache_len", LAYERS)
@pytest.mark.parametrize("sinks, recent", FULL_PRECISION)
def test_layer_stores_real_tokens_and_attends_by_position(recipe, window, max_cache_len, sinks, recent):
    """A decode step, prefill chunks with left padding, decode steps past the window: every real
    query's output equals attention over the tokens it may see, earlier chunks' keys/values
    dequantized and its own chunk's in full precision (decode: all dequantized); padded queries
    give zeros. With sinks/recent: a sequence's first `sinks` positions and the last `recent` (in
    a decode step, counting its own token; in a prefill, before the chunk) in full precision.
    Past max_cache_len a full layer holds the first max_cache_len positions (the later ones are
    neither stored nor attended, by any query) and counts `recent` back from its last held one."""
    torch.manual_seed(0)
    batch, hkv, hq, d, scaling = 2, 1, 2, 64, 0.125
    layer = FP4CacheLayer(recipe, max_cache_len=max_cache_len, sliding_window=window, sink_tokens=sinks,
                          recent_tokens=recent)
    held = max_cache_len if window is None else float("inf")  # a full layer holds only the positions below
    seen = [[] for _ in range(batch)]  # per sequence: (position, k, v, k_fp4, v_fp4) of real tokens
    pads = torch.tensor([[False, False, True, True, True, True, True],  # sequence 0: two left pads
                         [True] * 7])
    one = torch.ones(batch, 1, dtype=torch.bool)
    chunks = [one, pads, torch.ones(batch, 5, dtype=torch.bool)] + [one] * 6  # decode, prefill x 2, decode
    for real in chunks:
        tokens = real.shape[1]
        q = torch.randn(batch, hq, tokens, d)
        k, v = torch.randn(batch, hkv, tokens, d), torch.randn(batch, hkv, tokens, d)
        layer.update(k, v)
        out = layer.attend(q, k, v, real, scaling)
        chunk_start = [len(s) for s in seen]
        for b in range(batch):
            for t in range(tokens):
                if real[b, t]:
                    kt, vt = k[b, :, t], v[b, :, t]
                    seen[b].append((len(seen[b]), kt, vt, roundtrip(kt, recipe), roundtrip(vt, recipe)))
        for b in range(batch):
            for t in range(tokens):
                if not real[b, t]:
                    assert torch.equal(out[b, :, t], torch.zeros(hq, d))
                    continue
                q_pos = chunk_start[b] + int(real[b, : t + 1].sum()) - 1
                end = min(chunk_start[b] if tokens > 1 else q_pos + 1, held)
                fresh = end - recent  # ring from here on
                attended = [s for s in seen[b] if s[0] < held]
                in_chunk = [(tokens > 1 and p >= chunk_start[b]) or p < sinks or p >= fresh for p, *_ in attended]
                keys = torch.stack([s[1] if own else s[3] for s, own in zip(attended, in_chunk)])
                values = torch.stack([s[2] if own else s[4] for s, own in zip(attended, in_chunk)])
                expected = _reference_attention(q[b, :, t], keys, values, [s[0] for s in attended], q_pos,
                                                window, scaling)
                # Decode runs in fp16 (the op's q and output), prefill in fp32.
                tolerance = 4e-3 if tokens == 1 else 1e-5
                torch.testing.assert_close(out[b, :, t].double(), expected, atol=tolerance, rtol=tolerance)
    assert layer.real_tokens.tolist() == [len(s) for s in seen]
    assert int(layer.get_seq_length()) == sum(c.shape[1] for c in chunks)


def test_ring_slots_hold_the_last_window_tokens():
    layer = FP4CacheLayer("mxfp4", max_cache_len=100, sliding_window=4)
    values = torch.tensor([1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0])  # exact in MXFP4
    keys = values[None, None, :, None].expand(1, 1, 10, 64)
    layer.update(keys, keys)
    layer.attend(torch.zeros(1, 1, 10, 64), keys, keys, None, 1.0)
    stored, _ = layer.fp4.read(torch.arange(4), torch.float32)
    # positions 6..9 (values 8, 12, 16, 24) in slots position mod 4
    assert stored[:, 0, 0].tolist() == [16.0, 24.0, 8.0, 12.0]


# ---- whole models ------------------------------------------------------------------------------


def _register_reference(recipe: str) -> str:
    """transformers' own eager attention (the model's modeling file), with keys and values rounded
    through `recipe` where an FP4Cache holds them: all of them in a decode step, the cached prefix
    (not the new chunk) in a prefill."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        new = query.shape[2]
        cached = key.shape[2] if new == 1 else key.shape[2] - new
        key = torch.cat((roundtrip(key[:, :, :cached], recipe), key[:, :, cached:]), 2)
        value = torch.cat((roundtrip(value[:, :, :cached], recipe), value[:, :, cached:]), 2)
        return inspect.getmodule(module).eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    name = f"test_fp4_reference_{recipe}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, eager_mask)
    return name


def _generate(model, attn: str, ids, new_tokens: int, fp4_recipe=None, attention_mask=None, **options):
    """Greedy tokens and logits; with an FP4Cache of `fp4_recipe` (and `options`) sized for the call,
    or transformers' default DynamicCache."""
    model.set_attn_implementation(attn)
    kwargs = {}
    if fp4_recipe is not None:
        kwargs["past_key_values"] = FP4Cache(model.config, ids.shape[1] + new_tokens, fp4_recipe, **options)
    out = model.generate(ids, attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kwargs)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.gpu])])
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_matches_transformers_attention_over_fp4_values(arch, recipe, device):
    """12-token prompts, 16 new tokens (Gemma's window is 8): the same greedy tokens as the
    reference, logits within fp16-decode noise of it, a tenth of their distance from full
    precision's. On a GPU, decode runs the Triton or Gluon decode kernel."""
    model = models.random_model(models.tiny_config(arch), device=device)
    ids = torch.randint(3, 256, (3, 12), generator=torch.Generator().manual_seed(1)).to(device)
    tokens, logits = _generate(model, "fp4kv", ids, 16, recipe)
    ref_tokens, ref_logits = _generate(model, _register_reference(recipe), ids, 16)
    _, full_logits = _generate(model, "eager", ids, 16)
    # On a GPU the decode kernels multiply in 16 bits (q rounded to bf16 beside E8M0-scaled K/V, to
    # fp16 beside NVFP4's): a looser bound, still far below the FP4 effect (about 2 here).
    mean_error, near_tie = (0.02, 0.0) if device == "cpu" else (0.05, 0.25)
    if device == "cpu":
        assert torch.equal(tokens, ref_tokens)
    compared = _steps_before_divergence(tokens, ref_tokens, ref_logits, near_tie)
    error = (logits - ref_logits).abs()[compared].mean()
    fp4_effect = (full_logits - ref_logits).abs()[compared].mean()
    assert error < mean_error and error < 0.1 * fp4_effect, (error, fp4_effect)


def _steps_before_divergence(tokens, ref_tokens, ref_logits, near_tie: float) -> torch.Tensor:
    """[rows, steps] mask of the logits comparable with the reference: each row's steps up to and
    including its first token that differs, which must be a near tie in the reference (margin <
    `near_tie`): on a GPU the decode kernel's 16-bit products may flip a tie of random weights;
    after it the two runs decode different texts."""
    differ = tokens != ref_tokens
    steps = tokens.shape[1]
    first = torch.where(differ.any(1), differ.int().argmax(1), steps)
    for row in differ.any(1).nonzero().flatten().tolist():
        step = int(first[row])
        margin = ref_logits[row, step, ref_tokens[row, step]] - ref_logits[row, step, tokens[row, step]]
        assert margin < near_tie, (row, step, float(margin))
    return torch.arange(steps, device=tokens.device)[None, :] <= first[:, None]


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_then_decode_matches_reference(arch):
    """A hand-written loop: two prefill chunks (the second longer than Gemma's window, so the ring
    wraps inside it) and four decode steps, without attention masks or position ids."""
    model = models.random_model(models.tiny_config(arch))
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    steps = [(0, 9), (9, 20), (20, 21), (21, 22), (22, 23), (23, 24)]
    logits = {}
    for attn in ("fp4kv", _register_reference("nvfp4")):
        model.set_attn_implementation(attn)
        cache = FP4Cache(model.config, 24, "nvfp4") if attn == "fp4kv" else DynamicCache(config=model.config)
        with torch.no_grad():
            logits[attn] = torch.cat([model(ids[:, a:b], past_key_values=cache).logits for a, b in steps], 1)
    fp4, ref = logits.values()
    torch.testing.assert_close(fp4[:, :9], ref[:, :9], atol=1e-4, rtol=1e-4)  # no prefix yet: full precision
    assert (fp4 - ref).abs().mean() < 0.02


@pytest.mark.parametrize("options", [{}, {"sink_tokens": 2, "recent_tokens": 3}], ids=["plain", "sink2-recent3"])
@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_generates_what_each_prompt_does_alone(arch, options):
    """Prompts of 5, 9 and 13 tokens, left padded in one batch: padding is never stored or attended,
    and positions count real tokens only, so each row equals its prompt run alone (for Gemma, also
    after its 8-token window slid over where the padding would be); with full-precision sinks and
    recent ring too."""
    model = models.random_model(models.tiny_config(arch))
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 13)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat((torch.zeros(width - len(p), dtype=torch.long), p)) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()
    batch_tokens, batch_logits = _generate(model, "fp4kv", ids, 12, "nvfp4", mask, **options)
    for row, prompt in enumerate(prompts):
        alone, alone_logits = _generate(model, "fp4kv", prompt[None], 12, "nvfp4", **options)
        assert torch.equal(batch_tokens[row], alone[0])
        torch.testing.assert_close(batch_logits[row], alone_logits[0], atol=1e-2, rtol=0)  # fp16 decode noise


@pytest.mark.parametrize("arch", ARCHS)
def test_recent_ring_covering_the_context_is_full_precision(arch):
    """recent_tokens as long as the whole run: every decode step attends in full precision only
    (decode_attention's share is empty and weighs 0), so generate gives full precision's logits;
    sinks change nothing then. With a shorter ring, the FP4 part shows."""
    model = models.random_model(models.tiny_config(arch))
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    _, full_logits = _generate(model, "sdpa", ids, 10)
    _, ring_logits = _generate(model, "fp4kv", ids, 10, "nvfp4", sink_tokens=4, recent_tokens=22)
    torch.testing.assert_close(ring_logits, full_logits, atol=1e-4, rtol=1e-4)
    _, short_logits = _generate(model, "fp4kv", ids, 10, "nvfp4", sink_tokens=4, recent_tokens=2)
    assert (short_logits - full_logits).abs().max() > 1e-3


FULL_SPELLING = "nvfp4+rot+smooth+k8+sink4+recent128"
FULL_KEYWORDS = dict(rotate=True, smooth_k=True, k_fp8=True, sink_tokens=4, recent_tokens=128)


def test_recipe_string_spells_the_keyword_options():
    """FP4Cache takes the eval's recipe strings: the whole grammar equals the keyword form, the two
    may be mixed where they agree, and a contradiction is a ValueError."""
    config = models.tiny_config("gemma3")
    config._attn_implementation = "fp4kv"
    spelled, keywords = FP4Cache(config, 16, FULL_SPELLING), FP4Cache(config, 16, "nvfp4", **FULL_KEYWORDS)
    mixed = FP4Cache(config, 16, "nvfp4+rot+k8+recent128", smooth_k=True, sink_tokens=4, rotate=True)
    for cache in (keywords, mixed):
        assert (cache.recipe, cache.options) == (spelled.recipe, spelled.options) == (
            FULL_SPELLING, KVCacheOptions(**FULL_KEYWORDS))
        for layer, other in zip(cache.layers, spelled.layers):
            assert (layer.recipe, layer.options, layer.sinks, layer.recent, layer.capacity) == (
                other.recipe, other.options, other.sinks, other.recent, other.capacity)
    assert FP4Cache(config, 16, "nvfp4+rot").options == KVCacheOptions(rotate=True)
    with pytest.raises(ValueError, match=r"rotate=False contradicts the recipe's \+rot"):
        FP4Cache(config, 16, "nvfp4+rot", rotate=False)
    with pytest.raises(ValueError, match=r"\+rotate is not an option"):
        FP4Cache(config, 16, "nvfp4+rotate")
    with pytest.raises(ValueError, match="unknown FP4 KV cache method 'int4'"):
        FP4Cache(config, 16, "int4+rot")


@pytest.mark.parametrize("arch", ARCHS)
def test_recipe_string_generates_what_the_keywords_do(arch):
    model = models.random_model(models.tiny_config(arch))
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(5))
    options = dict(FULL_KEYWORDS, recent_tokens=3, sink_tokens=2)
    _, by_keywords = _generate(model, "fp4kv", ids, 6, "nvfp4", **options)
    _, spelled = _generate(model, "fp4kv", ids, 6, "nvfp4+rot+smooth+k8+sink2+recent3")
    assert torch.equal(spelled, by_keywords)
    assert kv_cache_bytes(model.config, 16, 2, "nvfp4+k8+sink2") == kv_cache_bytes(model.config, 16, 2, "nvfp4",
                                                                                   k_fp8=True, sink_tokens=2)


def test_memory_against_static_cache():
    """Gemma 3's real shape: sliding layers hold 512 slots in both caches; FP4 stores
    2 * (128 + 16) bytes per head and token against BF16's 2 * 512."""
    config = models.architecture_config("gemma3")
    sizes = kv_cache_bytes(config, max_cache_len=4096, batch_size=2, recipe="nvfp4")
    slots = 2 * (15 * 512 + 3 * 4096)
    assert sizes == {"fp4": slots * 2 * 144 + 18 * 8, "static": slots * 2 * 512}
    # Sinks and ring in bf16, per sequence and layer: 4 + 128 tokens x K and V x 256 dims x 2 bytes.
    with_full = kv_cache_bytes(config, max_cache_len=4096, batch_size=2, recipe="nvfp4", sink_tokens=4,
                               recent_tokens=128)
    assert with_full["fp4"] == sizes["fp4"] + 2 * 18 * (4 + 128) * 2 * 256 * 2


def test_bad_arguments():
    config = models.tiny_config("smollm2")
    with pytest.raises(ValueError, match="attn_implementation='fp4kv'"):
        FP4Cache(config, 16)
    config._attn_implementation = "fp4kv"
    with pytest.raises(ValueError, match="unknown FP4 KV cache method"):
        FP4Cache(config, 16, recipe="int4")
    with pytest.raises(ValueError, match="max_cache_len"):
        FP4Cache(config, 0)
    with pytest.raises(ValueError, match="sink_tokens must be an int >= 0"):
        FP4Cache(config, 16, sink_tokens=-1)
    with pytest.raises(ValueError, match="recent_tokens must be an int >= 0"):
        FP4Cache(config, 16, recent_tokens=2.0)
    model = models.random_model(config, attn_implementation="fp4kv")
    with pytest.raises(TypeError, match="needs an FP4Cache"):
        model.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=2)  # a DynamicCache
    with pytest.raises(ValueError, match="max_cache_len=6 is too small"):
        model.generate(torch.ones(1, 4, dtype=torch.long), past_key_values=FP4Cache(config, 6), max_new_tokens=4)


def _tiny_deepseek_v3_config():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                            num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=32,
                            q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)


def test_deepseek_v3_caches_its_latent_and_fp4cache_refuses_it():
    """transformers' DeepSeek-V3 hands its cache the latent c_kv [B, 1, T, R] and k_pe [B, 1, T, P]
    and up-projects what comes back before attention (the premise of FP4Cache's refusal: it stores
    inside the attention and returns no tensors), so FP4Cache and kv_cache_bytes reject MLA configs
    by name instead of failing on a head_dim."""
    from transformers import DeepseekV3ForCausalLM

    config = _tiny_deepseek_v3_config()
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config).eval()
    cache = DynamicCache(config=config)
    with torch.no_grad():
        model(torch.randint(0, 128, (2, 7)), **{cache_argument(model): cache})
    assert [tuple(t.shape) for t in (cache.layers[0].keys, cache.layers[0].values)] == [(2, 1, 7, 32), (2, 1, 7, 16)]
    model.set_attn_implementation("fp4kv")
    for call in (lambda: FP4Cache(model.config, 16), lambda: kv_cache_bytes(model.config, 16, 2)):
        with pytest.raises(ValueError, match=r"config: deepseek_v3 uses Multi-head Latent Attention \(kv_lora_rank=32\)"):
            call()
