"""Brute-force search over feature-aligned alignments (neurons, PCA components, any basis).

A *localist* alignment gives each variable a set of coordinates of a fixed basis (the
neurons themselves, or PCA components): ``{WX: {1, 4, 9}, YZ: {0, 2}}``. For each size
``k`` in ``sizes`` every variable gets ``k`` coordinates, disjoint from the others'.

- **exhaustive** when the number of such assignments is at most ``max_exhaustive``:
  every one is scored;
- otherwise **greedy forward selection** (stated, not exhaustive): starting from empty
  sets, the variables take turns adding the one unused coordinate that raises the score
  most, until each has ``k``.

The score of an alignment is its mean IIA over the given datasets (e.g. WX alone, YZ
alone, both), measured on examples the model gets right. Candidates are scored many at
a time: each is a 0/1 feature mask per example row, and the network after the site runs
once on the stacked rows (the tail engine makes that cheap).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from mechscope.causal.alignment import Alignment, AlignmentError, Place, mask_interchange
from mechscope.causal.counterfactual import CounterfactualData
from mechscope.causal.engine import Engine, Readout, identity_readout, make_engine
from mechscope.causal.iia import keep_correct
from mechscope.core.featurize import Featurizer
from mechscope.core.site import Site

Candidate = tuple[tuple[int, ...], ...]  # one sorted tuple of feature indices per variable


@dataclass
class SearchResult:
    """The best alignment found, its score and per-dataset IIA, and how it was searched."""

    alignment: Alignment
    score: float
    scores: dict[str, float]
    sizes: dict[int, str] = field(default_factory=dict)  # size -> "exhaustive" | "greedy"
    evaluated: int = 0
    best_by_size: dict[int, float] = field(default_factory=dict)

    def describe(self) -> str:
        how = ", ".join(f"k={k}: {m}" for k, m in self.sizes.items())
        return f"best {self.alignment.describe()} score {self.score:.3f} ({how}; {self.evaluated} alignments scored)"


def count_assignments(n_features: int, n_vars: int, k: int) -> int:
    """Ways to give each of ``n_vars`` variables ``k`` of ``n_features`` coordinates, disjoint."""
    if n_vars * k > n_features:
        return 0
    return math.factorial(n_features) // (math.factorial(k) ** n_vars * math.factorial(n_features - n_vars * k))


def all_assignments(n_features: int, n_vars: int, k: int) -> list[Candidate]:
    out: list[Candidate] = []

    def rec(prefix: tuple, free: tuple[int, ...]) -> None:
        if len(prefix) == n_vars:
            out.append(prefix)
            return
        for chosen in itertools.combinations(free, k):
            rec(prefix + (chosen,), tuple(f for f in free if f not in chosen))

    rec((), tuple(range(n_features)))
    return out


class _Scorer:
    """Mean IIA over datasets of many candidates at once, memoised per dataset projection."""

    def __init__(self, engines: Mapping[str, Engine], labels: Mapping[str, Tensor], variables: Sequence[str],
                 featurizer: Featurizer, datasets: Mapping[str, CounterfactualData], row_budget: int) -> None:
        self.engines, self.labels, self.variables, self.featurizer = engines, labels, list(variables), featurizer
        self.active = {name: [i for i, v in enumerate(self.variables) if v in d.variables] for name, d in datasets.items()}
        self.memo: dict[str, dict[Candidate, float]] = {name: {} for name in engines}
        self.row_budget = row_budget
        self.evaluated = 0

    def scores(self, cands: list[Candidate]) -> list[float]:
        total = torch.zeros(len(cands), dtype=torch.float64)
        for name in self.engines:
            proj = [tuple(c[i] for i in self.active[name]) for c in cands]
            todo = list(dict.fromkeys(p for p in proj if p not in self.memo[name]))
            self._evaluate(name, todo)
            total += torch.tensor([self.memo[name][p] for p in proj], dtype=torch.float64)
        self.evaluated += len(cands)
        return (total / len(self.engines)).tolist()

    def _evaluate(self, name: str, projs: list[Candidate]) -> None:
        eng, labels, n = self.engines[name], self.labels[name], self.engines[name].n
        names = [self.variables[i] for i in self.active[name]]
        per_chunk = max(1, self.row_budget // n)
        for start in range(0, len(projs), per_chunk):
            chunk = projs[start:start + per_chunk]
            masks = {v: torch.zeros(len(chunk), self.featurizer.n_features) for v in names}  # [C, F]
            for c, proj in enumerate(chunk):
                for v, feats in zip(names, proj):
                    masks[v][c, list(feats)] = 1.0
            rows = {v: m.repeat_interleave(n, dim=0) for v, m in masks.items()}  # [C*n, F]
            idx = torch.arange(n).repeat(len(chunk))
            mix = lambda v, b, s: mask_interchange(self.featurizer, rows[v], b, s)  # noqa: E731
            with torch.no_grad():
                hit = (eng.logits(idx, mix).argmax(-1) == labels.index_select(0, idx)).view(len(chunk), n)
            for proj, acc in zip(chunk, hit.double().mean(1).tolist()):
                self.memo[name][proj] = acc


def _greedy(scorer: _Scorer, n_vars: int, n_features: int, k: int) -> tuple[Candidate, float]:
    sets: list[tuple[int, ...]] = [() for _ in range(n_vars)]
    best = float("-inf")
    for _ in range(k):
        for v in range(n_vars):
            used = {f for s in sets for f in s}
            options = [tuple(sorted(sets[v] + (f,))) for f in range(n_features) if f not in used]
            cands = [tuple(o if i == v else sets[i] for i in range(n_vars)) for o in options]
            scores = scorer.scores(cands)
            j = max(range(len(cands)), key=scores.__getitem__)
            sets, best = list(cands[j]), scores[j]
    return tuple(sets), best


def search_alignments(model: nn.Module, datasets: Mapping[str, CounterfactualData], site: Site,
                      featurizer: Featurizer, variables: Sequence[str], sizes: Sequence[int],
                      readout: Readout = identity_readout, *, max_exhaustive: int = 20_000,
                      row_budget: int = 400_000, engine: str = "auto") -> SearchResult:
    """The best localist alignment of ``variables`` at ``site`` in ``featurizer``'s basis."""
    variables = list(variables)
    if not sizes or any(k < 1 for k in sizes):
        raise AlignmentError(f"sizes must be positive feature counts, got {list(sizes)}")
    too_big = [k for k in sizes if k * len(variables) > featurizer.n_features]
    if too_big:
        raise AlignmentError(f"sizes {too_big} give {len(variables)} variables more than the featurizer's "
                             f"{featurizer.n_features} features together; use sizes up to {featurizer.n_features // len(variables)}")
    was = model.training
    model.eval()
    try:
        kept = {name: keep_correct(model, d, readout) for name, d in datasets.items()}
        engines = {name: make_engine(model, d, {v: site for v in d.variables}, readout, engine) for name, d in kept.items()}
        width = int(next(iter(engines.values())).base_views(site, torch.arange(1)).shape[-1])
        Alignment({variables[0]: Place(site, featurizer)}).check_width(site, width)
        scorer = _Scorer(engines, {n: d.labels for n, d in kept.items()}, variables, featurizer, kept, row_budget)
        result, best = None, float("-inf")
        methods, by_size = {}, {}
        for k in sizes:
            if count_assignments(featurizer.n_features, len(variables), k) <= max_exhaustive:
                cands = all_assignments(featurizer.n_features, len(variables), k)
                scores = scorer.scores(cands)
                j = max(range(len(cands)), key=scores.__getitem__)
                cand, score, methods[k] = cands[j], scores[j], "exhaustive"
            else:
                (cand, score), methods[k] = _greedy(scorer, len(variables), featurizer.n_features, k), "greedy"
            by_size[k] = score
            if score > best:
                best, result = score, cand
    finally:
        model.train(was)
    alignment = Alignment({v: Place(site, featurizer, feats) for v, feats in zip(variables, result)})
    per = {name: scorer.memo[name][tuple(result[i] for i in scorer.active[name])] for name in engines}
    return SearchResult(alignment, best, per, methods, scorer.evaluated, by_size)
