"""An FP4 KV cache for transformers models: `model.generate(..., past_key_values=FP4Cache(...))`.

Static like transformers' `StaticCache`: every buffer is allocated once (on the first update, or by
`early_initialization`) and written in place, so a decode step compiles with
`torch.compile(fullgraph=True)` and replays as a CUDA graph. The "fp4kv" attention implementation
(`attention.py`) does the storing and attending; this module keeps the storage and its bookkeeping.

Layout, per layer: one contiguous range of `capacity` slots per sequence (`max_cache_len` for
full-attention layers, the window for sliding ones) in an `FP4KVLayerCache`. A sequence's real
tokens take slots in order of their position, modulo the capacity: full layers never wrap (a
longer input raises), sliding layers are rings holding the last `window` tokens (attention is
permutation invariant once RoPE is in the keys). Padding is never stored. The page table of
`fp4kv.decode_attention` is each sequence's range cut in pages.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import StaticCache
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from ..layer_cache import FP4KVLayerCache
from ..methods import TableFP4KVMethod, _per_layer, get_fp4_kv_cache_quant_method
from ..ops.checks import DECODE_HEAD_DIMS, MAX_PAGE_SIZE
from .positional import positional_attention

ATTENTION_NAME = "fp4kv"
# decode_attention takes bf16/fp16 queries; fp32 models decode with fp16 queries (10 mantissa
# bits against bf16's 7; query magnitudes are far below fp16's range) and get fp32 back.
_DECODE_QUERY_DTYPE = {torch.float32: torch.float16}


class FP4KVChunk(NamedTuple):
    """What `FP4CacheLayer.update` returns in place of keys or values: the new tokens' states
    [B, H, T, D] and the layer that will store them once the attention knows which are padding."""

    layer: "FP4CacheLayer"
    states: torch.Tensor


def _page_size(capacity: int) -> int:
    """The largest power of two <= MAX_PAGE_SIZE that divides the capacity (1 for odd ones)."""
    return min(capacity & -capacity, MAX_PAGE_SIZE)


def _token_major(states: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B * T, H, D], the ops' token-major layout."""
    b, h, t, d = states.shape
    return states.transpose(1, 2).reshape(b * t, h, d)


