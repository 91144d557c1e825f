"""Data parallelism under ``torchrun``: rank-aware seeds, reduced metrics, one writer.

SPD scales out like the reference: every process holds the whole target and the whole
decomposition, draws its own batch and its own masks (seeded per rank, so the masks
differ), and PyTorch's DistributedDataParallel averages the gradients. Logged metrics are
averaged over ranks; only rank 0 writes checkpoints. Without an initialised process group
every helper degrades to the single-process case.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch import distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def stream_seed(seed: int, stream: int, rank: int = 0) -> int:
    """A distinct seed per (run seed, random stream, rank): data and masks differ per rank."""
    return (seed * 1_000_003 + stream * 7_919 + rank * 104_729 + 1) % (2 ** 63 - 1)


def generator(seed: int, stream: int, rank: int | None = None) -> torch.Generator:
    rank = world()[0] if rank is None else rank
    return torch.Generator().manual_seed(stream_seed(seed, stream, rank))


def mean_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """Average scalar metrics over all ranks (every rank gets the same numbers)."""
    if world()[1] == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= world()[1]
    return dict(zip(keys, t.tolist()))


def wrap(module: nn.Module) -> nn.Module:
    """``DistributedDataParallel(module)`` when distributed (it broadcasts rank 0's parameters)."""
    if world()[1] == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module)
