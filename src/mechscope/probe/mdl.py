"""The online code: a probe's minimum description length, in bits (Voita & Titov 2020).

Accuracy says whether a label *can* be decoded; the codelength says how much effort it
takes. Transmit the labels of a dataset block by block: the first block with a uniform
code (``n_1 * log2 K`` bits), each later block with the code of a probe trained on all
earlier blocks (``-sum log2 p(y | x)`` bits). Labels that are easy to extract compress
well after a few blocks; random labels cost about the uniform codelength or more.

Block boundaries are the published fractions 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.25, 12.5,
25, 50, 100 % of the (shuffled) data. Every block's code is a probe fitted on all earlier
blocks; its penalty is chosen by validation *log-likelihood* (a code needs calibrated
probabilities, not just the right argmax) on a 20 % part of the earlier blocks once they
hold at least ``min_select`` examples, and is the strongest of the grid before that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from mechscope.probe.linear import (
    ProbeError,
    as_activations,
    encode_labels,
    fit_probe,
    split_indices,
    train_probe,
)

FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.0625, 0.125, 0.25, 0.5, 1.0)
# stronger penalties than a probe's default grid: the first blocks hold a handful of examples
MDL_L2_GRID: tuple[float, ...] = (100.0, 10.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4)


@dataclass
class OnlineCode:
    """Codelengths in bits; ``compression`` = uniform / online (higher = easier to extract)."""

    codelength: float
    uniform_codelength: float
    block_ends: list[int] = field(default_factory=list)
    block_bits: list[float] = field(default_factory=list)  # the first is the uniform block

    @property
    def compression(self) -> float:
        return self.uniform_codelength / self.codelength

    def summary(self) -> dict[str, Any]:
        return {"codelength_bits": self.codelength, "uniform_bits": self.uniform_codelength,
                "compression": self.compression, "block_ends": self.block_ends}


def block_ends(n: int, fractions: Sequence[float] = FRACTIONS) -> list[int]:
    """Cumulative block ends for ``n`` examples (each block non-empty, the last ends at ``n``)."""
    if list(fractions) != sorted(fractions) or fractions[-1] != 1.0 or fractions[0] <= 0:
        raise ProbeError(f"fractions must increase from above 0 to 1.0, got {tuple(fractions)}")
    ends: list[int] = []
    for f in fractions:
        e = max(1, int(round(f * n)))
        if not ends or e > ends[-1]:
            ends.append(e)
    ends[-1] = n
    return ends


def online_codelength(x: Any, labels: Any, *, seed: int = 0, fractions: Sequence[float] = FRACTIONS,
                      l2_grid: Sequence[float] = MDL_L2_GRID, min_select: int = 50,
                      max_iter: int = 300) -> OnlineCode:
    """The online codelength of ``labels`` [n] given activations ``x`` [n, d]."""
    x = as_activations(x)
    y = torch.as_tensor(labels)
    if y.dim() != 1:
        raise ProbeError(f"the online code takes one task's labels [n], got shape {list(y.shape)}")
    _, classes = encode_labels(y, x.shape[0])
    k = classes.numel()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=gen)
    x, y = x[order], y[order]
    ends = block_ends(x.shape[0], fractions)
    if len(ends) < 2:
        raise ProbeError(f"{x.shape[0]} examples make a single block; the online code needs more data")
    bits = [ends[0] * math.log2(k)]
    for start, end in zip(ends[:-1], ends[1:]):
        logp = _block_log_proba(x[:start], y[:start], x[start:end], y[start:end], classes, seed,
                                l2_grid, min_select, max_iter)
        bits.append(float(-logp.sum() / math.log(2)))
    return OnlineCode(sum(bits), x.shape[0] * math.log2(k), ends, bits)


def _block_log_proba(x_tr: Tensor, y_tr: Tensor, x_next: Tensor, y_next: Tensor, classes: Tensor,
                     seed: int, l2_grid: Sequence[float], min_select: int, max_iter: int) -> Tensor:
    """Natural-log probability of each next label under a probe trained on the earlier data."""
    seen = torch.unique(y_tr)
    if seen.numel() < 2:
        # a probe cannot be fitted on one class: code with the smoothed empirical frequencies
        counts = torch.stack([(y_tr == c).sum() for c in classes]).double() + 1.0
        p = counts / counts.sum()
        return p[torch.searchsorted(classes, y_next)].log()
    l2 = max(l2_grid)  # strongest penalty while there is too little data to choose one
    if x_tr.shape[0] >= min_select:
        tr, va = split_indices(x_tr.shape[0], (0.8, 0.2), seed)
        l2 = float(train_probe(x_tr, y_tr, l2_grid=l2_grid, split=(tr, va, va), max_iter=max_iter,
                                select_by="log_loss").probe.l2[0])
    # the block's code: a probe on *all* earlier data at that penalty, over every class
    probe = fit_probe(x_tr, y_tr, l2, classes=classes, max_iter=max_iter)
    lp = probe.log_proba(x_next)[:, 0]  # [n_next, K]
    return lp.gather(1, torch.searchsorted(classes, y_next)[:, None])[:, 0]
