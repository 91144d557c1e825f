"""Controls and fixed bases that every alignment method is reported beside.

- :func:`random_subspace`: a random orthonormal subspace of the same size as a learnt
  one (variables on disjoint columns, as DAS would have them). A high IIA for it means
  the test is not selective.
- :func:`full_vector`: the variable takes the source's *whole* activation at the site
  (the interchange of everything there: an upper bound on what any subspace of that
  site can carry, for one variable at a time).
- :func:`pca_basis`: principal components of the site's activations on the bases,
  the basis the PCA method searches in (:mod:`mechscope.causal.search`).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from mechscope.causal.alignment import Alignment, AlignmentError, Place
from mechscope.causal.counterfactual import CounterfactualData, take
from mechscope.causal.das import by_site
from mechscope.causal.stiefel import StiefelSubspace
from mechscope.core.featurize import PCA, Identity
from mechscope.core.run import cache
from mechscope.core.site import Site


def random_subspace(sites: Mapping[str, Site], dims: Mapping[str, int], widths: Mapping[Site, int],
                    seed: int = 0) -> Alignment:
    """Random orthonormal columns, ``dims[v]`` per variable, frozen.

    Variables at one site share one random basis on disjoint columns (as DAS would have
    them) when their sizes fit the site together; otherwise (sizes learnt separately, as
    by Boundless DAS) each gets its own random subspace.
    """
    places: dict[str, Place] = {}
    for i, (site, names) in enumerate(by_site(sites).items()):
        too_wide = [v for v in names if dims[v] > widths[site]]
        if too_wide:
            raise AlignmentError(f"variables {too_wide} ask for more dimensions than site {site} has ({widths[site]})")
        if sum(dims[v] for v in names) > widths[site]:
            for j, v in enumerate(names):
                basis = StiefelSubspace(widths[site], dims[v], seed=seed + 7919 * (i + 1) + j, trainable=False)
                places[v] = Place(site, basis, None)
            continue
        basis = StiefelSubspace(widths[site], sum(dims[v] for v in names), seed=seed + 7919 * (i + 1), trainable=False)
        start = 0
        for v in names:
            places[v] = Place(site, basis, tuple(range(start, start + dims[v])))
            start += dims[v]
    return Alignment(places)


def full_vector(site: Site, variable: str, width: int) -> Alignment:
    """``variable`` aligned to every coordinate of ``site``."""
    return Alignment({variable: Place(site, Identity(width), None)})


def site_width(model: nn.Module, data: CounterfactualData, site: Site) -> int:
    """The width (last dimension) of ``site``'s view on ``data``'s inputs."""
    with torch.no_grad():
        return int(cache(model, take(data.base, torch.arange(1)), [site])[site].shape[-1])


def pca_basis(model: nn.Module, data: CounterfactualData, site: Site, k: int | None = None,
              max_rows: int = 20_000) -> PCA:
    """PCA fitted on the site's activations over the bases of ``data`` (at most ``max_rows``)."""
    rows = torch.arange(min(len(data), max_rows))
    with torch.no_grad():
        acts = cache(model, take(data.base, rows), [site])[site]
    return PCA.fit(acts, k)
