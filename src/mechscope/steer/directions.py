"""Steering directions: vectors in a site's activation space that stand for a concept.

All take activations that the caller read at one site and position (``[n, d]`` rows, e.g.
from :func:`mechscope.core.collect.activations`) and return a direction ``[d]``:

- :func:`diff_of_means`: mean h(concept) - mean h(no concept), unpaired;
- :func:`paired_mean_difference`: mean over pairs of h(+) - h(-) (contrastive activation
  addition, Rimsky et al. 2024, arXiv 2312.06681);
- :func:`actadd`: h(+) - h(-) from a single prompt pair (Turner et al. 2023, arXiv 2308.10248);
- :func:`pca_of_differences`: the first principal component of paired differences (the
  RepE reading vector, Zou et al. 2023, arXiv 2310.01405), sign set so that it points
  from - to +;
- a probe's weight, mapped back to raw activations (:func:`mechscope.probe.linear.probe_direction`,
  passed to :func:`find_direction` as ``probe_fit``).

:func:`find_direction` picks one of them by name (:data:`METHODS`) for concept and
concept-free activations, scaled alike, as ``mechscope steer --method`` does.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from mechscope.core.collect import RowsError, as_rows


class DirectionError(ValueError):
    """Activations a direction cannot be computed from, or a direction that does not fit."""


def _rows(x: Any, what: str) -> Tensor:
    try:
        return as_rows(x, what)
    except RowsError as e:
        raise DirectionError(str(e)) from None


def _same_width(a: Tensor, b: Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise DirectionError(f"the two sets of activations have widths {a.shape[1]} and {b.shape[1]}; "
                             "read both at the same site")


def _paired(pos: Any, neg: Any) -> tuple[Tensor, Tensor]:
    a, b = _rows(pos, "positive activations"), _rows(neg, "negative activations")
    _same_width(a, b)
    if a.shape[0] != b.shape[0]:
        raise DirectionError(f"paired activations need as many positive as negative rows, got {a.shape[0]} and "
                             f"{b.shape[0]}; row i of each must come from the same pair")
    return a, b


def diff_of_means(pos: Any, neg: Any) -> Tensor:  # [n, d], [m, d] -> [d]
    """Mean of the concept activations minus mean of the concept-free ones."""
    a, b = _rows(pos, "concept activations"), _rows(neg, "concept-free activations")
    _same_width(a, b)
    return (a.mean(0) - b.mean(0)).float()


def paired_mean_difference(pos: Any, neg: Any) -> Tensor:  # [n, d], [n, d] -> [d]
    """Contrastive activation addition: the mean over pairs of h(+) - h(-)."""
    a, b = _paired(pos, neg)
    return (a - b).mean(0).float()


def actadd(pos: Any, neg: Any) -> Tensor:  # [d] or [1, d] each -> [d]
    """ActAdd: h(prompt+) - h(prompt-) from one pair of prompts."""
    a = torch.as_tensor(pos)
    b = torch.as_tensor(neg)
    a, b = _paired(a.reshape(1, -1) if a.dim() == 1 else a, b.reshape(1, -1) if b.dim() == 1 else b)
    if a.shape[0] != 1:
        raise DirectionError(f"ActAdd uses one prompt pair; got {a.shape[0]} pairs (use paired_mean_difference)")
    return (a[0] - b[0]).float()


def pca_of_differences(pos: Any, neg: Any, seed: int = 0) -> Tensor:  # -> unit [d]
    """RepE reading vector: first principal component of paired differences, unit norm.

    As in RepE, each pair's difference enters with a random sign, so the differences are
    centred around zero and their main axis of variation is the concept; the sign of the
    component is then fixed to agree with the mean difference (+ minus -).
    """
    a, b = _paired(pos, neg)
    if a.shape[0] < 2:
        raise DirectionError("PCA of differences needs at least 2 pairs")
    diffs = a - b
    gen = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(diffs.shape[0], generator=gen) < 0.5, -1.0, 1.0).double()
    flipped = diffs * signs[:, None]
    _, _, vh = torch.linalg.svd(flipped - flipped.mean(0), full_matrices=False)
    v = vh[0]
    if float(v @ diffs.mean(0)) < 0:
        v = -v
    return v.float()


METHODS = ("diff_of_means", "pca", "actadd", "probe")


def find_direction(method: str, pos: Any, neg: Any, seed: int = 0,
                   probe_fit: Callable[..., Tensor] | None = None) -> Tensor:  # [n, d], [m, d] -> [d]
    """The direction ``method`` (one of :data:`METHODS`) finds from concept activations ``pos``
    and concept-free activations ``neg``, in raw activation units.

    ``actadd`` uses the first pair; ``pca`` pairs the i-th rows of each and scales the unit
    reading vector by the norm of the difference of means, so that a coefficient means the
    same for every method; ``probe`` fits a binary probe (concept = 1) on both sets with
    ``probe_fit(acts, labels, seed=...)`` (e.g. :func:`mechscope.probe.linear.probe_direction`:
    probes are a sibling method, so the caller brings one).
    """
    a, b = torch.as_tensor(pos), torch.as_tensor(neg)  # each function checks its rows; the scale is in their dtype
    if method == "diff_of_means":
        return diff_of_means(a, b)
    if method == "probe":
        if probe_fit is None:
            raise DirectionError("the probe method needs a probe: pass probe_fit=mechscope.probe.linear.probe_direction")
        y = torch.cat([torch.ones(len(a)), torch.zeros(len(b))]).long()
        return probe_fit(torch.cat([a, b]), y, seed=seed)
    m = min(len(a), len(b))  # pair the i-th concept input with the i-th concept-free one
    if method == "actadd":
        return actadd(a[0], b[0])
    if method == "pca":
        return pca_of_differences(a[:m], b[:m], seed=seed) * float((a.mean(0) - b.mean(0)).norm())
    raise DirectionError(f"unknown direction method {method!r}; choose from {', '.join(METHODS)}")


def unit(v: Tensor) -> Tensor:
    """``v / ||v||`` with a clear error for a zero (or non-finite) vector."""
    n = float(v.norm())
    if not n > 0 or not torch.isfinite(v).all():
        raise DirectionError(f"cannot normalise a direction of norm {n}; the two groups of activations "
                             "are identical (or NaN) at this site")
    return v / n


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two vectors."""
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))
