"""One process's place in a tensor-parallel group (torch.distributed), and the two things a
Megatron-style split needs from it: its equal share of heads or units, and the all-reduce that adds
the row-parallel projections' partial sums."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    """Rank `rank` of `world_size`, collectives on `group` (None: the default process group).
    The default is one process and no collectives: the single-process model."""

    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None

    def __post_init__(self):
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")

    @classmethod
    def from_process_group(cls, group: dist.ProcessGroup | None = None) -> TensorParallel:
        """This process in an initialised torch.distributed group (default: the whole world)."""
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    def local(self, count: int, name: str) -> int:
        """This rank's share of `count` heads or units. They must split evenly: every rank runs the
        same shapes, and its heads are a contiguous block."""
        if count % self.world_size:
            raise ValueError(f"{name} ({count}) must be divisible by the tensor-parallel world size "
                             f"({self.world_size})")
        return count // self.world_size

    def shard(self, x: torch.Tensor, dim: int, count: int, name: str) -> torch.Tensor:
        """This rank's block of x along `dim`, which holds `count` equal parts (heads or units)."""
        local = self.local(count, name)
        size = x.shape[dim] // count
        return x.narrow(dim, self.rank * local * size, local * size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place: a row-parallel projection's partial sums."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x