class FP4CacheLayer(CacheLayerMixin):
    """One attention layer's FP4 cache: `capacity` slots per sequence, in FP4 with block scales."""

    is_compileable = True

    def __init__(self, recipe: str, max_cache_len: int, sliding_window: int | None = None, *,
                 rotate: bool = False, smooth_k: bool = False, k_fp8: bool = False, calibration: dict | None = None):
        """`calibration`: this layer's entries of a calibration state dict (`layers.0.k_mean`, ...;
        `layer_calibration` cuts them from a model's)."""
        super().__init__()
        self.recipe = recipe
        self.options = {"rotate": rotate, "smooth_k": smooth_k, "k_fp8": k_fp8}
        self.calibration = calibration
        self.max_cache_len = max_cache_len
        self.window = sliding_window
        self.is_sliding = sliding_window is not None
        self.capacity = min(sliding_window, max_cache_len) if self.is_sliding else max_cache_len
        self.page_size = _page_size(self.capacity)
        # Positions seen, padding included (what get_seq_length reports, as StaticLayer does).
        self.cumulative_length = torch.tensor(0, dtype=torch.int64)
        self.holds_tokens = False  # lets the first prefill skip reading an empty prefix

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        if head_dim not in DECODE_HEAD_DIMS:
            raise ValueError(f"key_states: head_dim {head_dim} is not one of {DECODE_HEAD_DIMS} "
                             "(what fp4kv.decode_attention supports)")
        device = key_states.device
        method = get_fp4_kv_cache_quant_method(self.recipe, **self.options)
        method.create_buffers(batch * self.capacity, heads, head_dim, 1, device)
        if self.calibration:
            method.load_scales_from_model(self.calibration)
        self.fp4: FP4KVLayerCache = method.layer(0)
        self.device, self.batch_size, self.num_heads, self.head_dim = device, batch, heads, head_dim
        pages = self.capacity // self.page_size
        self.block_table = (torch.arange(batch, device=device)[:, None] * pages
                            + torch.arange(pages, device=device)).to(torch.int32)
        self.slot_base = torch.arange(batch, device=device) * self.capacity
        self.real_tokens = torch.zeros(batch, dtype=torch.int64, device=device)  # per sequence, never capped
        self.cumulative_length = self.cumulative_length.to(device)
        if not torch.compiler.is_compiling():  # fixed addresses: CUDA graphs replay on them
            for tensor in (*self.fp4.buffers(), self.block_table, self.slot_base, self.real_tokens,
                           self.cumulative_length):
                torch._dynamo.mark_static_address(tensor)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Count the new positions; storing waits for the attention, which has the padding mask."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length.add_(key_states.shape[-2])
        return FP4KVChunk(self, key_states), FP4KVChunk(self, value_states)

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               real: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Store the new tokens' keys/values [B, Hkv, T, D] (`real` [B, T]: which are not padding;
        None: all), then attention of `query` [B, Hq, T, D] over what each sequence sees.

        One token per sequence (decode): `fp4kv.decode_attention` reads the FP4 cache directly.
        Longer chunks (prefill): the chunk attends to itself in full precision and to the earlier
        tokens dequantized from the cache."""
        batch, _, tokens, _ = query.shape
        if real is None:
            real = torch.ones(batch, tokens, dtype=torch.bool, device=query.device)
        before = self.real_tokens
        positions = before[:, None] + real.cumsum(1) - 1  # of the new tokens, in their sequence
        after = before + real.sum(1)
        # The ring keeps the last `capacity` tokens; older ones in this chunk are not stored, so no
        # two tokens of one call share a slot.
        kept = real & (positions >= after[:, None] - self.capacity)
        loc = torch.where(kept, self.slot_base[:, None] + positions % self.capacity, -1).flatten()
        if tokens == 1:
            return self._decode(query, keys, values, loc, after, scaling)
        key_pos, key_real = positions, real
        if self.holds_tokens:
            prefix_k, prefix_v, prefix_pos = self._read_prefix(query.dtype)
            keys, values = torch.cat((prefix_k, keys), 2), torch.cat((prefix_v, values), 2)
            key_pos, key_real = torch.cat((prefix_pos, positions), 1), torch.cat((prefix_pos >= 0, real), 1)
        self._store(loc, keys[:, :, -tokens:], values[:, :, -tokens:], after)
        return positional_attention(query, keys, values, positions, real, key_pos, key_real, scaling, self.window)

    def _store(self, loc, keys, values, after) -> None:
        self.fp4.store(loc, _token_major(keys), _token_major(values))
        self.real_tokens.copy_(after)
        self.holds_tokens = True

    def _decode(self, query, keys, values, loc, after, scaling):
        self._store(loc, keys, values, after)
        seq_lens = self.real_tokens.clamp(max=self.capacity).to(torch.int32)
        q = query[:, :, 0]
        q_dtype = _DECODE_QUERY_DTYPE.get(q.dtype, q.dtype)
        out = self.fp4.decode(q.to(q_dtype).contiguous(), self.block_table, seq_lens, self.page_size, scaling)
        return out.to(query.dtype)[:, :, None]

    def _read_prefix(self, dtype):
        """Every slot of every sequence dequantized ([B, Hkv, capacity, D]) with the position of the
        token it holds (-1: empty). Slot j of a ring holds the latest position = j mod capacity."""
        slots = torch.arange(self.batch_size * self.capacity, device=self.device)
        k, v = self.fp4.read(slots, dtype)
        shape = (self.batch_size, self.capacity, self.num_heads, self.head_dim)
        last = self.real_tokens[:, None] - 1
        positions = last - torch.remainder(last - torch.arange(self.capacity, device=self.device), self.capacity)
        return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2), positions

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """transformers asks before building masks; the "fp4kv" mask function does not use them."""
        return self.capacity, 0

    def get_seq_length(self):
        """Positions seen, padding included: a device tensor once initialized (no host sync)."""
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Forget every token (the buffers stay where CUDA graphs captured them)."""
        self.cumulative_length.zero_()
        if self.is_initialized:
            self.real_tokens.zero_()
        self.holds_tokens = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("FP4Cache does not support beam search (reordering sequences)")

    def kv_bytes(self) -> int:
        """Bytes of this layer's K/V storage: FP4 data, block scales and global scales."""
        return sum(b.numel() * b.element_size() for b in self.fp4.buffers())


def layer_calibration(state: dict | None, layer_idx: int) -> dict | None:
    """Layer `layer_idx`'s entries of a calibration state dict (keys `...layers.{i}.k_mean`,
    `.k_scale`, `.v_scale`), renamed `layers.0.*` for a one-layer method; None if it has none."""
    if not state:
        return None
    found = {f"layers.0.{name}": _per_layer(state, name)[layer_idx] for name in ("k_mean", "k_scale", "v_scale")
             if layer_idx in _per_layer(state, name)}
    return found or None


