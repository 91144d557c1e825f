"""An orthonormal basis trained by retraction: the fast way to keep DAS on the Stiefel manifold.

The core's :class:`~mechscope.core.featurize.Subspace` keeps its basis orthonormal with
``torch.nn.utils.parametrizations.orthogonal``: every step recomputes a matrix
exponential (or a product of Householder reflections) forward and backward, which costs
more than the whole rest of a DAS step on a small network (timings: ``docs/results.md``).
:class:`StiefelSubspace` holds the basis ``W [d, k]`` as a plain
parameter instead and, after each optimiser step, maps it back onto the orthonormal
matrices with one QR decomposition (a *retraction*; the "QR re-orthonormalisation" of the
DAS spec), far cheaper. Between steps the basis is exactly orthonormal, so it is a
featurizer like any other (``encode``/``decode`` round-trip, interchange in its basis).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mechscope.core.featurize import LinearFeaturizer, check_subspace_shape


def orthonormalize(w: Tensor) -> Tensor:
    """The Q of ``w = QR`` with R's diagonal made positive (the nearest-orientation Q)."""
    q, r = torch.linalg.qr(w)
    signs = torch.sign(torch.diagonal(r))
    return q * torch.where(signs == 0, torch.ones_like(signs), signs)


class StiefelSubspace(LinearFeaturizer):
    """Orthonormal ``W [d, k]`` (``k = d``: a full rotation), re-orthonormalised by :meth:`retract`."""

    def __init__(self, d: int, k: int, init: Tensor | None = None, seed: int | None = None,
                 trainable: bool = True) -> None:
        super().__init__()
        check_subspace_shape(d, k, init)
        self.d, self.n_features = int(d), int(k)
        if init is None:
            w = torch.empty(d, k)
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            nn.init.orthogonal_(w, generator=gen)
        else:
            w = orthonormalize(init.detach().double()).float()
        self.weight = nn.Parameter(w, requires_grad=trainable)

    def basis(self) -> Tensor:  # [d, k]
        return self.weight

    @torch.no_grad()
    def project_grad(self) -> None:
        """Keep only the gradient's component tangent to the orthonormal matrices at W.

        ``G - W sym(Wᵀ G)``: the normal part would only be undone by the retraction, and an
        optimiser that rescales coordinates (Adam) would let it swamp the useful part.
        """
        g, w = self.weight.grad, self.weight
        if g is not None:
            wtg = w.T @ g  # [k, k]
            g.sub_(w @ ((wtg + wtg.T) / 2))

    @torch.no_grad()
    def retract(self) -> None:
        """Map the basis back onto the orthonormal matrices (call after an optimiser step)."""
        self.weight.copy_(orthonormalize(self.weight))
