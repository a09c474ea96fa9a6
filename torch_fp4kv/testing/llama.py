"""A Llama-style decoder (RMSNorm, RoPE, GQA attention, SwiGLU) with a pluggable KV cache, written
plainly (gpt-fast style) so the cache calls stand out. Random weights: a shape-faithful workload.
A layer's cache may also be a `PlannedAttention`, which stores and attends by itself; `swap_caches`
swaps them, so a benchmark times the same layers over other attention kernels and caches.

Tensor parallelism (Megatron's split): given a `TensorParallel` of world size W, a process holds
1/W of the query heads, 1/W of the KV heads (so 1/W of every layer's KV cache) and 1/W of the MLP's
hidden units. The q/k/v and gate/up projections are split by output rows (column-parallel), the
attention-output and down projections by input columns (row-parallel), and each row-parallel
projection's partial sums are added across ranks by one all-reduce. Embedding, norms and the output
layer are replicated. With W = 1 (the default) there are no collectives: the single-process model.
`SimulatedSplit` runs every rank's shard in one process and adds the partial sums itself.
n_heads, n_kv_heads and intermediate_size must divide by W (a ValueError names the one that does
not); engines running more ranks than KV heads replicate KV heads instead, which this model does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import torch_fp4kv

from .tensor_parallel import TensorParallel


@dataclass
class Config:
    vocab_size: int = 1024
    dim: int = 512
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 2048
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    max_batch: int = 4


class BF16KVCache(nn.Module):
    """The baseline: K/V stored as they are, same store/read interface as FP4KVPoolLayer."""

    def __init__(self, slots: int, heads: int, head_dim: int, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.register_buffer("k", torch.zeros(slots, heads, head_dim, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(slots, heads, head_dim, dtype=dtype, device=device))

    def store(self, loc, k, v):
        self.k.index_copy_(0, loc, k.to(self.k.dtype))
        self.v.index_copy_(0, loc, v.to(self.v.dtype))

    def read(self, loc, dtype=torch.bfloat16):
        return self.k[loc].to(dtype), self.v[loc].to(dtype)


class PlannedAttention(nn.Module):
    """A layer's KV cache that stores the new tokens and attends over itself in one call, planned
    beforehand for one step's sequences (their page table and lengths), as FlashInfer's wrappers
    are: the seam through which a benchmark swaps the attention kernel and its cache while the rest
    of the model stays as it is (`swap_caches`). The model's slot layout holds: position p of
    sequence b is slot b * max_seq_len + p.

    forward(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], loc [T]) -> [T, Hq, D]: the step's T = B * t
    new tokens, sequence after sequence, with sm_scale 1/sqrt(D)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def swap_caches(model: Transformer, caches) -> nn.ModuleList:
    """Give layer i of `model` the cache `caches[i]` (a store/read cache or a PlannedAttention);
    returns the caches it held."""
    if len(caches) != len(model.blocks):
        raise ValueError(f"caches must have one cache per layer ({len(model.blocks)}), got {len(caches)}")
    previous = nn.ModuleList(block.attention.cache for block in model.blocks)
    for block, cache in zip(model.blocks, caches):
        block.attention.cache = cache
    return previous


def make_caches(cfg: Config, kind: str, device, tp: TensorParallel = TensorParallel(),
                slots: int | None = None) -> nn.ModuleList:
    """kind: 'bf16' or an FP4 recipe name; this rank's KV heads only. One slot per (sequence,
    position) unless `slots` says otherwise."""
    slots = cfg.max_batch * cfg.max_seq_len if slots is None else slots
    heads = tp.local(cfg.n_kv_heads, "n_kv_heads")
    if kind == "bf16":
        return nn.ModuleList(BF16KVCache(slots, heads, cfg.head_dim, device=device) for _ in range(cfg.n_layers))
    cache = torch_fp4kv.FP4KVPool(kind, slots, heads, cfg.head_dim, cfg.n_layers, device=device)
    return cache.layers


