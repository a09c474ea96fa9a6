"""Which tokens of a store reach the cache: the slot rule every backend applies.

Engines hand `quantize_and_store` slot indices they made themselves: `-1` padding from CUDA-graph
batch sizes, and now and then the same slot twice in one call (a retried token, a recycled slot).
The rule: a slot outside `[0, num_slots)` is skipped, and when several tokens name one slot the
**last** of them wins, whole (its data and scale bytes together), so no two writes race on one
cache row. This module is the rule in PyTorch (the eager backend's); the Triton kernels apply the
same rule in the quantize kernel (triton_kernels, `DUPLICATES`).

Sync-free and O(T): a scratch row per cache slot is allocated but never cleared; only the slots
named in `loc` are touched (set to -1, then raised to the largest token index naming them).
"""

from __future__ import annotations

import torch


def in_cache(loc: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Which entries of `loc` name a slot of a cache with `num_slots` slots."""
    return (loc >= 0) & (loc < num_slots)


def last_writer_slots(loc: torch.Tensor, num_slots: int) -> torch.Tensor:
    """`loc` (any integer dtype and stride) -> contiguous int64 slots where every token that does not
    reach the cache (out of range, or overwritten by a later token with the same slot) holds -1."""
    valid = in_cache(loc, num_slots)
    # Tokens out of range share one extra scratch row, so every index below stays in bounds.
    row = torch.where(valid, loc, num_slots).long()
    token = torch.arange(loc.shape[0], dtype=torch.int32, device=loc.device)
    last_token = torch.empty(num_slots + 1, dtype=torch.int32, device=loc.device)
    last_token.index_fill_(0, row, -1)
    last_token.scatter_reduce_(0, row, token, reduce="amax")
    wins = valid & (last_token[row] == token)
    return torch.where(wins, loc.long(), -1)
