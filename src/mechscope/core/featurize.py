"""Featurizers: invertible maps between an activation and features.

``encode(x) -> (f, err)`` and ``decode(f, err) -> x`` with an exact round trip
(``decode(*encode(x)) == x`` up to float rounding), whatever the basis:

| featurizer        | features ``f``                  | error ``err``          |
|-------------------|---------------------------------|------------------------|
| ``Identity``      | ``x``                           | 0                      |
| ``Subspace`` (d×k)| ``x W``                         | ``x - x W Wᵀ``         |
| ``Rotation`` (d×d)| ``x R``                         | ``x - x R Rᵀ`` (≈ 0)   |
| ``PCA``           | standardised projections        | residual               |

``Subspace`` and ``Rotation`` are :class:`LinearFeaturizer` s: features are ``x B`` for an
orthonormal basis ``B``, which other orthonormal bases (trained another way) subclass too.

Sparse autoencoders and parameter decompositions implement the same interface, which is
what lets an interchange in feature space be one operation for every basis.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal


class FeaturizerError(ValueError):
    """A featurizer that does not fit the activation it is given."""


class Featurizer(nn.Module):
    """Base class. Subclasses set ``d`` (input width) and ``n_features``."""

    d: int
    n_features: int

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:  # [..., d] -> [..., n_features], [..., d]
        raise NotImplementedError

    def decode(self, f: Tensor, err: Tensor) -> Tensor:  # -> [..., d]
        raise NotImplementedError

    def check_width(self, width: int, where: object = "the site") -> None:
        if width != self.d:
            raise FeaturizerError(
                f"{type(self).__name__} expects activations of width {self.d}, but {where} has "
                f"width {width}; build the featurizer with d={width} or pick the matching site"
            )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_width(x.shape[-1])
        return self.encode(x)


class Identity(Featurizer):
    """Neurons: the features are the coordinates themselves."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = self.n_features = int(d)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, torch.zeros_like(x)

    def decode(self, f: Tensor, err: Tensor) -> Tensor:
        return f + err


class LinearFeaturizer(Featurizer):
    """Features ``x B`` for a basis ``B`` [d, k] with orthonormal columns.

    Subclasses give :meth:`basis`; how the basis is held and kept orthonormal is theirs
    (:class:`Subspace` by parametrization, a retraction after each step elsewhere). Code
    that needs the basis itself (a closed-form interchange ``x_b + (x_s - x_b) B Bᵀ``)
    tests ``isinstance(f, LinearFeaturizer)``.
    """

    def basis(self) -> Tensor:  # [d, k]
        raise NotImplementedError

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b = self.basis().to(x.dtype)
        f = x @ b
        return f, x - f @ b.T

    def decode(self, f: Tensor, err: Tensor) -> Tensor:
        return f @ self.basis().to(f.dtype).T + err


class _OrthoParam(nn.Module):
    """Holds ``weight`` [d, k] constrained to orthonormal columns."""

    def __init__(self, d: int, k: int, init: Tensor | None, generator: torch.Generator | None) -> None:
        super().__init__()
        w = torch.empty(d, k)
        if init is None:
            nn.init.orthogonal_(w, generator=generator)
        else:
            w = torch.linalg.qr(init.detach().double())[0].float()
        self.weight = nn.Parameter(w)
        orthogonal(self, "weight")


def check_subspace_shape(d: int, k: int, init: Tensor | None) -> None:
    """A ``k``-dimensional subspace of a ``d``-wide activation, with an optional ``[d, k]`` start."""
    if not 1 <= k <= d:
        raise FeaturizerError(f"a subspace of an activation of width {d} needs 1 <= k <= {d}, got k={k}")
    if init is not None and tuple(init.shape) != (d, k):
        raise FeaturizerError(f"init must have shape [d={d}, k={k}], got {list(init.shape)}")


class Subspace(LinearFeaturizer):
    """An orthonormal subspace W [d, k] (low-rank DAS). Trainable by default.

    Orthonormality is kept by ``torch.nn.utils.parametrizations.orthogonal``, so the
    gradient steps stay on the Stiefel manifold.
    """

    def __init__(self, d: int, k: int, init: Tensor | None = None, trainable: bool = True, seed: int | None = None) -> None:
        super().__init__()
        check_subspace_shape(d, k, init)
        self.d, self.n_features = int(d), int(k)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.param = _OrthoParam(d, k, init, gen)
        self.requires_grad_(trainable)

    def basis(self) -> Tensor:
        return self.param.weight


class Rotation(Subspace):
    """A full rotation R [d, d]: every direction is a feature, ``err`` is rounding only."""

    def __init__(self, d: int, init: Tensor | None = None, trainable: bool = True, seed: int | None = None) -> None:
        super().__init__(d, d, init=init, trainable=trainable, seed=seed)


class PCA(Featurizer):
    """Principal components fitted on activations; features are standardised projections.

    ``f = ((x - mean) P) / scale``, ``err = x - (mean + (f * scale) Pᵀ)``.
    """

    def __init__(self, mean: Tensor, components: Tensor, scale: Tensor) -> None:
        super().__init__()
        if components.dim() != 2 or mean.shape != (components.shape[0],) or scale.shape != (components.shape[1],):
            raise FeaturizerError("PCA needs mean [d], components [d, k] and scale [k]")
        self.d, self.n_features = components.shape
        self.register_buffer("mean", mean)
        self.register_buffer("components", components)
        self.register_buffer("scale", scale)

    @classmethod
    def fit(cls, acts: Tensor, k: int | None = None) -> "PCA":
        """Fit on activations ``[..., d]`` (flattened to rows); ``k`` defaults to all."""
        x = acts.detach().reshape(-1, acts.shape[-1]).double()
        if x.shape[0] < 2:
            raise FeaturizerError(f"PCA needs at least 2 activation vectors, got {x.shape[0]}")
        if not torch.isfinite(x).all():
            raise FeaturizerError("PCA.fit got NaN or inf activations")
        n, d = x.shape
        k = min(n, d) if k is None else k
        if not 1 <= k <= min(n, d):
            raise FeaturizerError(f"PCA on {n} vectors of width {d} needs 1 <= k <= {min(n, d)}, got k={k}")
        mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        comps = vh[:k].T  # [d, k]
        std = s[:k] / max(n - 1, 1) ** 0.5
        std = torch.where(std > 1e-8, std, torch.ones_like(std))  # a flat direction keeps unit scale
        dtype = acts.dtype if acts.is_floating_point() else torch.float32
        return cls(mean.to(dtype), comps.to(dtype), std.to(dtype))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c, mu, sc = self.components.to(x.dtype), self.mean.to(x.dtype), self.scale.to(x.dtype)
        f = ((x - mu) @ c) / sc
        return f, x - (mu + (f * sc) @ c.T)

    def decode(self, f: Tensor, err: Tensor) -> Tensor:
        c, mu, sc = self.components.to(f.dtype), self.mean.to(f.dtype), self.scale.to(f.dtype)
        return mu + (f * sc) @ c.T + err