def use_fused_decode(model: nn.Module) -> None:
    """Decode steps read the FP4 cache with fp4kv.decode_attention instead of dequantizing it."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_decode = isinstance(module.cache, torch_fp4kv.FP4KVPoolLayer)


def kv_cache_bytes(caches: nn.ModuleList) -> int:
    return sum(b.numel() * b.element_size() for b in caches.buffers())


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config, cache: nn.Module, tp: TensorParallel):
        super().__init__()
        self.cfg, self.cache, self.tp = cfg, cache, tp
        self.n_heads = tp.local(cfg.n_heads, "n_heads")  # this rank's heads
        self.n_kv_heads = tp.local(cfg.n_kv_heads, "n_kv_heads")
        self.fused_decode = False  # set by use_fused_decode() on FP4 caches
        self.wqkv = nn.Linear(cfg.dim, (self.n_heads + 2 * self.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, store_loc, read_loc, mask, seq_lens):
        """x [B, T, dim]; store_loc [B*T] slots for the new tokens; read_loc [B*S] every slot of
        each sequence; mask [T, S] which of those a query may see; seq_lens [B] tokens so far.
        Returns this rank's partial sum of the output projection (Block adds the ranks' sums)."""
        heads, kv_heads, head_dim = self.n_heads, self.n_kv_heads, self.cfg.head_dim
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q = rope(q.view(b, t, heads, head_dim), cos, sin)
        k = rope(k.view(b, t, kv_heads, head_dim), cos, sin).reshape(b * t, kv_heads, head_dim)
        v = v.reshape(b * t, kv_heads, head_dim)
        if isinstance(self.cache, PlannedAttention):  # it stores and attends by itself
            out = self.cache(q.reshape(b * t, heads, head_dim), k, v, store_loc)
            return self.wo(out.reshape(b, t, -1))
        self.cache.store(store_loc, k, v)
        if t == 1 and self.fused_decode:  # read the FP4 cache directly, each sequence's slots as its page table
            table = read_loc.view(b, -1).int()
            out = self.cache.decode_attention(q[:, 0], table, seq_lens, page_size=1)
            return self.wo(out.reshape(b, 1, -1))
        keys, values = self.cache.read(read_loc, dtype=x.dtype)
        keys = keys.view(b, -1, kv_heads, head_dim).transpose(1, 2)
        values = values.view(b, -1, kv_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, cfg: Config, cache: nn.Module, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.attention = Attention(cfg, cache, tp)
        self.attention_norm = nn.RMSNorm(cfg.dim)
        self.ffn_norm = nn.RMSNorm(cfg.dim)
        hidden = tp.local(cfg.intermediate_size, "intermediate_size")
        self.w13 = nn.Linear(cfg.dim, 2 * hidden, bias=False)  # gate rows, then up rows
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)

    def mlp(self, x):
        """This rank's partial sum of the down projection."""
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)

    def forward(self, x, cos, sin, store_loc, read_loc, mask, seq_lens):
        attention = self.attention(self.attention_norm(x), cos, sin, store_loc, read_loc, mask, seq_lens)
        x = x + self.tp.all_reduce(attention)
        return x + self.tp.all_reduce(self.mlp(self.ffn_norm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: Config, caches: nn.ModuleList, tp: TensorParallel = TensorParallel()):
        super().__init__()
        if cfg.n_heads % cfg.n_kv_heads:
            raise ValueError(f"n_heads ({cfg.n_heads}) must be a multiple of n_kv_heads ({cfg.n_kv_heads})")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, cache, tp) for cache in caches)
        self.norm = nn.RMSNorm(cfg.dim)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
        angles = torch.outer(torch.arange(cfg.max_seq_len).float(), freqs)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.register_buffer("positions", torch.arange(cfg.max_seq_len), persistent=False)

    def forward(self, tokens: torch.Tensor, start_pos: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] at positions start_pos + [0, T) (start_pos: int64 tensor [1]) -> logits [B, T, V]."""
        inputs = self.block_inputs(tokens, start_pos)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, *inputs)
        return self.output(self.norm(x))

    def block_inputs(self, tokens: torch.Tensor, start_pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What every block takes besides x: cos, sin, store_loc, read_loc, mask, seq_lens."""
        cfg = self.cfg
        b, t = tokens.shape
        pos = start_pos + self.positions[:t]
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        seq_base = (torch.arange(b, device=tokens.device) * cfg.max_seq_len)[:, None]
        store_loc = (seq_base + pos[None, :]).reshape(-1)
        read_loc = (seq_base + self.positions[None, :]).reshape(-1)
        mask = self.positions[None, :] <= pos[:, None]  # causal, over the whole fixed-size window
        seq_lens = (start_pos + t).int().expand(b)
        return cos, sin, store_loc, read_loc, mask, seq_lens


