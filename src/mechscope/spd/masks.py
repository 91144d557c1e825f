"""Hard sigmoids and stochastic masks: how causal importances become masks.

A causal-importance function outputs a pre-activation ``z``; SPD squashes it with a hard
sigmoid ``σ_H(z) = clamp(z, 0, 1)``. Two leaky versions keep gradients alive where the
clamp would kill them:

- *lower-leaky* (slope ``alpha`` below 0) for the masks, so that a wrongly-zero importance
  still learns from the reconstruction losses;
- *upper-leaky* (slope ``alpha`` above 1) for the importance-minimality penalty, so that an
  importance stuck above 1 is still pushed down.

A stochastic mask keeps an important subcomponent and randomly scales an unimportant
one anywhere in [0, 1]: ``m = g + (1 - g) r`` with ``r ~ U(0, 1)`` (``continuous``) or
``r ∈ {0, 1}`` with probability 1/2 (``binomial``), independently per example, position and
subcomponent. Gradients reach ``g`` through ``m`` (the reparametrisation).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

MaskKind = Literal["continuous", "binomial"]
LEAK = 0.01  # the slope of the leaky parts, as in the paper


def hard_sigmoid(z: Tensor) -> Tensor:
    """``clamp(z, 0, 1)``: the importance used for evaluation."""
    return z.clamp(0.0, 1.0)


def lower_leaky_hard_sigmoid(z: Tensor, alpha: float = LEAK) -> Tensor:
    """``alpha * z`` below 0, ``min(z, 1)`` above: the importance inside the masks."""
    return torch.where(z > 0, z.clamp(max=1.0), alpha * z)


def upper_leaky_hard_sigmoid(z: Tensor, alpha: float = LEAK) -> Tensor:
    """``max(z, 0)`` up to 1, ``1 + alpha (z - 1)`` above: the importance that is penalised."""
    return torch.where(z > 1, 1.0 + alpha * (z - 1.0), z.clamp(min=0.0))


def stochastic_source(like: Tensor, kind: MaskKind, generator: torch.Generator | None = None) -> Tensor:
    """The random ``r`` of a mask, shaped like ``like`` (U(0, 1) or fair coin flips)."""
    if kind == "continuous":
        return torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    if kind == "binomial":
        return torch.randint(0, 2, like.shape, generator=generator, device=like.device).to(like.dtype)
    raise ValueError(f"unknown mask kind {kind!r}; expected 'continuous' or 'binomial'")


def stochastic_mask(g: Tensor, kind: MaskKind = "continuous", generator: torch.Generator | None = None) -> Tensor:
    """``m = g + (1 - g) r``: keeps what is important, randomly scales what is not."""
    r = stochastic_source(g, kind, generator)
    return g + (1.0 - g) * r


def _indicator(compare, z: Tensor, bound: float) -> Tensor:
    """``compare(z, bound)`` as 0./1. in ``z``'s dtype, written directly as floats (a bool
    tensor and its conversion cost ~10x more on CPU)."""
    return compare(z, bound, out=torch.empty_like(z))


class _MaskAndPenalised(torch.autograd.Function):
    """``(m, g_upper, g_lower)`` from ``z`` and the random ``r`` (``g_lower`` without gradient).

    ``m = g_lower + (1 - g_lower) r`` and ``g_upper`` as composed from
    :func:`lower_leaky_hard_sigmoid`, :func:`upper_leaky_hard_sigmoid` and
    :func:`stochastic_mask` (same values to float rounding and the same gradients, also at
    the kinks, where the clamps pass gradient: ``z = 0`` and ``z = 1``), written with clamps
    and float indicators instead of ``torch.where`` on bool masks (slow on CPU), with one
    backward instead of the composed graph's dozen small ops:
    ``g_lower = min(z, 1) + (alpha - 1) min(z, 0)``, ``g_upper = max(z, 0) + (alpha - 1) max(z - 1, 0)``.
    """

    @staticmethod
    def forward(ctx, z: Tensor, r: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        lower = torch.add(z.clamp(max=1.0), z.clamp(max=0.0), alpha=alpha - 1.0)
        upper = torch.add(z.clamp(min=0.0), (z - 1.0).clamp_(min=0.0), alpha=alpha - 1.0)
        mask = torch.addcmul(lower, 1.0 - lower, r)
        ctx.save_for_backward(z, r)
        ctx.alpha = alpha
        ctx.mark_non_differentiable(lower)
        return mask, upper, lower

    @staticmethod
    @once_differentiable
    def backward(ctx, g_mask: Tensor | None, g_upper: Tensor | None, _: Tensor | None):  # type: ignore[override]
        z, r = ctx.saved_tensors
        alpha = ctx.alpha
        grad = torch.zeros_like(z)
        if g_mask is not None:  # d g_lower/dz: alpha for z <= 0, 1 on (0, 1], 0 above
            slope = torch.add(_indicator(torch.le, z, 1.0), _indicator(torch.le, z, 0.0), alpha=alpha - 1.0)
            grad.addcmul_(g_mask * slope, 1.0 - r)
        if g_upper is not None:  # d g_upper/dz: 0 below 0, 1 on [0, 1], alpha above
            slope = torch.add(_indicator(torch.ge, z, 0.0), _indicator(torch.gt, z, 1.0), alpha=alpha - 1.0)
            grad.addcmul_(g_upper, slope)
        return grad, None, None


def mask_and_penalised(z: Tensor, r: Tensor, alpha: float = LEAK) -> tuple[Tensor, Tensor, Tensor]:
    """``(stochastic_mask(lower_leaky(z)), upper_leaky(z), lower_leaky(z).detach())`` for a given
    source ``r``, fused: the mask and the penalised importance with their gradients, and the
    mask's importance for statistics."""
    return _MaskAndPenalised.apply(z, r, alpha)


def delta_mask(batch_shape: torch.Size | tuple[int, ...], kind: MaskKind = "continuous",
               generator: torch.Generator | None = None, like: Tensor | None = None) -> Tensor:
    """The random scale of the delta component ``W - UV`` per example (and position)."""
    dtype = like.dtype if like is not None else torch.float32
    device = like.device if like is not None else None
    proto = torch.empty(tuple(batch_shape), dtype=dtype, device=device)
    return stochastic_source(proto, kind, generator)
