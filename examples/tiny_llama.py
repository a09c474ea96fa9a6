"""A small Llama-style decoder (RMSNorm, RoPE, GQA attention, SwiGLU) with a pluggable KV cache,
written plainly so the cache calls stand out. Random weights: it is a shape-faithful workload."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import torch_fp4kv


@dataclass
class Config:
    vocab_size: int = 1024
    dim: int = 512
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 64
    max_seq_len: int = 256
    max_batch: int = 4


class BF16KVCache(nn.Module):
    """The baseline: K/V stored as they are, same store/read interface as FP4KVLayerCache."""

    def __init__(self, slots: int, heads: int, head_dim: int, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.register_buffer("k", torch.zeros(slots, heads, head_dim, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(slots, heads, head_dim, dtype=dtype, device=device))

    def store(self, loc, k, v):
        self.k.index_copy_(0, loc, k.to(self.k.dtype))
        self.v.index_copy_(0, loc, v.to(self.v.dtype))

    def read(self, loc, dtype=torch.bfloat16):
        return self.k[loc].to(dtype), self.v[loc].to(dtype)


def make_caches(cfg: Config, kind: str, device) -> nn.ModuleList:
    """kind: 'bf16' or an FP4 recipe name. One slot per (sequence, position)."""
    slots = cfg.max_batch * cfg.max_seq_len
    if kind == "bf16":
        return nn.ModuleList(BF16KVCache(slots, cfg.n_kv_heads, cfg.head_dim, device=device) for _ in range(cfg.n_layers))
    cache = torch_fp4kv.FP4KVCache(kind, slots, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers, device=device)
    return cache.layers


def use_fused_decode(model: nn.Module) -> None:
    """Decode steps read the FP4 cache with fp4kv.decode_attention instead of dequantizing it."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_decode = isinstance(module.cache, torch_fp4kv.FP4KVLayerCache)


def kv_cache_bytes(caches: nn.ModuleList) -> int:
    return sum(b.numel() * b.element_size() for b in caches.buffers())


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config, cache: nn.Module):
        super().__init__()
        self.cfg, self.cache = cfg, cache
        self.fused_decode = False  # set by use_fused_decode() on FP4 caches
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, store_loc, read_loc, mask, seq_lens):
        """x [B, T, dim]; store_loc [B*T] slots for the new tokens; read_loc [B*S] every slot of
        each sequence; mask [T, S] which of those a query may see; seq_lens [B] tokens so far."""
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).split([cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim,
                                      cfg.n_kv_heads * cfg.head_dim], dim=-1)
        q = rope(q.view(b, t, cfg.n_heads, cfg.head_dim), cos, sin)
        k = rope(k.view(b, t, cfg.n_kv_heads, cfg.head_dim), cos, sin)
        self.cache.store(store_loc, k.reshape(b * t, cfg.n_kv_heads, cfg.head_dim),
                         v.reshape(b * t, cfg.n_kv_heads, cfg.head_dim))
        if t == 1 and self.fused_decode:  # read the FP4 cache directly, each sequence's slots as its page table
            table = read_loc.view(b, -1).int()
            out = self.cache.decode(q[:, 0], table, seq_lens, page_size=1)
            return self.wo(out.reshape(b, 1, -1))
        keys, values = self.cache.read(read_loc, dtype=x.dtype)
        keys = keys.view(b, -1, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        values = values.view(b, -1, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, cfg: Config, cache: nn.Module):
        super().__init__()
        self.attention = Attention(cfg, cache)
        self.attention_norm = nn.RMSNorm(cfg.dim)
        self.ffn_norm = nn.RMSNorm(cfg.dim)
        hidden = 4 * cfg.dim
        self.w13 = nn.Linear(cfg.dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x, cos, sin, store_loc, read_loc, mask, seq_lens):
        x = x + self.attention(self.attention_norm(x), cos, sin, store_loc, read_loc, mask, seq_lens)
        gate, up = self.w13(self.ffn_norm(x)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


class Transformer(nn.Module):
    def __init__(self, cfg: Config, caches: nn.ModuleList):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, cache) for cache in caches)
        self.norm = nn.RMSNorm(cfg.dim)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        freqs = 1.0 / (10000 ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
        angles = torch.outer(torch.arange(cfg.max_seq_len).float(), freqs)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.register_buffer("positions", torch.arange(cfg.max_seq_len), persistent=False)

    def forward(self, tokens: torch.Tensor, start_pos: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] at positions start_pos + [0, T) (start_pos: int64 tensor [1]) -> logits [B, T, V]."""
        cfg = self.cfg
        b, t = tokens.shape
        pos = start_pos + self.positions[:t]
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        seq_base = (torch.arange(b, device=tokens.device) * cfg.max_seq_len)[:, None]
        store_loc = (seq_base + pos[None, :]).reshape(-1)
        read_loc = (seq_base + self.positions[None, :]).reshape(-1)
        mask = self.positions[None, :] <= pos[:, None]  # causal, over the whole fixed-size window
        seq_lens = (start_pos + t).int().expand(b)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin, store_loc, read_loc, mask, seq_lens)
        return self.output(self.norm(x))
