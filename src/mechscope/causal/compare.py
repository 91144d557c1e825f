"""Every alignment method at one site, with its controls, on the same data.

:func:`compare` trains or searches each method on training data, then scores each
alignment's IIA on held-out test data (one dataset per intervention kind: each variable
alone, several at once), beside the two controls: a random subspace of the same size,
and the full-vector interchange. This is what ``mechscope das`` prints and what the
bench scores.

Methods: ``das`` (low-rank subspace), ``rotation`` (full rotation), ``boundless``
(Boundless DAS, one variable per site), ``dbm`` (differentiable binary masking over
neurons), ``neurons`` (brute-force / greedy search over neuron sets), ``pca``
(the same search over principal components).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mechscope.causal.alignment import Alignment
from mechscope.causal.baselines import (
    full_vector,
    pca_basis,
    random_subspace,
    site_width,
)
from mechscope.causal.boundless import boundless_das
from mechscope.causal.counterfactual import CounterfactualData, combine
from mechscope.causal.das import FitConfig, das
from mechscope.causal.dbm import dbm
from mechscope.causal.engine import Readout, identity_readout
from mechscope.causal.iia import IIAResult, iia
from mechscope.causal.search import search_alignments
from mechscope.core.featurize import Identity
from mechscope.core.site import Site

METHODS = ("das", "rotation", "boundless", "dbm", "neurons", "pca")
CONTROLS = ("random_subspace", "full_vector")


@dataclass
class SearchSettings:
    """How the localist searches run: examples per dataset, sizes, exhaustive limit."""

    n: int = 300
    sizes: tuple[int, ...] = (1, 2, 4, 8)
    max_exhaustive: int = 20_000


@dataclass
class MethodResult:
    method: str
    alignment: Alignment | None
    iia: dict[str, IIAResult]
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    def mean(self, names: Sequence[str] | None = None) -> float:
        vals = [r.value for k, r in self.iia.items() if names is None or k in names]
        return sum(vals) / len(vals) if vals else float("nan")


def evaluate(model: nn.Module, alignment: Alignment, tests: Mapping[str, CounterfactualData],
             readout: Readout = identity_readout) -> dict[str, IIAResult]:
    """IIA of ``alignment`` on every test set whose variables it places."""
    return {name: iia(model, d, alignment.restrict(d.variables), readout)
            for name, d in tests.items() if all(v in alignment.places for v in d.variables)}


def run_method(method: str, model: nn.Module, train: Mapping[str, CounterfactualData], site: Site,
               variables: Sequence[str], dims: int, readout: Readout = identity_readout,
               fit: FitConfig = FitConfig(), search: SearchSettings = SearchSettings()) -> tuple[Alignment, dict]:
    """Train or search one method; returns its hard alignment and what it reports."""
    data = combine(list(train.values()))
    sites = {v: site for v in variables}
    if method in ("das", "rotation"):
        al, res = das(model, data, sites, dims, readout, kind="subspace" if method == "das" else "rotation", cfg=fit)
        return al, {"loss": res.losses[-1], "steps": res.steps, "engine": res.engine}
    if method == "boundless":  # one variable per site: each trained on the data intervening on it alone
        places, losses = {}, []
        for v in variables:
            alone = [d for d in train.values() if tuple(d.variables) == (v,)]
            al, res = boundless_das(model, alone[0] if alone else data, site, readout, cfg=fit)
            places[v] = al[v]
            losses.append(res.losses[-1])
        al = Alignment(places)
        return al, {"loss": max(losses), "dims": {v: p.size for v, p in al.places.items()}}
    if method == "dbm":
        al, res = dbm(model, data, sites, readout, cfg=fit)
        return al, {"loss": res.losses[-1], "steps": res.steps, "dims": {v: p.size for v, p in al.places.items()}}
    if method in ("neurons", "pca"):
        small = {k: d.subset(torch.arange(min(search.n, len(d)))) for k, d in train.items()}
        basis = Identity(site_width(model, data, site)) if method == "neurons" else pca_basis(model, data, site)
        sizes = tuple(k for k in search.sizes if k * len(variables) <= basis.n_features)
        res = search_alignments(model, small, site, basis, variables, sizes, readout, max_exhaustive=search.max_exhaustive)
        return res.alignment, {"search": {str(k): m for k, m in res.sizes.items()}, "scored": res.evaluated,
                               "best_by_size": res.best_by_size}
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def controls(model: nn.Module, tests: Mapping[str, CounterfactualData], site: Site, variables: Sequence[str],
             dims: int | Mapping[str, int], readout: Readout = identity_readout, seed: int = 0) -> dict[str, MethodResult]:
    """The random-subspace (``dims`` per variable) and full-vector controls at ``site``."""
    width = site_width(model, next(iter(tests.values())), site)
    sizes = {v: dims for v in variables} if isinstance(dims, int) else dict(dims)
    out = {}
    t0 = time.perf_counter()
    rand = random_subspace({v: site for v in variables}, sizes, {site: width}, seed)
    out["random_subspace"] = MethodResult("random_subspace", rand, evaluate(model, rand, tests, readout),
                                          time.perf_counter() - t0)
    t0 = time.perf_counter()
    singles = {k: d for k, d in tests.items() if len(d.variables) == 1}
    full = {k: iia(model, d, full_vector(site, d.variables[0], width), readout) for k, d in singles.items()}
    out["full_vector"] = MethodResult("full_vector", None, full, time.perf_counter() - t0)
    return out


def compare(model: nn.Module, train: Mapping[str, CounterfactualData], tests: Mapping[str, CounterfactualData],
            site: Site, variables: Sequence[str], dims: int, methods: Sequence[str] = ("das",),
            readout: Readout = identity_readout, fit: FitConfig = FitConfig(),
            search: SearchSettings = SearchSettings(), with_controls: bool = True) -> dict[str, MethodResult]:
    """Each method's alignment and test IIA at ``site`` (plus the controls)."""
    results: dict[str, MethodResult] = {}
    for method in methods:
        t0 = time.perf_counter()
        alignment, info = run_method(method, model, train, site, variables, dims, readout, fit, search)
        results[method] = MethodResult(method, alignment, evaluate(model, alignment, tests, readout),
                                       time.perf_counter() - t0, info)
    if with_controls:  # the random subspace matches the first method's sizes (Boundless and DBM learn theirs)
        first = results[methods[0]].alignment if methods else None
        sizes = {v: first[v].size for v in variables} if first is not None else dims
        results.update(controls(model, tests, site, variables, sizes, readout, fit.seed))
    return results


def table(results: Mapping[str, MethodResult], datasets: Sequence[str]) -> str:
    """IIA per method (rows) and test set (columns), with kept/total pairs."""
    head = ["METHOD", *datasets, "SECONDS"]
    rows = []
    for name, r in results.items():
        cells = [f"{r.iia[d].value:.3f}" if d in r.iia else "-" for d in datasets]
        rows.append([name, *cells, f"{r.seconds:.1f}"])
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    kept = next((r.iia for r in results.values() if r.iia), {})
    lines.append("pairs kept (model right on base and sources): " +
                 ", ".join(f"{d} {kept[d].kept}/{kept[d].n_pairs}" for d in datasets if d in kept))
    return "\n".join(lines)
