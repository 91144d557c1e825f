"""RAVEL's disentanglement scores: Cause, Isolate and Disentangle (Huang et al. 2024).

For entities that carry several attributes, a featurizer places each attribute at a site
(a :class:`~mechscope.causal.alignment.Place`). Interchanging attribute A's features from
a source entity should

- **Cause**: make the network give the source's value of A when asked about A;
- **Isolate**: leave the network's answer about another attribute B at the base's value.

Both are interchange-intervention accuracies on counterfactual pairs the network gets
right unintervened (:func:`mechscope.causal.iia.hits`): Cause on ``cause[A]`` pairs,
Isolate on ``isolate[(A, B)]`` pairs. The scores are RAVEL's averages: Cause over the
attributes, Isolate over the ordered pairs (A, B), and Disentangle = ½ (Cause + Isolate).

Intervals: each attribute's (or pair's) score is a proportion with its Wilson interval;
the averages are means of independent groups of pairs, whose interval is a percentile
bootstrap that resamples each group's pairs on its own (stratified, seeded). Two
featurizers scored on the same pairs differ by a paired difference, bootstrapped the same
way (:func:`contrast`), as :func:`mechscope.causal.iia.paired_contrast` does for one set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from mechscope.causal.alignment import Alignment, Place
from mechscope.causal.counterfactual import CounterfactualData, CounterfactualError
from mechscope.causal.engine import Readout, identity_readout
from mechscope.causal.iia import Contrast, hits
from mechscope.core.stats import wilson_interval

RESAMPLES = 2000


class DisentangleError(ValueError):
    """Disentanglement data or places that do not fit each other."""


@dataclass
class DisentangleData:
    """Counterfactual sets of one world: ``cause[A]`` and ``isolate[(A, B)]`` (A intervened, B asked).

    Every set must intervene on exactly its attribute A (one variable, named A).
    """

    cause: dict[str, CounterfactualData]
    isolate: dict[tuple[str, str], CounterfactualData]

    def __post_init__(self) -> None:
        if not self.cause:
            raise DisentangleError("disentanglement data needs a cause set for at least one attribute")
        for a, d in self.cause.items():
            _check_set(d, a, f"cause[{a!r}]")
        for (a, b), d in self.isolate.items():
            if a == b:
                raise DisentangleError(f"isolate[({a!r}, {b!r})] asks about the attribute it intervenes on; "
                                       "that is a cause set")
            for x in (a, b):
                if x not in self.cause:
                    raise DisentangleError(f"isolate[({a!r}, {b!r})] names attribute {x!r}, which has no cause set; "
                                           f"attributes: {list(self.cause)}")
            _check_set(d, a, f"isolate[({a!r}, {b!r})]")

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(self.cause)

    def sets(self) -> dict[str, CounterfactualData]:
        """Every set by a readable name: ``cause:A``, ``isolate:A|B``."""
        return {**{f"cause:{a}": d for a, d in self.cause.items()},
                **{f"isolate:{a}|{b}": d for (a, b), d in self.isolate.items()}}

    def for_attribute(self, attribute: str) -> list[CounterfactualData]:
        """The cause set of ``attribute`` and every isolate set that intervenes on it."""
        if attribute not in self.cause:
            raise DisentangleError(f"unknown attribute {attribute!r}; the data has {list(self.cause)}")
        return [self.cause[attribute], *(d for (a, _), d in self.isolate.items() if a == attribute)]

    def subset(self, n: int) -> "DisentangleData":
        """The first ``n`` pairs of every set (for the cheaper searches)."""
        cut = lambda d: d.subset(torch.arange(min(n, len(d))))  # noqa: E731
        return DisentangleData({a: cut(d) for a, d in self.cause.items()},
                               {k: cut(d) for k, d in self.isolate.items()})


def _check_set(data: CounterfactualData, attribute: str, what: str) -> None:
    if tuple(data.variables) != (attribute,):
        raise DisentangleError(f"{what} intervenes on {list(data.variables)}; it must intervene on [{attribute!r}] "
                               "alone (one attribute, from one source entity)")


@dataclass(frozen=True)
class Score:
    """A proportion (or an average of proportions) with its 95 % interval and the pairs behind it."""

    value: float
    interval: tuple[float, float]
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "ci95": list(self.interval), "n": self.n}


@dataclass
class DisentangleResult:
    """Cause, Isolate and Disentangle of one featurizer, with the per-pair hits behind them."""

    cause: Score
    isolate: Score
    disentangle: Score
    per_cause: dict[str, Score]
    per_isolate: dict[tuple[str, str], Score]
    cause_hits: dict[str, Tensor] = field(repr=False)  # attribute -> [kept] bool
    isolate_hits: dict[tuple[str, str], Tensor] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"cause": self.cause.to_dict(), "isolate": self.isolate.to_dict(),
                "disentangle": self.disentangle.to_dict(),
                "per_attribute_cause": {a: s.to_dict() for a, s in self.per_cause.items()},
                "per_pair_isolate": {f"{a}|{b}": s.to_dict() for (a, b), s in self.per_isolate.items()}}


def _proportion(h: Tensor) -> Score:
    p = float(h.double().mean())
    return Score(p, wilson_interval(p, int(h.numel())), int(h.numel()))


def stratified_interval(groups: Sequence[Tensor], weights: Sequence[float], seed: int = 0,
                        resamples: int = RESAMPLES) -> tuple[float, float]:
    """Percentile 95 % interval of ``sum_g w_g mean(groups[g])``, each group resampled on its own."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.zeros(resamples, dtype=torch.float64)
    for g, w in zip(groups, weights):
        x = g.double().flatten()
        if x.numel() < 2:
            raise DisentangleError(f"a group of {x.numel()} pairs cannot be bootstrapped; use at least 2 pairs per set")
        idx = torch.randint(0, x.numel(), (resamples, x.numel()), generator=gen)  # [B, n_g]
        draws += w * x[idx].mean(1)
    lo, hi = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(lo), float(hi)


