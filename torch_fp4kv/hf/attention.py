"""The "fp4kv" attention implementation, registered with transformers' AttentionInterface: what
runs a model over an `FP4Cache` (the eval's cache-free simulation is simulate.py, calibration
calibration.py).

With an `FP4Cache` the keys and values it receives are `FP4KVChunk`s, and the cache layer stores
and attends (decode reads FP4 with `fp4kv.decode_attention`). Without a cache (`use_cache=False`)
it is plain causal attention over the chunk.

Masks: transformers builds 4D masks over cache positions, which this cache does not use (padding
is never stored, sliding layers are rings). The mask function registered for "fp4kv" hands the
attention only which of the new tokens are real, `[B, T]` bool; the cache remembers the rest. So a
2D attention mask in a decode step needs only its last columns, and may be left out.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .cache import ATTENTION_NAME, FP4KVChunk
from .positional import positional_attention


def new_tokens_mask(batch_size: int, q_length: int, *args, attention_mask=None, **kwargs):
    """The "fp4kv" mask: which of the `q_length` new tokens are real ([B, q_length] bool), from the
    2D padding mask's last columns; None when there is no mask (every token is real)."""
    if attention_mask is None:
        return None
    return attention_mask[:, -q_length:].to(torch.bool)


def fp4kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    sliding_window=None, softcap=None, **kwargs):
    """transformers attention signature: query [B, Hq, T, D]; returns ([B, T, Hq, D], None)."""
    if dropout:
        raise ValueError(f"dropout: the fp4kv attention is for inference; got {dropout}")
    if softcap is not None:
        raise ValueError("softcap: attention logit soft-capping is not supported by fp4kv.decode_attention")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: the fp4kv attention takes a 2D padding mask; got shape "
                         f"{tuple(attention_mask.shape)}")
    scaling = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
    if isinstance(key, FP4KVChunk):
        out = key.layer.attend(query, key.states, value.states, attention_mask, scaling)
    elif key.shape[-2] != query.shape[-2]:
        raise TypeError(f"the fp4kv attention needs an FP4Cache or no cache (use_cache=False); got "
                        f"{key.shape[-2]} keys for {query.shape[-2]} queries, as from a cache of full-precision keys")
    else:
        real = attention_mask
        if real is None:
            real = torch.ones(query.shape[0], query.shape[2], dtype=torch.bool, device=query.device)
        positions = real.cumsum(1) - 1
        out = positional_attention(query, key, value, positions, real, positions, real, scaling, sliding_window)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make attn_implementation="fp4kv" available (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, fp4kv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, new_tokens_mask)
