"""Planted-neuron probing data, where the neurons that carry a feature are known exactly.

Following Gurnee et al. (2023, arXiv 2305.01610): pre-activations ``X ~ N(0, 1)`` of width
``d``; for the positive class ``k`` planted neurons are shifted by ``+shift`` or ``-shift``
(a random sign per neuron); then GELU, as an MLP's hidden layer would apply. A k-sparse
probe should find exactly the planted support, and its F1 should grow with the shift.

Every example also has an input *type* for control tasks (Hewitt & Liang). With
``type_strength = 0`` (the default) the type is invisible in the activations, so a
control task on it can only be at chance; with ``type_strength = s > 0`` each type has a
fixed prototype and an example is ``s * prototype + sqrt(1 - s^2) * noise`` before the
shift, so a probe can memorise types and the control task's accuracy rises above chance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PlantedData:
    """Activations ``x`` [n, d], binary labels ``y`` [n], the planted ``support`` [k] and ``signs`` [k], ``types`` [n]."""

    x: Tensor
    y: Tensor
    support: Tensor
    signs: Tensor
    types: Tensor
    shift: float


def make_planted(n: int = 4000, d: int = 512, k: int = 8, shift: float = 0.5, pos_frac: float = 0.5,
                 n_types: int | None = None, type_strength: float = 0.0, seed: int = 0) -> PlantedData:
    """Draw one planted-neuron dataset (see the module docstring)."""
    if not (1 <= k <= d and n >= 4):
        raise ValueError(f"need n >= 4 and 1 <= k <= d, got n={n}, d={d}, k={k}")
    if not 0.0 < pos_frac < 1.0:
        raise ValueError(f"pos_frac (the positive-class fraction) must be in (0, 1), got {pos_frac}")
    if not 0.0 <= type_strength <= 1.0:
        raise ValueError(f"type_strength must be in [0, 1], got {type_strength}")
    gen = torch.Generator().manual_seed(seed)
    n_types = n_types or max(2, n // 10)
    types = torch.randint(n_types, (n,), generator=gen)
    noise = torch.randn(n, d, generator=gen)
    if type_strength > 0:
        protos = torch.randn(n_types, d, generator=gen)
        noise = type_strength * protos[types] + math.sqrt(1 - type_strength ** 2) * noise
    y = (torch.rand(n, generator=gen) < pos_frac).long()
    support = torch.randperm(d, generator=gen)[:k].sort().values
    signs = torch.where(torch.rand(k, generator=gen) < 0.5, -1.0, 1.0)
    pre = noise.clone()
    pre[:, support] += shift * signs * y[:, None].float()
    return PlantedData(torch.nn.functional.gelu(pre), y, support, signs, types, float(shift))
