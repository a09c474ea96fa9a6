"""What an FP4 KV cache does to a causal LM's predictions, measured against full precision.

Over fixed-size windows of a text: perplexity and the mean KL divergence of every next-token
distribution from full precision's; over prompts cut from the text: the share of a greedy
continuation that matches full precision's before the first difference. Two protocols:

- "window": one forward pass per window in which every key and value goes through the format
  (quantized and dequantized right after RoPE, inside the attention; transformers' SDPA attends).
  Greedy continuations: `generate` with that attention over a DynamicCache.
- "decode": token by token through the real `FP4Cache` (the "fp4kv" attention, which decodes with
  `fp4kv.decode_attention`). Greedy continuations: `generate` with the cache (the prompt is
  prefilled, attending to itself in full precision; the continuation is decoded from FP4).

An FP4 cache may carry accuracy options as suffixes of its recipe (`torch_fp4kv.options`' grammar,
e.g. `nvfp4+rot+smooth+k8` or `nvfp4+rot+smooth+sink4+recent128`); `+smooth` caches are
calibrated, with the global scales, on text apart from the scored windows. Both protocols honour
the options (the window protocol, `hf/simulate.py`, picks per query and key the full-precision or
the round-tripped score and value).

Bytes per token count what a token's K and V take over all layers, plus the full-precision tokens
a sequence keeps on top (the sinks and ring, quanto's residual of 128) spread over a context of
AVERAGED_OVER tokens.

The anchor users pick today, transformers' `QuantizedCache` with the quanto backend at its
defaults (int4, groups of 64, the last 128 tokens kept in full precision), runs in "decode"; for
models with sliding-window layers, which it refuses, its layers are assembled by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import QuantizedCache
from transformers.cache_utils import Cache, QuantoQuantizedLayer

from .hf import ATTENTION_NAME, FP4Cache, cache_argument, calibrate, roundtrip_attention
from .ops import FORMATS, get_kv_recipe
from .options import SUFFIXES_HELP, KVCacheOptions

PROTOCOLS = ("window", "decode")
ANCHOR = "quanto-int4"
FULL = "full"
REFERENCE_ATTENTION = "sdpa"
# The context over which full-precision tokens kept per sequence are spread in bytes per token.
AVERAGED_OVER = 4096


def parse_cache(name: str) -> tuple[str, KVCacheOptions]:
    """"nvfp4+rot+smooth+sink4+recent128" -> ("nvfp4", KVCacheOptions(rotate=True, smooth_k=True,
    sink_tokens=4, recent_tokens=128)): an FP4 format and its options; ValueError otherwise."""
    try:
        fmt, options = KVCacheOptions.parse(name)
    except ValueError as bad:
        reason = str(bad)
    else:
        if fmt in FORMATS:
            return fmt, options
        reason = f"{fmt!r} is not an FP4 recipe"
    raise ValueError(f"recipes: {name!r} is neither an FP4 recipe {sorted(FORMATS)} (with optional suffixes "
                     f"{SUFFIXES_HELP}) nor {ANCHOR!r}: {reason}")


def needs_calibration(name: str) -> bool:
    return name not in (ANCHOR, FULL) and parse_cache(name)[1].smooth_k


@dataclass(frozen=True)
class Setting:
    """One row of results: a protocol ("window", "decode", or "reference" for full precision) and
    what holds the keys and values (an FP4 recipe, ANCHOR, or FULL)."""

    protocol: str
    cache: str


def settings_for(recipes: list[str], protocols: list[str]) -> list[Setting]:
    """Full precision first, then each protocol's rows; the anchor only in "decode"."""
    for name in recipes:
        if name != ANCHOR:
            parse_cache(name)
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocols: {protocol!r} is not one of {PROTOCOLS}")
    rows = [Setting("reference", FULL)]
    for protocol in protocols:
        rows += [Setting(protocol, name) for name in recipes if name != ANCHOR or protocol == "decode"]
    return rows


