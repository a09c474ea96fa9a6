"""One layer's FP4 K/V cache as an `nn.Module`, the owner of its tensors: the op calls that store,
read and attend over it, and `FP4KVPoolLayer.allocate`, the one place a layer cache is built.

Its tensors are module buffers with fixed addresses, which is what torch.compile's CUDA-graph
trees need to replay decode steps without copying the cache. The strategies (methods.py), the
engine pool (pool.py), transformers' FP4Cache layers (hf/cache.py) and the eval's simulation
(hf/simulate.py) all go through it.

Three optional accuracy transforms run in PyTorch around the ops, so every backend honours them:

- rotation (QuaRot-style): K and V are stored as `k @ R`, `v @ R` with R the normalized Hadamard
  matrix (orthogonal and symmetric, R^-1 = R). It spreads outliers over the head's channels before
  the block scales see them. Decode rotates q the same way (q R (k R)^T = q k^T) and rotates the
  output back; reads rotate back.
- K smoothing: a calibrated per-head, per-channel mean `k_mean` [H, D] is subtracted from K before
  storing. Attention needs no correction (q·(k - μ) = q·k - q·μ, a constant over positions, which
  softmax cancels); reads add μ back.
- K channel scales (SmoothAttention, with the mean): a calibrated per-head, per-channel scale
  `k_channel_scale` λ [H, D] divides each K channel after the mean, before the rotation, and
  attention multiplies q by it first (λq·(k - μ)/λ = q·(k - μ)): the channels that queries weigh
  least take the coarsest rounding. Reads multiply λ back.

The transforms cast, broadcast and multiply, so they would accept what the ops reject (int keys,
one head for H, a float32 `out` for bf16 q) or fail with torch's own errors. Every call therefore
runs the op's argument check on the arguments as given before transforming them.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .ops import checks
from .ops.eager import cast_output
from .ops.api import attention_defaults, decode_attention_paged, extend_attention_paged, quantize_and_store_args
from .ops.paged_kv import PagedKV
from .options import KVCacheOptions


def hadamard(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The normalized n x n Hadamard matrix (Sylvester's construction; n a power of two): H H = I.

    Sylvester's doubling in torch rather than scipy.linalg.hadamard (the same construction, in
    numpy): no new dependency, and the matrix is built on the cache's device."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"rotation needs a head_dim that is a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / n ** 0.5).to(dtype=dtype, device=device)


class DeviceOnlyBuffers(nn.Module):
    """A module whose buffers named in `DEVICE_ONLY` follow `.to(device)` but keep their dtype:
    Module.to(dtype) casts every floating buffer, and the ops need these in the dtype they have."""

    DEVICE_ONLY: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name) for name in self.DEVICE_ONLY}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            if original is not None:
                setattr(self, name, original.to(fn(original).device))
        return self


class FP4KVPoolLayer(DeviceOnlyBuffers):
    """One layer of an engine's FP4 KV pool: data [slots, H, D/2], scales [slots, H, D/block] (FP8
    keys, recipe "<recipe>+k8": [slots, H, D] and [slots, H, 0]), global scales, and optionally a
    rotation [D, D], a K mean [H, D] and K channel scales [H, D] (float32). `recipe` is a
    KV_RECIPES name. Build one with `allocate`. (transformers' per-layer cache,
    `hf.FP4CacheLayer`, keeps its FP4 slots in one.)

    `FP4KVLayerCache` is this class's former name, kept as an alias for one release."""

    # The ops need the global scales in float32, and rounding them (or the rotation, mean, scales) to
    # bf16 would change the cache's values.
    DEVICE_ONLY = ("k_global_scale", "v_global_scale", "rotation", "k_mean", "k_channel_scale")

    def __init__(self, recipe: str, k_data, v_data, k_scales, v_scales, k_global_scale=None, v_global_scale=None,
                 rotation=None, k_mean=None, k_channel_scale=None):
        super().__init__()
        self.recipe = recipe
        kv_recipe = ops.get_kv_recipe(recipe)
        self.k_recipe, self.v_recipe = kv_recipe.k.name, kv_recipe.v.name  # what the one-tensor ops take
        for name, tensor in (("k_data", k_data), ("v_data", v_data), ("k_scales", k_scales), ("v_scales", v_scales),
                             ("k_global_scale", k_global_scale), ("v_global_scale", v_global_scale),
                             ("rotation", rotation), ("k_mean", k_mean), ("k_channel_scale", k_channel_scale)):
            self.register_buffer(name, tensor)

    @staticmethod
    def kv_recipe_of(fmt: str, options: KVCacheOptions, heads: int, head_dim: int) -> ops.KVRecipe:
        """The K/V recipe of a layer cache of `heads` x `head_dim` in FP4 format `fmt` with `options`,
        every size checked (ValueErrors naming them)."""
        if options.full_precision:
            raise ValueError(f"options: a layer cache keeps every token in FP4; sink_tokens / recent_tokens "
                             f"are FP4Cache's (got {options})")
        for name, value in (("heads", heads), ("head_dim", head_dim)):
            checks.check_count(value, name, minimum=1)
        kv_recipe = ops.get_kv_recipe(options.kv_recipe(ops.get_format(fmt, "fmt").name))
        for part in (kv_recipe.k, kv_recipe.v):
            checks.check_head_dim(head_dim, part, "head_dim")
        if options.rotate and head_dim & (head_dim - 1):
            raise ValueError(f"head_dim must be a power of two with rotate=True; got {head_dim}")
        return kv_recipe

    @classmethod
    def allocate(cls, fmt: str, options: KVCacheOptions, slots: int, heads: int, head_dim: int,
                 device=None) -> FP4KVPoolLayer:
        """A zeroed cache of `slots` token slots for FP4 format `fmt` with `options` (rotate,
        smooth_k, channel_scale_k, k_fp8): global scales 1, K mean 0 and K channel scales 1 until
        calibrated. Every size is checked here."""
        checks.check_count(slots, "slots", minimum=1)
        kv_recipe = cls.kv_recipe_of(fmt, options, heads, head_dim)

        def zeros(width: int) -> torch.Tensor:
            return torch.zeros(slots, heads, width, dtype=torch.uint8, device=device)

        def global_scale(part: ops.FP4Format) -> torch.Tensor | None:
            return torch.ones(1, dtype=torch.float32, device=device) if part.has_global_scale else None

        k, v = kv_recipe.k, kv_recipe.v
        return cls(kv_recipe.name, zeros(k.data_width(head_dim)), zeros(v.data_width(head_dim)),
                   zeros(k.scales_width(head_dim)), zeros(v.scales_width(head_dim)), global_scale(k), global_scale(v),
                   hadamard(head_dim, device=device) if options.rotate else None,
                   torch.zeros(heads, head_dim, device=device) if options.smooth_k else None,
                   torch.ones(heads, head_dim, device=device) if options.channel_scale_k else None)

    @property
    def transformed(self) -> bool:
        return any(x is not None for x in (self.rotation, self.k_mean, self.k_channel_scale))

    # ---- the transforms, on [..., H, D] (float32 out) ----

    def encode_k(self, k: torch.Tensor) -> torch.Tensor:
        """What is quantized for keys [..., H, D]: ((k - k_mean) / k_channel_scale) @ rotation."""
        x = k.float()
        if self.k_mean is not None:
            x = x - self.k_mean
        if self.k_channel_scale is not None:
            x = x / self.k_channel_scale
        return x @ self.rotation if self.rotation is not None else x

    def restore_k(self, k: torch.Tensor) -> torch.Tensor:
        """Keys as given back from what was quantized (encode_k undone):
        (k @ rotation) * k_channel_scale + k_mean."""
        x = k.float()
        if self.rotation is not None:
            x = x @ self.rotation  # symmetric and orthogonal: its own inverse
        if self.k_channel_scale is not None:
            x = x * self.k_channel_scale
        return x + self.k_mean if self.k_mean is not None else x

    def encode_v(self, v: torch.Tensor) -> torch.Tensor:
        """What is quantized for values [..., H, D]: v @ rotation."""
        return v.float() @ self.rotation if self.rotation is not None else v

    restore_v = encode_v  # the rotation is an involution
    # Former names, kept as aliases for one release.
    decode_k = restore_k
    decode_v = restore_v

    def check_tokens(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [..., H, D] of this cache's heads and head_dim, on its device (the ops' activation
        checks against the cache, for calls that take tokens without slots)."""
        kv_recipe = ops.get_kv_recipe(self.recipe)
        checks.check_cache_tokens(k, "k", self.k_data, "k_data", kv_recipe.k)
        checks.check_cache_tokens(v, "v", self.v_data, "v_data", kv_recipe.v)

    def _rotated(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] times the rotation, in x's dtype (the rotation is its own inverse)."""
        return (x.float() @ self.rotation).to(x.dtype)

    @property
    def _transforms_q(self) -> bool:
        return self.rotation is not None or self.k_channel_scale is not None

    def _encode_q(self, q: torch.Tensor) -> torch.Tensor:
        """Queries [..., Hq, D] as they meet the stored keys, in q's dtype: each KV head's channel
        scales multiplied in (its group of query heads), then rotated; one rounding to q's dtype."""
        x = q.float()
        if self.k_channel_scale is not None:
            hkv = self.k_channel_scale.shape[0]
            x = (x.unflatten(-2, (hkv, -1)) * self.k_channel_scale[:, None]).flatten(-3, -2)
        return (x @ self.rotation if self.rotation is not None else x).to(q.dtype)

    def _restore_out(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output over the stored V, back in V's coordinates (the rotation undone)."""
        return self._rotated(out) if self.rotation is not None else out

    def _paged(self, block_table, seq_lens, page_size) -> PagedKV:
        """This layer's buffers as the paged cache that the attention ops and their checks take."""
        return PagedKV(self.k_data, self.k_scales, self.v_data, self.v_scales, block_table, seq_lens, page_size,
                       self.k_global_scale, self.v_global_scale)

    def _store_args(self, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """ops.quantize_and_store's arguments for tokens k, v at slots loc into this layer's buffers."""
        return (self.k_data, self.k_scales, self.v_data, self.v_scales, loc, k, v, self.recipe, self.k_global_scale,
                self.v_global_scale)

    # ---- the ops ----

    def store(self, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize k, v [T, H, D] into slots loc [T]."""
        if self.transformed:
            quantize_and_store_args(*self._store_args(loc, k, v))
            k, v = self.encode_k(k), self.encode_v(v).float()
        ops.quantize_and_store(*self._store_args(loc, k, v))

    def read(self, loc: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots loc [T] as (k, v) [T, H, D] in dtype."""
        raw = dtype
        if self.transformed:  # read in float32, cast to dtype after decoding
            checks.check_output_dtype(dtype)
            raw = torch.float32
        k = ops.gather_dequantize(self.k_data, self.k_scales, loc, self.k_recipe, self.k_global_scale, raw)
        v = ops.gather_dequantize(self.v_data, self.v_scales, loc, self.v_recipe, self.v_global_scale, raw)
        if self.transformed:  # saturating, as the ops' own outputs (eager.cast_output)
            k, v = cast_output(self.restore_k(k), dtype), cast_output(self.restore_v(v), dtype)
        return k, v

    def roundtrip(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [..., H, D] as this cache would give them back (quantized and dequantized, no slots)."""
        self.check_tokens(k, v)
        out = []
        for x, encode, restore, g, recipe in ((k, self.encode_k, self.restore_k, self.k_global_scale, self.k_recipe),
                                              (v, self.encode_v, self.restore_v, self.v_global_scale, self.v_recipe)):
            data, scales = ops.quantize(encode(x), recipe, g)
            out.append(cast_output(restore(ops.dequantize(data, scales, recipe, g, torch.float32)), x.dtype))
        return out[0], out[1]

    def decode_attention(self, q, block_table, seq_lens, page_size: int, sm_scale: float | None = None, out=None,
                         lse=None):
        """Attention of one new token per sequence, q [B, Hq, D], over its paged context read in FP4.

        `lse` [B, Hq] float32, when given, receives the natural log-sum-exp of the scores of the
        keys as given (`fp4kv.decode_attention`'s), so the result merges with attention over other
        keys. q goes in with the K channel scales multiplied in and rotated (`_encode_q`). Softmax
        alone cancels a K mean (q·(k - μ) = q·k - q·μ for every position), the log-sum-exp does
        not: it gets sm_scale · q·μ back."""
        sm_scale, out = attention_defaults(q, sm_scale, out)
        paged = self._paged(block_table, seq_lens, page_size)
        checks.check_decode_attention_args(out, q, paged, self.recipe, sm_scale, lse)
        if not self._transforms_q:
            decode_attention_paged(q, paged, self.recipe, sm_scale, out, lse)
        else:
            out.copy_(self._restore_out(decode_attention_paged(self._encode_q(q), paged, self.recipe, sm_scale, None,
                                                               lse)))
        if lse is not None and self.k_mean is not None:
            batch, hq, d = q.shape
            hkv = self.k_mean.shape[0]
            q_mean = torch.einsum("bgrd,gd->bgr", q.float().view(batch, hkv, hq // hkv, d), self.k_mean)
            lse.add_(sm_scale * q_mean.reshape(batch, hq))
        return out

    def extend_attention(self, q, cu_seqlens_q, block_table, seq_lens, page_size: int, sm_scale: float | None = None,
                         out=None):
        """Attention of several new tokens per sequence, q [T, Hq, D] (rows cu_seqlens_q[b] to
        cu_seqlens_q[b + 1]), stored in the cache already, causal over them, reading the cache in FP4.
        q goes in as in decode_attention; a K mean needs nothing here: softmax cancels q·k_mean."""
        sm_scale, out = attention_defaults(q, sm_scale, out)
        paged = self._paged(block_table, seq_lens, page_size)
        checks.check_extend_attention_args(out, q, cu_seqlens_q, paged, self.recipe, sm_scale)
        if not self._transforms_q:
            return extend_attention_paged(q, cu_seqlens_q, paged, self.recipe, sm_scale, out)
        return out.copy_(self._restore_out(extend_attention_paged(self._encode_q(q), cu_seqlens_q, paged, self.recipe,
                                                                  sm_scale)))

    # Former names, kept as aliases for one release.
    decode = decode_attention
    extend = extend_attention


FP4KVLayerCache = FP4KVPoolLayer  # former name, kept as an alias for one release