def _average(groups: Sequence[Tensor], seed: int) -> Score:
    w = [1.0 / len(groups)] * len(groups)
    value = float(sum(wi * float(g.double().mean()) for g, wi in zip(groups, w)))
    lo, hi = stratified_interval(groups, w, seed)
    return Score(value, (min(lo, value), max(hi, value)), int(sum(g.numel() for g in groups)))


def _alignment(places: Mapping[str, Place], attribute: str) -> Alignment:
    if attribute not in places:
        raise DisentangleError(f"the featurizer places {list(places)}, not attribute {attribute!r}; "
                               "give every attribute of the data a place")
    return Alignment({attribute: places[attribute]})


def disentangle(model: nn.Module, data: DisentangleData, places: Mapping[str, Place],
                readout: Readout = identity_readout, seed: int = 0) -> DisentangleResult:
    """Cause, Isolate and Disentangle of ``places`` (attribute -> where its features are) on ``data``."""
    if not data.isolate:
        raise DisentangleError("disentanglement needs at least one isolate set (an attribute asked about while "
                               "another is intervened on); the data has only cause sets")
    cause_hits: dict[str, Tensor] = {}
    isolate_hits: dict[tuple[str, str], Tensor] = {}
    try:
        for a, d in data.cause.items():
            cause_hits[a] = hits(model, d, _alignment(places, a), readout)
        for (a, b), d in data.isolate.items():
            isolate_hits[(a, b)] = hits(model, d, _alignment(places, a), readout)
    except CounterfactualError as e:
        raise DisentangleError(f"cannot score disentanglement: {e}") from None
    cause = _average(list(cause_hits.values()), seed)
    isolate = _average(list(isolate_hits.values()), seed + 1)
    groups = list(cause_hits.values()) + list(isolate_hits.values())
    w = [0.5 / len(cause_hits)] * len(cause_hits) + [0.5 / len(isolate_hits)] * len(isolate_hits)
    value = 0.5 * (cause.value + isolate.value)
    lo, hi = stratified_interval(groups, w, seed + 2)
    both = Score(value, (min(lo, value), max(hi, value)), int(sum(g.numel() for g in groups)))
    return DisentangleResult(cause, isolate, both, {a: _proportion(h) for a, h in cause_hits.items()},
                             {k: _proportion(h) for k, h in isolate_hits.items()}, cause_hits, isolate_hits)


def contrast(a: DisentangleResult, b: DisentangleResult, metric: str = "disentangle", seed: int = 0) -> Contrast:
    """``metric(a) − metric(b)`` on the same pairs, with a paired (stratified) bootstrap interval.

    ``metric``: ``cause``, ``isolate`` or ``disentangle``. Both results must come from the
    same data (the same kept pairs in every set).
    """
    if metric not in ("cause", "isolate", "disentangle"):
        raise DisentangleError(f"metric must be 'cause', 'isolate' or 'disentangle', got {metric!r}")
    parts = []
    if metric in ("cause", "disentangle"):
        parts.append((a.cause_hits, b.cause_hits, 1.0 if metric == "cause" else 0.5))
    if metric in ("isolate", "disentangle"):
        parts.append((a.isolate_hits, b.isolate_hits, 1.0 if metric == "isolate" else 0.5))
    diffs, weights = [], []
    for ha, hb, share in parts:
        if set(ha) != set(hb) or any(ha[k].shape != hb[k].shape for k in ha):
            raise DisentangleError("the two results were scored on different pairs; score both on the same data")
        for k in ha:
            diffs.append(ha[k].double() - hb[k].double())
            weights.append(share / len(ha))
    value = float(sum(w * float(d.mean()) for d, w in zip(diffs, weights)))
    lo, hi = stratified_interval(diffs, weights, seed)
    va, vb = getattr(a, metric).value, getattr(b, metric).value
    return Contrast(value, (min(lo, value), max(hi, value)), int(sum(d.numel() for d in diffs)), va, vb)