@dataclass
class Totals:
    nll: float = 0.0
    kl: float = 0.0
    predictions: int = 0
    greedy_matched: int = 0
    greedy_tokens: int = 0

    def add_predictions(self, logprobs: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor) -> None:
        """logprobs, reference [..., V] (log-softmax); targets [...] (the tokens that followed)."""
        self.nll -= logprobs.gather(-1, targets[..., None]).sum().item()
        self.kl += torch.sum(reference.exp() * (reference - logprobs)).item()
        self.predictions += targets.numel()

    def add_greedy(self, tokens: torch.Tensor, reference: torch.Tensor) -> None:
        """Continuations [P, N]: count each one's tokens up to its first difference from reference."""
        differs = tokens != reference
        first_difference = torch.where(differs.any(1), differs.float().argmax(1), tokens.shape[1])
        self.greedy_matched += int(first_difference.sum())
        self.greedy_tokens += tokens.numel()

    def summary(self) -> dict[str, float]:
        return {"perplexity": math.exp(self.nll / self.predictions), "kl": self.kl / self.predictions,
                "greedy_agreement": self.greedy_matched / self.greedy_tokens if self.greedy_tokens else float("nan"),
                "predictions": self.predictions}


def kv_bytes_per_token(model, cache: str) -> float:
    """Bytes of K and V one token takes over all layers (before any window limit): FP4 from the
    format table; quanto measured on its own tensors; full precision in the model's dtype. Caches
    that keep some tokens of each sequence in full precision on top (quanto's residual, FP4's sinks
    and recent ring) add those tokens' full-precision bytes / AVERAGED_OVER."""
    config = model.config.get_text_config(decoder=True)
    layers, heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    full = 2 * layers * heads * head_dim * model.dtype.itemsize
    if cache == FULL:
        return full
    if cache == ANCHOR:
        tokens = 1024
        layer = QuantoQuantizedLayer()
        quantized = layer._quantize(torch.randn(1, heads, tokens, head_dim, dtype=model.dtype), axis=0)
        return 2 * layers * _tensor_bytes(quantized) / tokens + layer.residual_length * full / AVERAGED_OVER
    fmt, options = parse_cache(cache)
    kv_recipe = get_kv_recipe(options.kv_recipe(fmt))
    kept = options.sink_tokens + options.recent_tokens
    return layers * kv_recipe.bytes_per_token(heads, head_dim) + kept * full / AVERAGED_OVER


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage of a tensor, or of the inner tensors of a tensor subclass (quanto's packed codes,
    scales and shifts)."""
    if type(tensor) is torch.Tensor:
        return tensor.numel() * tensor.element_size()
    inner, _ = tensor.__tensor_flatten__()
    return sum(_tensor_bytes(getattr(tensor, name)) for name in inner)


def _window_logprobs(model, windows: torch.Tensor, attention: str) -> torch.Tensor:
    model.set_attn_implementation(attention)
    return torch.log_softmax(model(windows, use_cache=False).logits[:, :-1].float(), -1)


def _roundtrip_attention(cache: str, calibrations: dict) -> str:
    return roundtrip_attention(cache, calibration=calibrations.get(cache))


def _new_cache(model, setting: Setting, length: int, calibrations: dict):
    """Switch the model to the setting's attention; the cache it decodes with (None: DynamicCache)."""
    if setting.protocol == "decode":
        model.set_attn_implementation(REFERENCE_ATTENTION if setting.cache == ANCHOR else ATTENTION_NAME)
        if setting.cache == ANCHOR:
            return _quanto_cache(model.config)
        return FP4Cache(model.config, length, setting.cache, calibration=calibrations.get(setting.cache))
    model.set_attn_implementation(REFERENCE_ATTENTION if setting.cache == FULL
                                  else _roundtrip_attention(setting.cache, calibrations))
    return None


def _quanto_cache(config):
    """transformers' QuantizedCache with the quanto backend at its defaults. It refuses models with
    sliding-window layers (Gemma 3), so there the same layers are assembled by hand: every layer
    keeps all its tokens, and the sliding mask limits what they see."""
    text_config = config.get_text_config(decoder=True)
    if set(getattr(text_config, "layer_types", None) or ["full_attention"]) == {"full_attention"}:
        return QuantizedCache("quanto", config)
    return Cache(layers=[QuantoQuantizedLayer() for _ in range(text_config.num_hidden_layers)])


