"""SAE features scored by interchange-intervention accuracy, like neurons and DAS.

An SAE trained on a site's activations becomes a featurizer (latents, with the error
term added back: :class:`~mechscope.sae.featurizer.SAEFeaturizer`), and the alignment of
each high-level variable to a set of its latents is found exactly as for neurons:

- **search**: the localist search of :func:`mechscope.causal.search.search_alignments`
  (exhaustive where the number of assignments allows, greedy forward selection
  otherwise), over the same sizes;
- **masking**: differentiable binary masking (:func:`mechscope.causal.dbm.dbm`) over
  the latents instead of the neurons.

Both are then scored by the same IIA on held-out counterfactuals, so SAE features land
in one table with DAS, neurons and the random subspace. Two methods meet here (a
dictionary from ``sae`` and the search of ``causal``), so this lives in the bench, above
both.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mechscope.causal.compare import MethodResult, SearchSettings, evaluate
from mechscope.causal.counterfactual import CounterfactualData, combine
from mechscope.causal.das import FitConfig
from mechscope.causal.dbm import dbm
from mechscope.causal.engine import Readout, identity_readout
from mechscope.causal.search import search_alignments
from mechscope.core.collect import activations
from mechscope.core.site import Site
from mechscope.sae.arch import SAEConfig
from mechscope.sae.featurizer import SAEFeaturizer
from mechscope.sae.train import TrainConfig, TrainResult, train


def train_site_sae(model: nn.Module, sample: Callable[[int, torch.Generator], Tensor], site: Site,
                   sae_cfg: SAEConfig, cfg: TrainConfig, n_rows: int = 200_000, seed: int = 0) -> TrainResult:
    """Train a dictionary on ``n_rows`` activations of ``site`` over inputs drawn by ``sample(n, generator)``."""
    gen = torch.Generator().manual_seed(seed)
    rows = activations(model, sample(n_rows, gen), site, batch_size=8192)  # [n_rows, d]

    def stream():
        g = torch.Generator().manual_seed(seed + 1)
        while True:
            yield rows[torch.randint(rows.shape[0], (cfg.batch_size,), generator=g)]

    return train(sae_cfg, cfg, stream())


def score_features(model: nn.Module, featurizer: SAEFeaturizer, train_sets: Mapping[str, CounterfactualData],
                   tests: Mapping[str, CounterfactualData], site: Site, variables: Sequence[str],
                   search: SearchSettings = SearchSettings(), fit: FitConfig = FitConfig(),
                   readout: Readout = identity_readout) -> dict[str, MethodResult]:
    """IIA of SAE-feature alignments found by search (``"search"``) and by masking (``"dbm"``)."""
    out: dict[str, MethodResult] = {}
    t0 = time.perf_counter()
    small = {k: d.subset(torch.arange(min(search.n, len(d)))) for k, d in train_sets.items()}
    sizes = tuple(k for k in search.sizes if k * len(variables) <= featurizer.n_features)
    found = search_alignments(model, small, site, featurizer, variables, sizes, readout,
                              max_exhaustive=search.max_exhaustive)
    out["search"] = MethodResult("sae_search", found.alignment, evaluate(model, found.alignment, tests, readout),
                                 time.perf_counter() - t0, {"search": {str(k): m for k, m in found.sizes.items()},
                                                            "best_by_size": found.best_by_size})
    t0 = time.perf_counter()
    data = combine(list(train_sets.values()))
    alignment, res = dbm(model, data, site, readout, featurizer=featurizer, cfg=fit)
    out["dbm"] = MethodResult("sae_dbm", alignment, evaluate(model, alignment, tests, readout),
                              time.perf_counter() - t0, {"loss": res.losses[-1]})
    for r in out.values():
        r.info["features"] = {v: list(r.alignment[v].features or ()) for v in variables}
    return out
