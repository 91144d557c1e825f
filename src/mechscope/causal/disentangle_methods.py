"""Every featurizer of RAVEL's comparison under one interface: ``method(setup) -> {attribute: Place}``.

A :class:`Setup` holds the frozen network, the site, the training (and validation)
:class:`~mechscope.causal.disentangle.DisentangleData` and the budgets. Each method returns
where it puts each attribute; :func:`mechscope.causal.disentangle.disentangle` scores them all
on the same test pairs.

- ``neurons`` / ``pca``: the localist search (:mod:`mechscope.causal.search`) over neurons or
  principal components, scored on the Cause and Isolate sets together (its score, the mean
  IIA over the sets, is the Disentangle of the training pairs);
- ``das``: low-rank DAS per attribute, trained on that attribute's Cause pairs only (RAVEL's DAS);
- ``multitask_das``: the same, trained on the attribute's Cause and Isolate pairs together
  (the interchange loss towards the source on A-queries and towards the base on B-queries;
  RAVEL's MDAS);
- ``dbm``: differentiable binary masking over neurons per attribute, on the same pairs as
  multi-task DAS;
- ``interventional``: one dictionary for all attributes with a learned assignment
  (:mod:`mechscope.causal.interventional`), on every Cause and Isolate pair at once;
- :func:`select_by_effect`: the features of any fixed featurizer (an SAE's latents, given
  by the caller: a method never imports another) chosen by their interchange effect on a
  validation split, the number kept chosen there too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mechscope.causal.alignment import Place, mask_interchange
from mechscope.causal.baselines import pca_basis, site_width
from mechscope.causal.counterfactual import combine
from mechscope.causal.das import FitConfig, das
from mechscope.causal.dbm import dbm
from mechscope.causal.disentangle import DisentangleData, DisentangleError
from mechscope.causal.engine import Readout, identity_readout, make_engine
from mechscope.causal.iia import engine_hits, keep_correct
from mechscope.causal.interventional import DictionaryConfig, train_dictionary
from mechscope.causal.search import search_alignments
from mechscope.core.featurize import Featurizer, Identity
from mechscope.core.site import Site

Places = dict[str, Place]


@dataclass(frozen=True)
class Setup:
    """What every featurizer method gets. ``sizes``: feature counts the searches and the selection try."""

    model: nn.Module
    site: Site
    train: DisentangleData
    validation: DisentangleData | None = None
    readout: Readout = identity_readout
    dims: int = 8
    fit: FitConfig = FitConfig()
    search_n: int = 200
    sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    dictionary: DictionaryConfig = field(default_factory=DictionaryConfig)
    info: dict = field(default_factory=dict)  # what each method reports (losses, sizes), filled as they run


def _search(s: Setup, basis: Featurizer, name: str) -> Places:
    attrs = s.train.attributes
    sizes = tuple(k for k in s.sizes if k * len(attrs) <= basis.n_features)
    res = search_alignments(s.model, s.train.subset(s.search_n).sets(), s.site, basis, attrs, sizes, s.readout)
    s.info[name] = {"search": {str(k): m for k, m in res.sizes.items()}, "best_by_size": res.best_by_size,
                    "features": {a: len(res.alignment[a].features or ()) for a in attrs}}
    return {a: res.alignment[a] for a in attrs}


def neurons(s: Setup) -> Places:
    return _search(s, Identity(site_width(s.model, s.train.cause[s.train.attributes[0]], s.site)), "neurons")


def pca(s: Setup) -> Places:
    data = combine(list(s.train.cause.values()))
    return _search(s, pca_basis(s.model, data, s.site), "pca")


def _per_attribute(s: Setup, name: str, train: Callable[[str], tuple]) -> Places:
    places, info = {}, {}
    for a in s.train.attributes:
        alignment, res = train(a)
        places[a] = alignment[a]
        info[a] = {"loss": res.losses[-1], "features": places[a].size}
    s.info[name] = info
    return places


def das_cause(s: Setup) -> Places:
    return _per_attribute(s, "das", lambda a: das(s.model, s.train.cause[a], s.site, s.dims, s.readout, cfg=s.fit))


def multitask_das(s: Setup) -> Places:
    return _per_attribute(s, "multitask_das", lambda a: das(
        s.model, combine(s.train.for_attribute(a), name=f"cause+isolate:{a}"), s.site, s.dims, s.readout, cfg=s.fit))


def dbm_neurons(s: Setup) -> Places:
    return _per_attribute(s, "dbm", lambda a: dbm(
        s.model, combine(s.train.for_attribute(a), name=f"cause+isolate:{a}"), s.site, s.readout, cfg=s.fit))


def interventional(s: Setup) -> Places:
    data = combine(list(s.train.sets().values()), name="every cause and isolate set")
    alignment, res, trained = train_dictionary(s.model, data, s.site, s.readout, cfg=s.fit, dictionary=s.dictionary)
    s.info["interventional"] = {"loss": res.losses[-1], "n_features": trained.basis.n_features,
                                "assignment": {a: list(f) for a, f in trained.assignment().items()}}
    return {a: alignment[a] for a in s.train.attributes}


METHODS: dict[str, Callable[[Setup], Places]] = {
    "neurons": neurons, "pca": pca, "das": das_cause, "multitask_das": multitask_das, "dbm": dbm_neurons,
    "interventional": interventional,
}


# -- a fixed featurizer's features, chosen by their effect on a validation split ----------
def _effects(model: nn.Module, data, site: Site, featurizer: Featurizer, readout: Readout, chunk: int) -> Tensor:
    """[n_features]: mean change of log p(counterfactual label) when one feature alone is interchanged."""
    kept = keep_correct(model, data, readout)
    eng = make_engine(model, kept, {v: site for v in kept.variables}, readout)
    n, m = len(kept), featurizer.n_features
    labels = kept.labels
    with torch.no_grad():
        before = F.log_softmax(eng.logits(torch.arange(n), lambda v, b, src: b), -1).gather(1, labels[:, None])[:, 0]
        out = torch.zeros(m)
        for start in range(0, m, chunk):
            feats = torch.arange(start, min(start + chunk, m))
            rows = F.one_hot(feats, m).float().repeat_interleave(n, dim=0)  # [c*n, m]
            idx = torch.arange(n).repeat(len(feats))
            logits = eng.logits(idx, lambda v, b, src, rows=rows: mask_interchange(featurizer, rows, b, src))
            after = F.log_softmax(logits, -1).gather(1, labels.index_select(0, idx)[:, None])[:, 0]
            out[feats] = (after - before.repeat(len(feats))).view(len(feats), n).mean(1)
    return out


def select_by_effect(s: Setup, featurizer: Featurizer, name: str = "selected", sizes: tuple[int, ...] | None = None,
                     chunk: int = 16) -> Places:
    """Per attribute: rank ``featurizer``'s features by their mean effect on the validation split's
    Cause and Isolate pairs (raising the log-probability of the counterfactual answer: the
    source's value on A-queries, the base's on B-queries), keep the top ``k`` for the ``k`` in
    ``sizes`` (default: every power of two up to the number of features) whose validation
    Disentangle of that attribute is highest. What it chose is in ``s.info[name]``."""
    if s.validation is None:
        raise DisentangleError("selecting features by their effect needs a validation split (Setup.validation)")
    places, info = {}, {}
    for a in s.validation.attributes:
        sets = s.validation.for_attribute(a)
        effect = torch.stack([_effects(s.model, d, s.site, featurizer, s.readout, chunk) for d in sets]).mean(0)
        order = effect.argsort(descending=True)
        scores = {}
        for k in sizes or tuple(2 ** i for i in range(featurizer.n_features.bit_length())):
            place = Place(s.site, featurizer, tuple(sorted(order[:k].tolist())))
            scores[k] = _validation_score(s, sets, place)
        best = max(scores, key=scores.__getitem__)
        places[a] = Place(s.site, featurizer, tuple(sorted(order[:best].tolist())))
        info[a] = {"features": best, "validation_score_by_size": scores, "top_effects": effect[order[:best]].tolist()}
    s.info[name] = info
    return places


def _validation_score(s: Setup, sets, place: Place) -> float:
    """Mean over the cause set and the isolate sets of one attribute of the IIA of ``place``."""
    vals = []
    for d in sets:
        kept = keep_correct(s.model, d, s.readout)
        eng = make_engine(s.model, kept, {kept.variables[0]: s.site}, s.readout)
        mix = lambda v, b, src: mask_interchange(place.featurizer, _mask(place), b, src)  # noqa: E731
        vals.append(float(engine_hits(eng, kept.labels, mix).double().mean()))
    return sum(vals) / len(vals)


def _mask(place: Place) -> Tensor:
    m = torch.zeros(place.featurizer.n_features)
    m[list(place.features or range(place.featurizer.n_features))] = 1.0
    return m


def run_all(s: Setup, methods: Mapping[str, Callable[[Setup], Places]] = METHODS) -> dict[str, Places]:
    """Every method's places, in order."""
    return {name: fn(s) for name, fn in methods.items()}
