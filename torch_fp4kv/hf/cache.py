"""An FP4 KV cache for transformers models: `model.generate(..., cache=FP4Cache(...))`.

Static like transformers' `StaticCache`: every buffer is allocated once (on the first update, or by
`early_initialization`) and written in place, so a decode step compiles with
`torch.compile(fullgraph=True)` and replays as a CUDA graph. The "fp4kv" attention implementation
(`attention.py`) does the storing and attending; this module keeps the storage and its bookkeeping.

Layout, per layer: one contiguous range of `capacity` slots per sequence (`max_cache_len` for
full-attention layers, the window for sliding ones) in an `FP4KVPoolLayer`. A sequence's real
tokens take slots in order of their position, modulo the capacity: full layers never wrap (past
the end, positions are dropped: `FP4Cache`'s docstring), sliding layers are rings holding the
last `window` tokens (attention is permutation invariant once RoPE is in the keys). Padding is
never stored. The page table of `fp4kv.decode_attention` is each sequence's range cut in pages.

Full-precision sinks and recent window (`sink_tokens` S, `recent_tokens` R): a sequence's first S
positions and its last R are attended in full precision, the rest from FP4. Each layer keeps, per
sequence, S sink slots and a ring of R slots (position p at p mod R) in the compute dtype, besides
the FP4 slots, which hold the positions from S on (position p at FP4 slot (p - S) mod capacity).
A decode step runs `fp4kv.decode_attention` over the FP4 positions that are neither sinks nor in
the ring, with its log-sum-exp, runs attention over [sinks; ring] (masked by position) in
PyTorch, and merges the two by their log-sum-exps: no data-dependent shapes or Python branches.
Full layers read the FP4 positions [S, L - R) of a sequence of L tokens through the usual page
table; sliding layers (a ring of `window` FP4 slots) read [max(S, L - window), L - R) through a
token table (pages of one slot) rotated on the device every step. On sliding layers the sinks
count only while the window still holds them (the model's window rule is kept: a sink is not an
extra key). A prefill chunk attends to itself in full precision, as without the options, and to
the cached sinks and ring in full precision and the rest of the cache in FP4.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from transformers import StaticCache
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from ..calibration import check_calibration, layer_entries, load_calibration
from ..layer_cache import FP4KVPoolLayer
from ..methods import table_format
from ..ops import get_kv_recipe
from ..ops.checks import DECODE_HEAD_DIMS, MAX_PAGE_SIZE
from ..options import KVCacheOptions
from .positional import attention_with_lse, merge_attention, positional_attention

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


def _write_slots(buffer: torch.Tensor, states: torch.Tensor, slot: torch.Tensor, write: torch.Tensor) -> None:
    """buffer[b, :, slot[b, t]] = states[b, :, t] where write[b, t], in place; buffer [B, H, N, D],
    states [B, H, T, D], slot/write [B, T], the written slots of a row distinct. Static shapes, no
    host sync: each slot takes the token that names it, or keeps its value."""
    batch, heads, slots, dim = buffer.shape
    hit = write[:, :, None] & (slot[:, :, None] == torch.arange(slots, device=slot.device))  # [B, T, N]
    source = hit.int().argmax(1)  # [B, N]: the token written to each slot (0 where none)
    new = states.gather(2, source[:, None, :, None].expand(batch, heads, slots, dim)).to(buffer.dtype)
    buffer.copy_(torch.where(hit.any(1)[:, None, :, None], new, buffer))



def cache_argument(model) -> str:
    """The name `model`'s forward (and so generate) takes a cache by: "cache" where transformers
    has it (5.24 on; "past_key_values" still works there, deprecated, until 6.0), else
    "past_key_values"."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class FP4CacheLayer(CacheLayerMixin):
    """One attention layer of transformers' `FP4Cache`: `capacity` slots per sequence, in FP4 with
    block scales (an `FP4KVPoolLayer`, `fp4`), and the full-precision sinks and ring."""

    is_compileable = True

    def __init__(self, recipe: str, max_cache_len: int, sliding_window: int | None = None, *,
                 rotate: bool | None = None, smooth_k: bool | None = None, channel_scale_k: bool | None = None,
                 k_fp8: bool | None = None, calibration: dict | None = None, sink_tokens: int | None = None,
                 recent_tokens: int | None = None, layer_idx: int = 0):
        """`recipe` and the option keywords as `FP4Cache` takes them. `calibration`: a calibration
        state dict, of which this layer loads layer `layer_idx`'s entries (`layers.{layer_idx}.k_mean`,
        ...). `sink_tokens`, `recent_tokens`: positions attended in full precision at each
        sequence's start and end (module docstring)."""
        super().__init__()
        method, self.options = KVCacheOptions.resolve(recipe, rotate=rotate, smooth_k=smooth_k,
                                                      channel_scale_k=channel_scale_k, k_fp8=k_fp8,
                                                      sink_tokens=sink_tokens, recent_tokens=recent_tokens)
        self.fmt = table_format(method)
        self.recipe = self.options.spell(method)
        self.calibration = layer_entries(calibration, layer_idx)
        self.layer_idx = layer_idx
        self.max_cache_len = max_cache_len
        self.window = sliding_window
        self.is_sliding = sliding_window is not None
        self.capacity = min(sliding_window, max_cache_len) if self.is_sliding else max_cache_len
        self.sinks = self.options.sink_tokens
        # A sliding layer never attends more than its window: a longer ring would hold nothing seen.
        self.recent = min(self.options.recent_tokens, self.capacity)
        self.full_precision = self.sinks > 0 or self.recent > 0
        # A sliding layer's FP4 range starts anywhere in its ring: a token table, rotated each step.
        self.page_size = 1 if self.is_sliding and self.full_precision else _page_size(self.capacity)
        # Positions seen, padding included (what get_seq_length reports, as StaticLayer does).
        self.cumulative_length = torch.tensor(0, dtype=torch.int64)
        self.holds_tokens = False  # lets the first prefill skip reading an empty prefix

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        if head_dim not in DECODE_HEAD_DIMS:
            raise ValueError(f"key_states: head_dim {head_dim} is not one of {DECODE_HEAD_DIMS} "
                             "(what fp4kv.decode_attention supports)")
        device = key_states.device
        self.fp4 = FP4KVPoolLayer.allocate(self.fmt, self.options.method_options, batch * self.capacity, heads,
                                           head_dim, device)
        if self.calibration:
            load_calibration([self.fp4], self.calibration, [self.layer_idx])
        self.device, self.batch_size, self.num_heads, self.head_dim = device, batch, heads, head_dim
        pages = self.capacity // self.page_size
        self.block_table = (torch.arange(batch, device=device)[:, None] * pages
                            + torch.arange(pages, device=device)).to(torch.int32)
        self.slot_base = torch.arange(batch, device=device) * self.capacity
        self.real_tokens = torch.zeros(batch, dtype=torch.int64, device=device)  # per sequence, never capped
        self.cumulative_length = self.cumulative_length.to(device)
        # Full precision, in the states' dtype: sinks [B, H, S, D] and the ring [B, H, R, D] (empty
        # without the options).
        self.full_buffers = tuple(torch.zeros(batch, heads, n, head_dim, dtype=key_states.dtype, device=device)
                                  for n in (self.sinks, self.sinks, self.recent, self.recent))
        if not torch.compiler.is_compiling():  # fixed addresses: CUDA graphs replay on them
            for tensor in (*self.fp4.buffers(), *self.full_buffers, self.block_table, self.slot_base, self.real_tokens,
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
        held_after = self._held_length(after)[:, None]
        held = real & (positions < held_after)
        # FP4 holds the held positions from `sinks` on, the last `capacity` of them; older ones in
        # this chunk are not stored, so no two tokens of one call share a slot.
        kept = held & (positions >= held_after - self.capacity) & (positions >= self.sinks)
        loc = torch.where(kept, self.slot_base[:, None] + (positions - self.sinks) % self.capacity, -1).flatten()
        if tokens == 1:
            return self._decode(query, keys, values, loc, positions, held, after, scaling)
        key_pos, key_real = positions, held
        if self.holds_tokens:
            prefix_k, prefix_v, prefix_pos = self._read_prefix(query.dtype)
            keys, values = torch.cat((prefix_k, keys), 2), torch.cat((prefix_v, values), 2)
            key_pos, key_real = torch.cat((prefix_pos, positions), 1), torch.cat((prefix_pos >= 0, held), 1)
        self._store(loc, keys[:, :, -tokens:], values[:, :, -tokens:], positions, held, after)
        return positional_attention(query, keys, values, positions, real, key_pos, key_real, scaling, self.window)

    def _held_length(self, length: torch.Tensor) -> torch.Tensor:
        """How many of a sequence's first `length` positions this layer holds: all on a sliding
        layer (a ring: the window rule hides what it overwrote), the first `capacity` on a full
        one, which never wraps: later positions are dropped, neither stored nor attended, so a
        compiled step past max_cache_len (where FP4Cache cannot check) overwrites nothing."""
        return length if self.is_sliding else length.clamp(max=self.capacity)

    def _store(self, loc, keys, values, positions, held, after) -> None:
        """Write the new tokens: FP4 at `loc` (-1: none); with the options, the `held` ones among
        the first S into the sinks and among the last R held into the ring. real_tokens becomes
        `after`, never capped: positions keep counting past a full layer's end."""
        self.fp4.store(loc, _token_major(keys), _token_major(values))
        if self.full_precision:
            sink_k, sink_v, ring_k, ring_v = self.full_buffers
            is_sink = held & (positions < self.sinks)
            recent = held & (positions >= self._held_length(after)[:, None] - self.recent)  # the chunk's last R at most
            ring_slot = positions % max(self.recent, 1)
            for buffer, states in ((sink_k, keys), (sink_v, values)):
                _write_slots(buffer, states, positions, is_sink)
            for buffer, states in ((ring_k, keys), (ring_v, values)):
                _write_slots(buffer, states, ring_slot, recent)
        self.real_tokens.copy_(after)
        self.holds_tokens = True

    def _decode(self, query, keys, values, loc, positions, held, after, scaling):
        self._store(loc, keys, values, positions, held, after)
        q = query[:, :, 0]
        q_dtype = _DECODE_QUERY_DTYPE.get(q.dtype, q.dtype)
        q_fp4 = q.to(q_dtype).contiguous()
        if not self.full_precision:
            seq_lens = self.real_tokens.clamp(max=self.capacity).to(torch.int32)
            out = self.fp4.decode_attention(q_fp4, self.block_table, seq_lens, self.page_size, scaling)
            return out.to(query.dtype)[:, :, None]
        block_table, seq_lens = self._fp4_range()
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        fp4_out = self.fp4.decode_attention(q_fp4, block_table, seq_lens, self.page_size, scaling, lse=lse)
        full_k, full_v, full_pos = self._full_precision_entries()
        visible = full_pos >= 0
        if self.is_sliding:  # the window rule: query - key < window
            visible &= self.real_tokens[:, None] - 1 - full_pos < self.capacity
        full = attention_with_lse(q, full_k, full_v, visible, scaling)
        return merge_attention((fp4_out, lse), full).to(query.dtype)[:, :, None]

    def _fp4_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The page table and lengths that make decode_attention read each sequence's FP4 positions
        that are neither sinks nor in the recent ring: [S, L - R) on full layers (FP4 slot p - S,
        the usual table), [max(S, L - window), L - R) on sliding ones (a token table from the slot
        of its first position, around the ring)."""
        length = self._held_length(self.real_tokens)
        if not self.is_sliding:
            return self.block_table, (length - self.recent - self.sinks).clamp(min=0).to(torch.int32)
        first = (length - self.capacity).clamp(min=self.sinks)
        seq_lens = (length - self.recent - first).clamp(min=0).to(torch.int32)
        offsets = (first[:, None] - self.sinks + torch.arange(self.capacity, device=self.device)) % self.capacity
        return (self.slot_base[:, None] + offsets).to(torch.int32), seq_lens

    def _full_precision_entries(self):
        """Sinks and ring, K and V [B, Hkv, S + R, D], with the position each entry holds, -1 where
        it holds none (a sink the ring holds too counts once, from the ring)."""
        sink_k, sink_v, ring_k, ring_v = self.full_buffers
        length = self._held_length(self.real_tokens)[:, None]
        sink_pos = torch.arange(self.sinks, device=self.device)[None, :]
        sink_pos = torch.where(sink_pos < length - self.recent, sink_pos, -1)
        last = length - 1
        ring_pos = last - torch.remainder(last - torch.arange(self.recent, device=self.device), max(self.recent, 1))
        positions = torch.cat((sink_pos.expand(self.batch_size, -1), ring_pos.clamp(min=-1)), 1)
        return torch.cat((sink_k, ring_k), 2), torch.cat((sink_v, ring_v), 2), positions

    def _read_prefix(self, dtype):
        """What a prefill chunk attends to besides itself: K/V [B, Hkv, N, D] with the position each
        entry holds (-1: none). Every FP4 slot, dequantized (slot j of a ring holds the latest
        position = j mod capacity, counted from `sinks`), then, with the options, the sinks and
        ring in full precision in place of the FP4 copies of those positions."""
        slots = torch.arange(self.batch_size * self.capacity, device=self.device)
        k, v = self.fp4.read(slots, dtype)
        shape = (self.batch_size, self.capacity, self.num_heads, self.head_dim)
        k, v = k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)
        length = self._held_length(self.real_tokens)[:, None]
        last = (length - self.sinks).clamp(min=0) - 1  # FP4 coordinates
        slot_pos = last - torch.remainder(last - torch.arange(self.capacity, device=self.device), self.capacity)
        positions = torch.where(slot_pos >= 0, slot_pos + self.sinks, -1)
        if not self.full_precision:
            return k, v, positions
        positions = torch.where(positions < length - self.recent, positions, -1)
        full_k, full_v, full_pos = self._full_precision_entries()
        return (torch.cat((k, full_k.to(dtype)), 2), torch.cat((v, full_v.to(dtype)), 2),
                torch.cat((positions, full_pos), 1))

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
        """Bytes of this layer's K/V storage: FP4 data, block scales, global scales, and the
        full-precision sinks and ring."""
        return sum(b.numel() * b.element_size() for b in (*self.fp4.buffers(), *self.full_buffers))


def _fp4_layers(text_config, max_cache_len: int, recipe: str, calibration: dict | None = None) -> list[FP4CacheLayer]:
    """One FP4CacheLayer per layer of the config, sized by its type (transformers' reading of it);
    `recipe` spells the options."""
    rank = getattr(text_config, "kv_lora_rank", None)
    if rank is not None:
        raise ValueError(f"config: {text_config.model_type} uses Multi-head Latent Attention (kv_lora_rank={rank}): "
                         "its attention caches the latent c_kv and k_pe and up-projects every cached position "
                         "after the cache returns them, so its cache must return tensors, not store and attend "
                         "as FP4Cache does (docs/design.md, \"Latent (MLA) cache\")")
    layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
    if calibration:
        method, options = KVCacheOptions.parse(recipe)
        kv = get_kv_recipe(options.kv_recipe(table_format(method)))
        kept = {"k_mean": options.smooth_k, "k_channel_scale": options.channel_scale_k,
                "k_scale": kv.k.has_global_scale, "v_scale": kv.v.has_global_scale}
        check_calibration(calibration, len(layer_types), [name for name, keeps in kept.items() if keeps])
    layers = []
    for index, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
        if layer_type not in ("full_attention", "sliding_attention"):
            raise ValueError(f"config: layer {index} is {layer_type!r}; FP4Cache supports full_attention "
                             "and sliding_attention layers")
        layers.append(FP4CacheLayer(recipe, max_cache_len, kwargs.get("sliding_window"),
                                    calibration=calibration, layer_idx=index))
    return layers


class FP4Cache(Cache):
    """An FP4 KV cache for a transformers model loaded with `attn_implementation="fp4kv"`.

    `FP4Cache(model.config, max_cache_len, recipe)`: like `StaticCache(config, max_cache_len)`,
    `max_cache_len` counts every position, left padding included; sliding-window layers hold
    only their window. `recipe` names a method of the registry (`get_fp4_kv_cache_quant_method`)
    whose layers come from the format table, optionally followed by its options
    (`"nvfp4+rot+smooth+k8+sink4+recent128"`: `KVCacheOptions`' grammar, the eval's). Beam
    search is not supported, nor Multi-head Latent Attention models (DeepSeek-V2/V3: docs/design.md,
    "Latent (MLA) cache"). (An engine keeps its pool in `torch_fp4kv.FP4KVPool` instead.)

    Accuracy options, spelled in `recipe` or as keywords (None: as `recipe` spells it, off by
    default; a keyword that contradicts `recipe` is a ValueError): `rotate=True` keeps K/V
    Hadamard-rotated, `smooth_k=True` subtracts a per-channel K mean, `channel_scale_k=True` (with
    smooth_k) divides each K channel by a calibrated scale and multiplies queries by it,
    `k_fp8=True` keeps K in FP8 E4M3 (V in the recipe); `calibration` is a state dict from
    `torch_fp4kv.hf.calibrate` with the same options (K means, channel scales, global scales;
    without it the means are zero and the scales 1).
    `sink_tokens` S and `recent_tokens` R: each sequence's first S and last R positions are
    attended in full precision (the states' dtype) from per-sequence buffers allocated with the
    cache, the rest from FP4 (module docstring: how, and on sliding layers). `recipe` and
    `options` then hold the whole spelling and the options.

    Past `max_cache_len`: outside `torch.compile`, an update that would take the cache past
    `max_cache_len` positions raises a ValueError before anything is written (the count is read on
    the host: one sync per step, on layer 0). A compiled step cannot check without a host sync or
    a graph break, so there the overflow is defined instead: a full-attention layer keeps each
    sequence's first `max_cache_len` real positions and drops the later ones (not stored, and not
    attended by any query, its own included), so every later query attends those first positions
    (sinks and recent ring included, the ring then holding the last positions kept); nothing is
    overwritten. Sliding layers keep their ring of the last `window` positions, as always.
    `get_seq_length()` keeps counting, so `int(cache.get_seq_length()) > max_cache_len` after a
    compiled loop tells that positions were dropped.
    """

    def __init__(self, config, max_cache_len: int, recipe: str = "nvfp4", *, rotate: bool | None = None,
                 smooth_k: bool | None = None, channel_scale_k: bool | None = None, k_fp8: bool | None = None,
                 calibration: dict | None = None, sink_tokens: int | None = None, recent_tokens: int | None = None):
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
        method, self.options = KVCacheOptions.resolve(recipe, rotate=rotate, smooth_k=smooth_k,
                                                      channel_scale_k=channel_scale_k, k_fp8=k_fp8,
                                                      sink_tokens=sink_tokens, recent_tokens=recent_tokens)
        table_format(method)  # checks that its layer caches come from the format table
        self.recipe = self.options.spell(method)
        text_config = config.get_text_config(decoder=True)
        if text_config._attn_implementation != ATTENTION_NAME:
            raise ValueError(f"config: the model must run attn_implementation={ATTENTION_NAME!r} (import "
                             f"torch_fp4kv.hf, then load it with that argument or call "
                             f"model.set_attn_implementation({ATTENTION_NAME!r})); it runs "
                             f"{text_config._attn_implementation!r}")
        super().__init__(layers=_fp4_layers(text_config, max_cache_len, self.recipe, calibration))

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
                   dtype: torch.dtype = torch.bfloat16, *, k_fp8: bool | None = None, sink_tokens: int | None = None,
                   recent_tokens: int | None = None) -> dict[str, int]:
    """K/V bytes of an FP4Cache of `recipe` (options spelled in it or as keywords, as FP4Cache
    takes them: K in FP8 with k8, the full-precision sinks and ring in `dtype`) and of
    transformers' StaticCache in `dtype` for the same model, batch and length, both allocated on
    the meta device (nothing is really allocated)."""
    method, options = KVCacheOptions.resolve(recipe, k_fp8=k_fp8, sink_tokens=sink_tokens,
                                             recent_tokens=recent_tokens)
    text_config = config.get_text_config(decoder=True)
    heads, head_dim = text_config.num_key_value_heads, text_config.head_dim
    static = StaticCache(config=text_config, max_cache_len=max_cache_len)
    static.early_initialization(batch_size, heads, head_dim, dtype, torch.device("meta"))
    fp4 = Cache(layers=_fp4_layers(text_config, max_cache_len, options.spell(method)))
    fp4.early_initialization(batch_size, heads, head_dim, dtype, torch.device("meta"))
    static_bytes = sum(t.numel() * t.element_size() for layer in static.layers for t in (layer.keys, layer.values))
    return {"fp4": sum(layer.kv_bytes() for layer in fp4.layers), "static": static_bytes}
