"""Data parallelism under ``torchrun``: one process per rank, collectives over the default group.

Every process holds the whole model being trained (a dictionary, a decomposition) and
trains on its own share of the data; gradients are averaged over processes, and only
process 0 writes checkpoints and logs. Outside ``torchrun`` (no process group) every helper
here is the single-process identity, so training code is written once for both.

Two styles, for two kinds of training step:

- the module-level helpers (:func:`world`, :func:`barrier`, :func:`generator`,
  :func:`mean_over_ranks`, :func:`wrap`), for a step that is one ``forward`` of a module:
  ``DistributedDataParallel`` averages its gradients (SPD);
- :class:`Comm` / :class:`DistComm` (from :func:`init_distributed`), for a step made of
  custom kernels, where the trainer averages gradients itself with one all-reduce of a flat
  buffer and agrees on everything else it decides from the data (SAE training).

On CPU the backend is ``gloo``; on GPUs ``nccl``.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn


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


class Comm:
    """One process: every collective is the identity."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        pass

    def mean_(self, t: Tensor) -> Tensor:
        return t

    def sum_(self, t: Tensor) -> Tensor:
        return t

    def min_(self, t: Tensor) -> Tensor:
        return t

    def any_(self, mask: Tensor) -> Tensor:
        return mask

    def broadcast_(self, t: Tensor, src: int = 0) -> Tensor:
        return t

    def barrier(self) -> None:
        pass


class DistComm(Comm):
    """Collectives over the default ``torch.distributed`` process group."""

    def __init__(self) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistComm needs an initialised process group; call init_distributed() "
                               "under torchrun first (or use Comm() for one process)")
        self.rank, self.world_size = world()

    def average_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one bucket: one collective per step
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def mean_(self, t: Tensor) -> Tensor:
        dist.all_reduce(t)
        return t.div_(self.world_size)

    def sum_(self, t: Tensor) -> Tensor:
        dist.all_reduce(t)
        return t

    def min_(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def any_(self, mask: Tensor) -> Tensor:
        as_int = mask.to(torch.int32)
        dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
        return as_int.bool()

    def broadcast_(self, t: Tensor, src: int = 0) -> Tensor:
        dist.broadcast(t, src)
        return t

    def barrier(self) -> None:
        dist.barrier()


def launched_by_torchrun() -> bool:
    """True inside a process started by ``torchrun`` (it sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(backend: str | None = None) -> Comm:
    """Join the process group torchrun set up and return its :class:`DistComm`.

    Outside torchrun (one process) returns a :class:`Comm`. ``backend`` defaults to
    ``nccl`` when CUDA is available and ``gloo`` otherwise.
    """
    if not launched_by_torchrun():
        return Comm()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
    return DistComm()


def shard(batches: Iterable, comm: Comm) -> Iterable:
    """Every ``world_size``-th item of ``batches``, starting at this process's rank."""
    for i, item in enumerate(batches):
        if i % comm.world_size == comm.rank:
            yield item


def split_rows(batch: Tensor, comm: Comm) -> Tensor:
    """This process's contiguous share of a global batch ``[B, ...]`` (B divisible by the world size)."""
    if batch.shape[0] % comm.world_size:
        raise ValueError(f"a global batch of {batch.shape[0]} rows does not split evenly over "
                         f"{comm.world_size} processes; use a batch size divisible by the world size")
    n = batch.shape[0] // comm.world_size
    return batch[comm.rank * n:(comm.rank + 1) * n]


def finish(comm: Comm) -> None:
    """Leave the process group (no-op for one process)."""
    if isinstance(comm, DistComm) and dist.is_initialized():
        # every rank waits here until rank 0 has written its files: a rank that tears its
        # gloo connections down while the other still talks can abort at exit (seen in CI)
        dist.barrier()
        dist.destroy_process_group()
