"""Pure-PyTorch kernels of the latent-cache (MLA) ops: the reference the Triton ones must match.

A latent cache is two one-head caches, so the MHA rules serve it unchanged: the latent c_kv is
stored and read as a one-head FP4 cache and k_pe as a one-head FP8 E4M3 one (eager.store,
eager.gather_dequantize), under one slot rule (slots.last_writer_slots). Decode attention is MHA
with one KV head whose key is [c_kv, k_pe] and whose value is c_kv itself (eager.masked_attention).
"""

from __future__ import annotations

import torch

from .eager import gather_dequantize, masked_attention, paged_slots, store
from .formats import LatentRecipe
from .paged_latent import PagedLatent
from .slots import last_writer_slots


def mla_store(latent_data, latent_scales, rope_data, loc, c_kv, k_pe, fmt: LatentRecipe, latent_global_scale=None,
              rope_global_scale=None) -> None:
    """Quantize c_kv [T, R] and k_pe [T, P] into the latent cache rows loc [T] (slots rule)."""
    if latent_data.shape[0] == 0:
        return
    slot = last_writer_slots(loc, latent_data.shape[0])
    store(latent_data, latent_scales, slot, c_kv[:, None], fmt.latent, latent_global_scale)
    store(rope_data, rope_data.new_empty((*rope_data.shape[:2], 0)), slot, k_pe[:, None], fmt.rope, rope_global_scale)


def mla_decode_attention(out, lse, q, cache: PagedLatent, fmt: LatentRecipe, sm_scale: float) -> None:
    """One query token per sequence, all Hq heads against the shared latent: gather and dequantize
    keys [c_kv, k_pe] and values c_kv in float32, then masked attention (positions at or past
    seq_lens[b] masked; an empty sequence gets zeros and a log-sum-exp of -inf)."""
    batch, hq, _ = q.shape
    rank = out.shape[2]
    slots = paged_slots(cache.block_table, cache.page_size)  # [B, L]
    length = slots.shape[1]
    flat = slots.reshape(-1)
    latent = gather_dequantize(cache.latent_data, cache.latent_scales, flat, fmt.latent, cache.latent_global_scale,
                               torch.float32).view(batch, length, rank)
    rope = gather_dequantize(cache.rope_data, cache.rope_scales, flat, fmt.rope, cache.rope_global_scale,
                             torch.float32).view(batch, length, -1)
    keys = torch.cat((latent, rope), dim=-1)
    visible = torch.arange(length, device=q.device)[None, :] < cache.seq_lens[:, None].long()  # [B, L]
    scores = torch.einsum("bhd,bld->bhl", q.float(), keys) * sm_scale
    result, result_lse = masked_attention(scores, visible[:, None, :], latent)
    out.copy_(result.to(out.dtype))
    lse.copy_(result_lse)