def calibrations_for(model, settings: list[Setting], calib_windows: torch.Tensor | None) -> dict[str, dict]:
    """Calibration state dicts (hf.calibrate) of the settings' caches that smooth K, from
    `calib_windows` [W, S] (text apart from the scored windows)."""
    found = {}
    for setting in settings:
        if setting.cache in found or not needs_calibration(setting.cache):
            continue
        if calib_windows is None:
            raise ValueError(f"{setting.cache} needs calibration text (calib_windows)")
        found[setting.cache] = calibrate(model, calib_windows, setting.cache)
    model.set_attn_implementation(REFERENCE_ATTENTION)
    return found


def window_metrics(model, windows: torch.Tensor, settings: list[Setting], batch_size: int, bar,
                   calibrations: dict | None = None) -> dict[Setting, Totals]:
    """Perplexity and KL over windows [W, S]; each window's first token is context only."""
    calibrations = calibrations or {}
    totals = {setting: Totals() for setting in settings}
    for batch in windows.split(batch_size):
        targets = batch[:, 1:]
        reference = _window_logprobs(model, batch, REFERENCE_ATTENTION)
        bar.update(1)
        for setting in settings:
            if setting.protocol == "reference":
                totals[setting].add_predictions(reference, reference, targets)
            elif setting.protocol == "window":
                totals[setting].add_predictions(
                    _window_logprobs(model, batch, _roundtrip_attention(setting.cache, calibrations)), reference, targets)
                bar.update(1)
            else:
                cache_kwargs = {cache_argument(model): _new_cache(model, setting, batch.shape[1], calibrations)}
                for t in range(batch.shape[1] - 1):
                    logits = model(batch[:, t:t + 1], **cache_kwargs, use_cache=True).logits[:, -1]
                    totals[setting].add_predictions(torch.log_softmax(logits.float(), -1), reference[:, t],
                                                    targets[:, t])
                    bar.update(1)
    return totals


def greedy_continuations(model, prompts: torch.Tensor, setting: Setting, new_tokens: int,
                         calibrations: dict | None = None) -> torch.Tensor:
    """`generate`'s greedy continuation [P, new_tokens] of equal-length prompts [P, L]."""
    cache = _new_cache(model, setting, prompts.shape[1] + new_tokens, calibrations or {})
    kwargs = {} if cache is None else {cache_argument(model): cache}
    pad = model.generation_config.pad_token_id
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=pad if pad is not None else model.generation_config.eos_token_id, **kwargs)
    return out[:, prompts.shape[1]:]


WINDOWS, STEP, GENERATE = "windows", "step", "generate"  # the kinds of forward_passes


def forward_passes(settings: list[Setting], windows: int, window_size: int, batch_size: int) -> list[tuple[str, Setting]]:
    """What `evaluate` runs, in order, one entry per update of its progress bar: (WINDOWS, setting)
    a forward pass over a batch of whole windows, (STEP, setting) one token of each window of a
    batch through the cache, (GENERATE, setting) a greedy continuation of the prompts. Their costs
    differ by orders of magnitude (progress.TimeLeft estimates each kind's)."""
    per_batch = [(WINDOWS, settings[0])]  # the reference's pass, which every setting compares with
    for setting in settings:
        if setting.protocol == "window":
            per_batch.append((WINDOWS, setting))
        elif setting.protocol == "decode":
            per_batch += [(STEP, setting)] * (window_size - 1)
    return per_batch * math.ceil(windows / batch_size) + [(GENERATE, setting) for setting in settings]


@torch.inference_mode()
def evaluate(model, windows: torch.Tensor, prompts: torch.Tensor, settings: list[Setting], new_tokens: int,
             batch_size: int, bar, calib_windows: torch.Tensor | None = None) -> list[dict]:
    """One result row per setting: its bytes per token and accuracy figures (caches that smooth K
    are calibrated on `calib_windows` first)."""
    calibrations = calibrations_for(model, settings, calib_windows)
    totals = window_metrics(model, windows, settings, batch_size, bar, calibrations)
    reference = None
    for setting in settings:  # the reference row comes first
        tokens = greedy_continuations(model, prompts, setting, new_tokens, calibrations)
        reference = tokens if reference is None else reference
        totals[setting].add_greedy(tokens, reference)
        bar.update(1)
    model.set_attn_implementation(REFERENCE_ATTENTION)
    return [{"protocol": s.protocol, "cache": s.cache, "bytes_per_token": kv_bytes_per_token(model, s.cache),
             **totals[s].summary()} for s in settings]