class SimulatedSplit(nn.Module):
    """A tensor-parallel run's arithmetic in one process, no collectives: `shards[r]` is rank r's
    Transformer (built with TensorParallel(r, W): its weights, its heads' cache, so the same GEMM
    shapes and kernels as on rank r), the shards run in lockstep, and each row-parallel projection's
    partial sums are added in rank order. With W = 2 that is bit for bit what the all-reduce adds
    (a + b == b + a in floating point); with W > 2 an all-reduce may add in another order (NCCL's
    ring or tree), so equality is then claimed only when the order matches. The embedding, norms and
    output layer are replicated, so shard 0's serve."""

    def __init__(self, shards: list[Transformer]):
        super().__init__()
        self.shards = nn.ModuleList(shards)

    def forward(self, tokens: torch.Tensor, start_pos: torch.Tensor) -> torch.Tensor:
        first = self.shards[0]
        inputs = first.block_inputs(tokens, start_pos)
        x = first.embed(tokens)
        for blocks in zip(*(shard.blocks for shard in self.shards)):
            x = x + _rank_order_sum([block.attention(block.attention_norm(x), *inputs) for block in blocks])
            x = x + _rank_order_sum([block.mlp(block.ffn_norm(x)) for block in blocks])
        return first.output(first.norm(x))


def _rank_order_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def random_weights(cfg: Config, seed: int, dtype: torch.dtype, device="cpu") -> dict[str, torch.Tensor]:
    """Every parameter of the whole (unsplit) model, freshly initialised from `seed` on `device`.
    Every rank that calls this with the same arguments gets the same weights, so none are sent."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(cfg, make_caches(cfg, "bf16", device, slots=0))
    return {name: p.detach().to(dtype) for name, p in model.named_parameters()}


def shard_weights(weights: dict[str, torch.Tensor], cfg: Config, tp: TensorParallel) -> dict[str, torch.Tensor]:
    """The slices of the whole model's `weights` that rank `tp.rank` holds: its heads' rows of each
    of q, k and v, its hidden units' rows of gate and up, the same columns of wo and w2."""
    kv_rows = cfg.n_kv_heads * cfg.head_dim
    shards = {}
    for name, w in weights.items():
        if name.endswith("attention.wqkv.weight"):
            q, k, v = w.split([cfg.n_heads * cfg.head_dim, kv_rows, kv_rows])
            w = torch.cat([tp.shard(q, 0, cfg.n_heads, "n_heads"), tp.shard(k, 0, cfg.n_kv_heads, "n_kv_heads"),
                           tp.shard(v, 0, cfg.n_kv_heads, "n_kv_heads")])
        elif name.endswith("attention.wo.weight"):
            w = tp.shard(w, 1, cfg.n_heads, "n_heads")
        elif name.endswith("w13.weight"):
            gate, up = w.chunk(2)
            w = torch.cat([tp.shard(part, 0, cfg.intermediate_size, "intermediate_size") for part in (gate, up)])
        elif name.endswith("w2.weight"):
            w = tp.shard(w, 1, cfg.intermediate_size, "intermediate_size")
        shards[name] = w.contiguous()
    return shards


def cache_of_rank(caches: nn.ModuleList, tp: TensorParallel) -> list[dict[str, torch.Tensor]]:
    """Each layer's cache buffers as rank `tp.rank` of a tensor-parallel run holds them: buffers
    with a heads axis ([slots, H, ...]) cut to its KV heads, per-layer values (global scales) whole."""
    return [{name: tp.shard(b, 1, b.shape[1], "KV heads") if b.dim() == 3 else b for name, b in layer.named_buffers()}
            for layer in caches]


def load_weights(model: Transformer, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` into every parameter of `model` (its caches keep their own state)."""
    expected = {name for name, _ in model.named_parameters()}
    if set(weights) != expected:
        raise ValueError(f"weights must name every parameter of the model: missing "
                         f"{sorted(expected - set(weights))}, unexpected {sorted(set(weights) - expected)}")
    model.load_state_dict(weights, strict=False)


def build_model(cfg: Config, kind: str, weights: dict[str, torch.Tensor], device, dtype: torch.dtype,
                tp: TensorParallel = TensorParallel()) -> Transformer:
    """The model with this rank's `kind` caches ('bf16' or an FP4 recipe) and `weights` (this
    rank's shard when tp splits it), built on `device` in `dtype`."""
    with torch.device(device):
        model = Transformer(cfg, make_caches(cfg, kind, device, tp), tp).to(dtype)
    load_weights(model, weights)
    return model
