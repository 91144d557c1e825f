"""Interventions: what happens to a site's view when the model runs.

Every intervention is a callable ``(view, call) -> new_view`` with ``new_view`` of the
view's shape (see :mod:`mechscope.core.site` for the view). Parameter-free ones are
frozen dataclasses; the feature-space interchange is an ``nn.Module`` so that a
trainable featurizer's parameters (a DAS rotation, an SAE) receive gradients through
the frozen model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.featurize import Featurizer
from mechscope.core.site import SiteError

if TYPE_CHECKING:  # annotations only: run applies interventions, so it imports this module
    from mechscope.core.run import HookCall


def _check_same_shape(values: Tensor, view: Tensor, call: HookCall, what: str) -> None:
    if values.shape != view.shape:
        raise SiteError(
            f"{what} at site {call.site} has shape {list(values.shape)}, but the base's view "
            f"there has shape {list(view.shape)}; source and base batches must have the same "
            "batch size and, at sites with positions, the same number of selected positions"
        )


@dataclass(frozen=True, eq=False)
class Replace:
    """Interchange / patch: the view becomes ``values`` (e.g. cached from a source run)."""

    values: Tensor  # same shape as the view

    def __call__(self, view: Tensor, call: HookCall) -> Tensor:
        _check_same_shape(self.values, view, call, "the source activation")
        return self.values.to(view.device, view.dtype)


@dataclass(frozen=True)
class Zero:
    """Zero ablation."""

    def __call__(self, view: Tensor, call: HookCall) -> Tensor:
        return torch.zeros_like(view)


@dataclass(frozen=True, eq=False)
class Mean:
    """Mean ablation: the view becomes a mean over a reference dataset (broadcast over batch)."""

    mean: Tensor  # the view's shape without the batch dim, or anything broadcastable to it

    def __call__(self, view: Tensor, call: HookCall) -> Tensor:
        try:
            return self.mean.to(view.device, view.dtype).expand_as(view)
        except RuntimeError:
            raise SiteError(f"mean of shape {list(self.mean.shape)} does not broadcast to the view {list(view.shape)} at site {call.site}") from None


@dataclass(frozen=True, eq=False)
class Resample:
    """Resample ablation: each example's view becomes that of a random reference example.

    ``pool`` holds reference views ``[N, *view.shape[1:]]`` (e.g. ``cache(...)`` on other
    inputs); draws are reproducible from ``seed``.
    """

    pool: Tensor
    seed: int = 0
    _gen: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.pool.shape[0] == 0:
            raise ValueError("Resample needs a non-empty pool of reference activations")
        gen = torch.Generator()
        gen.manual_seed(self.seed)
        object.__setattr__(self, "_gen", gen)

    def __call__(self, view: Tensor, call: HookCall) -> Tensor:
        if self.pool.shape[1:] != view.shape[1:]:
            raise SiteError(f"resample pool rows have shape {list(self.pool.shape[1:])}, the view at {call.site} has {list(view.shape[1:])}")
        idx = torch.randint(self.pool.shape[0], (view.shape[0],), generator=self._gen)
        return self.pool[idx].to(view.device, view.dtype)


@dataclass(frozen=True, eq=False)
class Add:
    """Steering: ``view + coeff * vector`` (vector ``[d]`` or broadcastable to the view)."""

    vector: Tensor
    coeff: float = 1.0

    def __call__(self, view: Tensor, call: HookCall) -> Tensor:
        if self.vector.shape[-1] != view.shape[-1]:
            raise SiteError(f"steering vector of width {self.vector.shape[-1]} does not match the site {call.site} of width {view.shape[-1]}")
        return view + self.coeff * self.vector.to(view.device, view.dtype)


@dataclass(frozen=True, eq=False)
class ProjectOut:
    """Remove the span of ``directions`` ``[k, d]``: ``x - x Q Qᵀ`` with Q orthonormal."""

    directions: Tensor
    _basis: Tensor = field(init=False, repr=False)  # [d, k] orthonormal

    def __post_init__(self) -> None:
        dirs = self.directions
        if dirs.dim() == 1:
            dirs = dirs.unsqueeze(0)
        if dirs.dim() != 2 or dirs.shape[0] == 0:
            raise ValueError(f"directions must be [k, d] with k >= 1, got shape {list(self.directions.shape)}")
        # orthonormal basis of the span via SVD, in fp64: directions may be (near-)parallel,
        # and a dependent one must not add a spurious axis. Tolerance: the input's rounding.
        u, s, _ = torch.linalg.svd(dirs.double().T, full_matrices=False)
        eps = torch.finfo(dirs.dtype).eps if dirs.is_floating_point() else 1e-12
        rank = int((s > max(dirs.shape) * eps * s.max()).sum())
        q = u
        object.__setattr__(self, "_basis", q[:, :rank].to(self.directions.dtype))

    def __call__(self, view: Tensor, call: HookCall) -> Tensor:
        q = self._basis.to(view.device, view.dtype)
        if q.shape[0] != view.shape[-1]:
            raise SiteError(f"directions of width {q.shape[0]} do not match the site {call.site} of width {view.shape[-1]}")
        return view - (view @ q) @ q.T


@dataclass(frozen=True, eq=False)
class Apply:
    """Any function of the view (and the call), for one-off experiments."""

    fn: Callable[[Tensor], Tensor]

    def __call__(self, view: Tensor, call: HookCall) -> Tensor:
        return self.fn(view)


class FeatureInterchange(nn.Module):
    """Interchange in a feature space: base features ``features`` take the source's values.

    ``x_b -> decode(f_b with f_b[..., i] = f_s[..., i], err_b)``. With an orthonormal
    subspace this is ``x_b + W Wᵀ (x_s - x_b)``. ``source`` is the source's view at the
    same site (same shape as the base's view); ``features`` are indices into the
    featurizer's features (``None``: all of them).
    """

    def __init__(self, featurizer: Featurizer, source: Tensor, features: Sequence[int] | Tensor | None = None) -> None:
        super().__init__()
        self.featurizer = featurizer
        self.source = source
        n = featurizer.n_features
        idx = None if features is None else torch.as_tensor(features, dtype=torch.long)
        if idx is not None and idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise SiteError(f"feature indices {idx.tolist()[:8]} are outside the featurizer's {n} features")
        self.features = idx

    def forward(self, view: Tensor, call: Any = None) -> Tensor:
        where = call.site if call is not None else "this site"
        _check_same_shape(self.source, view, call or _Anon, "the source activation")
        self.featurizer.check_width(view.shape[-1], where)
        f_base, err_base = self.featurizer.encode(view)
        f_src, _ = self.featurizer.encode(self.source.to(view.device, view.dtype))
        if self.features is None:
            mixed = f_src
        else:
            idx = self.features.to(view.device)
            mixed = f_base.index_copy(-1, idx % f_base.shape[-1], f_src.index_select(-1, idx % f_src.shape[-1]))
        return self.featurizer.decode(mixed, err_base)


class _Anon:
    site = "this site"
