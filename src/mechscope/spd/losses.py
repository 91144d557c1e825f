"""SPD's losses and schedules as pure functions of tensors.

- reconstruction distance ``D``: MSE (mean over batch and output dims) for toy models, or
  ``KL(target ‖ masked)`` per position (averaged over real positions) for language models;
- importance minimality ``Σ_{l,c} mean_batch(g_{l,c}^p)`` on the upper-leaky importances;
- faithfulness ``Σ_l ‖W_l − U_l V_l‖² / n_params`` lives on :class:`Decomposition`;
- schedules: the learning rate (cosine or constant, optional linear warm-up) and the
  annealing of ``p``.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor
from torch.nn import functional as F

EPS = 1e-12  # keeps g^p differentiable at g = 0 when p < 1


def mse(y: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every element (batch and output dims)."""
    return (y - target).pow(2).mean()


def kl_per_position(logits: Tensor, target_logits: Tensor) -> Tensor:  # [..., vocab] -> [...]
    """``KL(softmax(target) ‖ softmax(logits))`` at each position."""
    target_logp = F.log_softmax(target_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    return (target_logp.exp() * (target_logp - logp)).sum(-1)


def kl(logits: Tensor, target_logits: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Mean KL over positions (over real tokens only when a mask ``[batch, pos]`` is given)."""
    per = kl_per_position(logits, target_logits)
    if attention_mask is None:
        return per.mean()
    m = attention_mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp_min(1.0)


def reconstruction(kind: str, y: Tensor, target: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The configured distance ``D(f(x | masked), f(x | W))``."""
    if kind == "mse":
        return mse(y, target)
    if kind == "kl":
        return kl(y, target, attention_mask)
    raise ValueError(f"unknown reconstruction distance {kind!r}; expected 'mse' or 'kl'")


def importance_minimality(g_upper: Mapping[str, Tensor], p: float) -> Tensor:
    """``Σ_l Σ_c mean_{batch, pos} (g_{l,c} + eps)^p`` on upper-leaky importances."""
    total = None
    for g in g_upper.values():
        term = (g + EPS).pow(p).reshape(-1, g.shape[-1]).sum(-1).mean()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("importance_minimality needs at least one layer of importances")
    return total


def annealed_p(frac: float, p: float, p_final: float | None, start: float, end: float) -> float:
    """``p`` interpolated linearly from ``p`` to ``p_final`` between fractions ``start`` and ``end``."""
    if p_final is None or frac <= start:
        return p
    if frac >= end or end <= start:
        return p_final
    return p + (p_final - p) * (frac - start) / (end - start)


def lr_factor(step: int, steps: int, schedule: str, warmup_frac: float = 0.0) -> float:
    """Multiplier of the base learning rate at ``step`` of ``steps``.

    Linear warm-up over the first ``warmup_frac`` of the steps, then constant or a
    half-period cosine from 1 to 0 over the rest.
    """
    warm = int(round(warmup_frac * steps))
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(steps - warm - 1, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warm, span) / span))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected 'cosine' or 'constant'")


def mean_over_layers(values: list[Tensor]) -> Tensor:
    return torch.stack(values).mean()
