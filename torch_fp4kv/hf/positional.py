"""Attention over tokens identified by their position in their own sequence, padding excluded.

The FP4 cache stores only real tokens (left padding never gets a slot) and keeps sliding-window
layers as rings, so a key's slot says nothing about its position. Each query and key therefore
carries its position explicitly: a query sees the real keys at positions <= its own, and with a
window only the last `window` of them (transformers' rule: query - key < window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def positional_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         query_pos: torch.Tensor, query_real: torch.Tensor,
                         key_pos: torch.Tensor, key_real: torch.Tensor,
                         scaling: float, window: int | None = None) -> torch.Tensor:
    """query [B, Hq, T, D], key/value [B, Hkv, S, D] (Hq a multiple of Hkv); positions [B, T] / [B, S]
    (int), real flags [B, T] / [B, S] (bool). Returns [B, Hq, T, D]; padded queries get zeros.

    A padded query may see no key at all, which SDPA turns into NaN, so it is let see every key and
    its (finite) output is zeroed afterwards. A real query always sees at least itself.
    """
    visible = key_real[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])
    if window is not None:
        visible &= query_pos[:, :, None] - key_pos[:, None, :] < window
    visible |= ~query_real[:, :, None]
    out = F.scaled_dot_product_attention(query, key.to(query.dtype), value.to(query.dtype),
                                         attn_mask=visible[:, None], scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out * query_real[:, None, :, None].to(out.dtype)
