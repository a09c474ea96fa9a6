"""A DeepSeek-V3-shaped MLA decode layer with random weights, over a latent FP4 cache.

The layer is attention alone (no norms, no MoE): q through its low-rank projection, the latent
c_kv and the RoPE key k_pe from kv_a, RoPE on q_pe and k_pe, then decode with the up-projections
absorbed: q_nope W_UK per head gives the query in the latent space, mla_decode_attention attends
over the cache, and W_UV per head maps the latent output to the value heads before o_proj.
`reference_attention` runs the same step without absorption (keys and values up-projected from the
dequantized latents) to check the absorbed path against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..mla_methods import LatentLayerCache
from .llama import rope


@dataclass(frozen=True)
class MLAConfig:
    """The attention shapes of a DeepSeek-V3 layer (its defaults) or a tiny one for CPU tests."""

    hidden_size: int = 7168
    num_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0

    @classmethod
    def tiny(cls) -> MLAConfig:
        return cls(hidden_size=64, num_heads=16, q_lora_rank=32, kv_lora_rank=64, qk_nope_head_dim=16,
                   qk_rope_head_dim=16, v_head_dim=16)

    @property
    def sm_scale(self) -> float:
        """DeepSeek's softmax scale: 1/sqrt of the per-head query width before absorption."""
        return (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE on the last axis of x [T, ..., P] at positions [T] (pairs (i, i + P/2), as Llama's)."""
    half = x.shape[-1] // 2
    freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = positions.float()[:, None] * freq  # [T, P/2]
    angle = angle.view(angle.shape[0], *([1] * (x.dim() - 2)), half)
    return rope(x, angle.cos(), angle.sin())


class MLADecodeLayer(nn.Module):
    """One decode step of MLA attention over a paged latent cache: forward(hidden [B, hidden],
    positions [B], loc [B] (each new token's slot; -1 pads), block_table, seq_lens (counting the new
    token), page_size) -> [B, hidden]."""

    def __init__(self, config: MLAConfig, recipe: str, slots: int, dtype=torch.bfloat16, device=None, seed: int = 0):
        super().__init__()
        self.config = c = config
        g = torch.Generator().manual_seed(seed)

        def weight(*shape):
            return nn.Parameter((torch.randn(shape, generator=g) * shape[-2] ** -0.5).to(device, dtype),
                                requires_grad=False)

        self.q_a = weight(c.hidden_size, c.q_lora_rank)
        self.q_b = weight(c.q_lora_rank, c.num_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim))
        self.kv_a = weight(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim)
        self.w_uk = weight(c.num_heads, c.qk_nope_head_dim, c.kv_lora_rank)  # kv_b's key half, per head
        self.w_uv = weight(c.num_heads, c.kv_lora_rank, c.v_head_dim)  # kv_b's value half, per head
        self.o = weight(c.num_heads * c.v_head_dim, c.hidden_size)
        self.cache = LatentLayerCache(recipe, slots, c.kv_lora_rank, c.qk_rope_head_dim, device)

    def project(self, hidden: torch.Tensor, positions: torch.Tensor):
        """(q_nope [B, H, nope], q_pe [B, H, rope], c_kv [B, R], k_pe [B, rope]), RoPE applied;
        c_kv and k_pe are column slices of kv_a's output, as engines store them."""
        c = self.config
        q = ((hidden @ self.q_a) @ self.q_b).view(hidden.shape[0], c.num_heads, -1)
        q_nope, q_pe = q.split((c.qk_nope_head_dim, c.qk_rope_head_dim), -1)
        kv = hidden @ self.kv_a
        c_kv, k_pe = kv[:, : c.kv_lora_rank], kv[:, c.kv_lora_rank:]
        return q_nope, rotary(q_pe, positions, c.rope_theta), c_kv, rotary(k_pe, positions, c.rope_theta)

    def forward(self, hidden, positions, loc, block_table, seq_lens, page_size: int) -> torch.Tensor:
        q_nope, q_pe, c_kv, k_pe = self.project(hidden, positions)
        self.cache.store(loc, c_kv, k_pe)
        q_latent = torch.einsum("bhn,hnr->bhr", q_nope, self.w_uk)
        out, _ = self.cache.decode(torch.cat((q_latent, q_pe), -1), block_table, seq_lens, page_size,
                                   self.config.sm_scale)
        return torch.einsum("bhr,hrv->bhv", out, self.w_uv).flatten(1) @ self.o

    def reference_attention(self, hidden, positions, block_table, seq_lens, page_size: int) -> torch.Tensor:
        """The step's output in float32 without absorption, over the cache as it is (the new token
        stored): per sequence, keys [c_kv W_UK^T, k_pe] and values c_kv W_UV from the dequantized
        latents, softmax attention per head."""
        c = self.config
        q_nope, q_pe, _, _ = self.project(hidden, positions)
        outputs = []
        for b in range(hidden.shape[0]):
            n = int(seq_lens[b])
            slots = (block_table[b].long()[:, None] * page_size + torch.arange(page_size, device=hidden.device))
            c_kv, k_pe = self.cache.gather(slots.flatten()[:n], torch.float32)
            k_nope = torch.einsum("lr,hnr->hln", c_kv, self.w_uk.float())
            v = torch.einsum("lr,hrv->hlv", c_kv, self.w_uv.float())
            scores = (torch.einsum("hn,hln->hl", q_nope[b].float(), k_nope)
                      + torch.einsum("hp,lp->hl", q_pe[b].float(), k_pe)) * c.sm_scale
            outputs.append(torch.einsum("hl,hlv->hv", scores.softmax(-1), v).flatten())
        return torch.stack(outputs) @ self.o.float()