def _fp4_layers(text_config, max_cache_len: int, recipe: str, **options) -> list[FP4CacheLayer]:
    """One FP4CacheLayer per layer of the config, sized by its type (transformers' reading of it)."""
    layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
    calibration = options.pop("calibration", None)
    layers = []
    for index, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
        if layer_type not in ("full_attention", "sliding_attention"):
            raise ValueError(f"config: layer {index} is {layer_type!r}; FP4Cache supports full_attention "
                             "and sliding_attention layers")
        layers.append(FP4CacheLayer(recipe, max_cache_len, kwargs.get("sliding_window"),
                                    calibration=layer_calibration(calibration, index), **options))
    return layers


class FP4Cache(Cache):
    """An FP4 KV cache for a transformers model loaded with `attn_implementation="fp4kv"`.

    `FP4Cache(model.config, max_cache_len, recipe)`: like `StaticCache(config, max_cache_len)`,
    `max_cache_len` counts every position, left padding included; sliding-window layers hold
    only their window. `recipe` names a method of the registry (`get_fp4_kv_cache_quant_method`)
    whose layers come from the format table. Beam search is not supported.

    Accuracy options (see `TableFP4KVMethod`): `rotate=True` keeps K/V Hadamard-rotated,
    `smooth_k=True` subtracts a per-channel K mean, `k_fp8=True` keeps K in FP8 E4M3 (V in the
    recipe); `calibration` is a state dict from `torch_fp4kv.hf.calibrate` with the same options
    (K means, global scales; without it the means are zero and the global scales 1).
    """

    def __init__(self, config, max_cache_len: int, recipe: str = "nvfp4", *, rotate: bool = False,
                 smooth_k: bool = False, k_fp8: bool = False, calibration: dict | None = None):
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
        method = get_fp4_kv_cache_quant_method(recipe, rotate=rotate, smooth_k=smooth_k, k_fp8=k_fp8)
        if not isinstance(method, TableFP4KVMethod):
            raise ValueError(f"recipe {recipe!r} is not a table-driven method (it must provide per-layer caches)")
        text_config = config.get_text_config(decoder=True)
        if text_config._attn_implementation != ATTENTION_NAME:
            raise ValueError(f"config: the model must run attn_implementation={ATTENTION_NAME!r} (import "
                             f"torch_fp4kv.hf, then load it with that argument or call "
                             f"model.set_attn_implementation({ATTENTION_NAME!r})); it runs "
                             f"{text_config._attn_implementation!r}")
        super().__init__(layers=_fp4_layers(text_config, max_cache_len, recipe, rotate=rotate, smooth_k=smooth_k,
                                            k_fp8=k_fp8, calibration=calibration))
        self.recipe = recipe

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0 and not torch.compiler.is_compiling():
            layer = self.layers[0]
            seen = int(layer.get_seq_length())
            if seen + key_states.shape[-2] > layer.max_cache_len:
                raise ValueError(f"max_cache_len={layer.max_cache_len} is too small: {seen} positions are cached "
                                 f"and {key_states.shape[-2]} more arrive")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def kv_bytes(self) -> int:
        """Bytes of K/V storage over all layers (allocated: after the first update)."""
        if not self.is_initialized:
            raise RuntimeError("FP4Cache allocates on its first update (or early_initialization)")
        return sum(layer.kv_bytes() for layer in self.layers)


def kv_cache_bytes(config, max_cache_len: int, batch_size: int, recipe: str = "nvfp4",
                   dtype: torch.dtype = torch.bfloat16, *, k_fp8: bool = False) -> dict[str, int]:
    """K/V bytes of an FP4Cache (with K in FP8 when k_fp8) and of transformers' StaticCache in
    `dtype` for the same model, batch and length, both allocated on the meta device (nothing is
    really allocated)."""
    text_config = config.get_text_config(decoder=True)
    heads, head_dim = text_config.num_key_value_heads, text_config.head_dim
    static = StaticCache(config=text_config, max_cache_len=max_cache_len)
    static.early_initialization(batch_size, heads, head_dim, dtype, torch.device("meta"))
    fp4 = Cache(layers=_fp4_layers(text_config, max_cache_len, recipe, k_fp8=k_fp8))
    fp4.early_initialization(batch_size, heads, head_dim, dtype, torch.device("meta"))
    static_bytes = sum(t.numel() * t.element_size() for layer in static.layers for t in (layer.keys, layer.values))
    return {"fp4": sum(layer.kv_bytes() for layer in fp4.layers), "static": static_bytes}
