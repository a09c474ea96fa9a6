"""Attention over tokens identified by their position in their own sequence, padding excluded.

The FP4 cache stores only real tokens (left padding never gets a slot) and keeps sliding-window
layers as rings, so a key's slot says nothing about its position. Each query and key therefore
carries its position explicitly: a query sees the real keys at positions <= its own, and with a
window only the last `window` of them (transformers' rule: query - key < window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.eager import masked_attention


def positional_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         query_pos: torch.Tensor, query_real: torch.Tensor,
                         key_pos: torch.Tensor, key_real: torch.Tensor,
                         scaling: float, window: int | None = None) -> torch.Tensor:
    """query [B, Hq, T, D], key/value [B, Hkv, S, D] (Hq a multiple of Hkv); positions [B, T] / [B, S]
    (int), real flags [B, T] / [B, S] (bool). Returns [B, Hq, T, D]; padded queries get zeros.

    A padded query may see no key at all, which SDPA turns into NaN, so it is let see every key and
    its output is replaced by zeros afterwards. A real query always sees at least itself.

    Whatever an entry a query does not see holds (a stale NaN of a reused cache) never reaches it,
    as in ops.eager.masked_attention: SDPA adds its mask to the scores, and NaN + -inf is NaN, so
    it gets keys and values with their non-finite entries zeroed, and a query that sees one gets
    NaN where IEEE arithmetic puts it (a key: the whole row; a value: its dimensions)."""
    visible = key_real[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])
    if window is not None:
        visible &= query_pos[:, :, None] - key_pos[:, None, :] < window
    key_finite, value_finite = torch.isfinite(key), torch.isfinite(value)
    seen = visible[:, None].to(value.dtype)  # [B, 1, T, S]
    reached = (seen @ (~value_finite).to(value.dtype) + seen @ (~key_finite.all(-1, keepdim=True)).to(value.dtype)) > 0
    group = query.shape[1] // key.shape[1]
    visible |= ~query_real[:, :, None]
    out = F.scaled_dot_product_attention(query, torch.where(key_finite, key, 0).to(query.dtype),
                                         torch.where(value_finite, value, 0).to(query.dtype),
                                         attn_mask=visible[:, None], scale=scaling, enable_gqa=group != 1)
    out = torch.where(reached.repeat_interleave(group, 1), float("nan"), out)
    return torch.where(query_real[:, None, :, None], out, 0.0)


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor,
                       scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per sequence, query [B, Hq, D], over key/value [B, Hkv, N, D] where visible
    [B, N]: (out [B, Hq, D] float32, lse [B, Hq] float32), lse the natural log-sum-exp of the scaled
    scores, fp4kv.decode_attention's convention (-inf, and zeros out, where nothing is visible)."""
    batch, hq, d = query.shape
    hkv = key.shape[1]
    q = query.float().view(batch, hkv, hq // hkv, d)
    scores = torch.einsum("bgrd,bgnd->bgrn", q, key.float()) * scaling
    out, lse = masked_attention(scores, visible[:, None, None, :], value.float())
    return out.reshape(batch, hq, d), lse.reshape(batch, hq)


def merge_attention(first: tuple[torch.Tensor, torch.Tensor],
                    second: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Two attentions (out [B, Hq, D], lse [B, Hq]) of one query over disjoint sets of keys -> the
    attention over their union (float32): each output weighted by its share of the total softmax
    mass, exp(lse_i - logaddexp(lse_1, lse_2)); zeros where neither set had a key."""
    (out_1, lse_1), (out_2, lse_2) = first, second
    total = torch.logaddexp(lse_1, lse_2)
    seen = total > float("-inf")
    w_1 = torch.where(seen, torch.exp(lse_1 - total), 0.0)
    w_2 = torch.where(seen, torch.exp(lse_2 - total), 0.0)
    return out_1.float() * w_1[..., None] + out_2.float() * w_2[..., None]
