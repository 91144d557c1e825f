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
in one table with DAS, neurons and the random subspace (:func:`he_table`, :func:`pt_table`:
the tables the bench's rows read). Two methods meet here (a
dictionary from ``sae`` and the search of ``causal``), so this lives in the bench, above
both.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mechscope.causal.compare import MethodResult, SearchSettings, compare, evaluate
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
from mechscope.tasks import hierarchical_equality as he
from mechscope.tasks import price_tagging as pt


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


# -- the bench's two tables ---------------------------------------------------------------
HE_SAE = dict(d_sae=64, k=4, steps=2000, batch_size=1024)  # 4x the 16 hidden units, a quarter of them active


@functools.lru_cache(maxsize=2)
def he_table(seed: int, full: bool) -> dict[str, Any]:
    """IIA at hidden layer 0 of DAS, neurons (search and masking), SAE features (same), random subspace."""
    n_train, n_test = (50_000, 4000) if full else (10_000, 1000)
    fit = FitConfig(epochs=20 if full else 10, seed=seed)
    search = SearchSettings(n=1000, sizes=tuple(range(1, 9))) if full else SearchSettings(n=200, sizes=(1, 2, 4, 8))
    model = he.train(he.TrainConfig(seed=seed), log=lambda *a: None)[0] if full else he.load_model()
    site = he.site(0)
    train_sets = {w: he.counterfactuals(n_train, 7000 + 10 * seed + i, w) for i, w in enumerate(he.INTERVENTIONS)}
    tests = {w: he.counterfactuals(n_test, 7100 + 10 * seed + i, w) for i, w in enumerate(he.INTERVENTIONS)}
    table = compare(model, train_sets, tests, site, he.VARIABLES, 8, ("das", "neurons", "dbm"), fit=fit, search=search)
    sample = lambda n, gen: he.to_model_inputs(he.sample(n, gen))  # noqa: E731 - the task's input distribution
    sae_cfg = SAEConfig(d_in=16, d_sae=HE_SAE["d_sae"], arch="topk", k=HE_SAE["k"])
    trained = train_site_sae(model, sample, site, sae_cfg, TrainConfig(steps=HE_SAE["steps"], batch_size=HE_SAE["batch_size"],
                                                                       progress=False, seed=seed), seed=seed)
    sae_res = score_features(model, SAEFeaturizer(trained.sae), train_sets, tests, site, he.VARIABLES, search, fit)
    table.update({"sae_search": sae_res["search"], "sae_dbm": sae_res["dbm"]})
    return {"table": table, "tests": list(tests), "sae_fvu": trained.history[-1]["fvu"], "sae_l0": trained.history[-1]["l0"],
            "setting": "full" if full else "reduced", "n_train": 3 * n_train, "n_test": n_test, "model": model,
            "test_sets": tests}


@functools.lru_cache(maxsize=2)
def pt_table(seed: int, n_train: int = 20_000, n_test: int = 4000, epochs: int = 20, search_n: int = 1000,
              sae_steps: int = 2000, retrain: bool = True) -> dict[str, Any]:
    """Per block's output at the "?" position: Boundless DAS, neurons and SAE features for L = [Z >= X].

    The defaults are the published sizes (``--full``); smaller ones give a quick smoke run.
    """
    model = pt.train(pt.TrainConfig(seed=seed), log=lambda *a: None)[0] if retrain else pt.load_model()
    fit, search = FitConfig(epochs=epochs, batch_size=256, seed=seed), SearchSettings(n=search_n, sizes=(1, 2, 4, 8))
    train_sets = {"L": pt.counterfactuals(n_train, 7300 + seed, "L")}
    tests = {"L": pt.counterfactuals(n_test, 7400 + seed, "L")}
    sample = lambda n, gen: pt.to_model_inputs(pt.sample(n, gen))  # noqa: E731
    layers = {}
    for layer in range(pt.MODEL.n_layers):
        site = pt.site(layer)
        table = compare(model, train_sets, tests, site, ("L",), 8, ("boundless", "neurons"), readout=pt.readout,
                        fit=fit, search=search)
        sae_cfg = SAEConfig(d_in=pt.MODEL.d_model, d_sae=256, arch="topk", k=8)
        trained = train_site_sae(model, sample, site, sae_cfg, TrainConfig(steps=sae_steps, batch_size=1024, progress=False,
                                                                            seed=seed), n_rows=50_000, seed=seed)
        sae_res = score_features(model, SAEFeaturizer(trained.sae), train_sets, tests, site, ("L",), search, fit,
                                 readout=pt.readout)
        table.update({"sae_search": sae_res["search"], "sae_dbm": sae_res["dbm"]})
        layers[layer] = {"table": table, "fvu": trained.history[-1]["fvu"]}
    return {"layers": layers, "model": model, "tests": tests}
