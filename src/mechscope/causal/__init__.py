"""Causal abstraction: does a network implement an algorithm, and where?

- :mod:`~mechscope.causal.model` -- ``CausalModel`` / ``Variable``: the hypothesis.
- :mod:`~mechscope.causal.counterfactual` -- ``make_counterfactuals``: (base, sources, label).
- :mod:`~mechscope.causal.alignment` -- ``Alignment`` / ``Place``: variable -> site, featurizer, features.
- :mod:`~mechscope.causal.iia` -- ``iia``: interchange-intervention accuracy.
- :mod:`~mechscope.causal.das` -- ``das``, ``fit``: Distributed Alignment Search (low-rank or rotation);
  :mod:`~mechscope.causal.boundless` (Boundless DAS), :mod:`~mechscope.causal.dbm` (binary masks),
  :mod:`~mechscope.causal.search` (brute-force / greedy localist search), :mod:`~mechscope.causal.baselines`
  (random subspace, full vector, PCA), :mod:`~mechscope.causal.compare` (all of them with their controls).
- :mod:`~mechscope.causal.engine` -- running only the network after a site (the replay of
  :mod:`mechscope.core.replay`).
- :mod:`~mechscope.causal.persist` -- ``save_alignment`` / ``load_alignment``.

Classes and helpers whose names are not module names load on first use
(``from mechscope.causal import CausalModel, Alignment, make_counterfactuals``); the
functions named like their modules come from the modules
(``from mechscope.causal.das import das``, ``from mechscope.causal.iia import iia``).
"""

from __future__ import annotations

from mechscope.core.lazy import lazy_exports

_EXPORTS = {
    "CausalModel": "model", "Variable": "model", "CausalModelError": "model",
    "CounterfactualData": "counterfactual", "make_counterfactuals": "counterfactual", "combine": "counterfactual",
    "Alignment": "alignment", "Place": "alignment", "AlignmentError": "alignment",
    "IIAResult": "iia", "fit": "das", "FitConfig": "das",
    "boundless_das": "boundless", "search_alignments": "search",
    "random_subspace": "baselines", "full_vector": "baselines", "pca_basis": "baselines",
    "save_alignment": "persist", "load_alignment": "persist",
}


__getattr__, __dir__ = lazy_exports(__name__, {name: f".{module}" for name, module in _EXPORTS.items()})
