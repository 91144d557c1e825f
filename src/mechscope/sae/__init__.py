"""Sparse dictionaries: sparse autoencoders and transcoders.

- :mod:`~mechscope.sae.arch`: :class:`SAEConfig`, :class:`SAE` (relu, topk, batchtopk,
  jumprelu, matryoshka; autoencoders, transcoders, skip transcoders), folding;
- :mod:`~mechscope.sae.train`: :class:`TrainConfig`, :class:`Trainer`, :func:`train`;
- :mod:`~mechscope.sae.data`: training data from an activation store or a live model;
- :mod:`~mechscope.sae.evals` / :mod:`~mechscope.sae.splice`: metrics with fixed definitions;
- :mod:`~mechscope.sae.featurizer`: an SAE as a featurizer, for interchange interventions;
- :mod:`~mechscope.sae.saelens` / :mod:`~mechscope.sae.io`: the SAELens on-disk layout, our own;
- :mod:`~mechscope.sae.pages`: static HTML feature pages;
- data-parallel training under torchrun: :mod:`mechscope.core.distributed` (:class:`Comm`).

The architectures and the trainer are imported with the package (``train`` is both a
submodule and the function: the function wins here); the rest on first use.
"""

from __future__ import annotations

from mechscope.core.lazy import lazy_exports
from mechscope.sae.arch import SAE, SAEConfig, SAEError, fold_decoder_norm, fold_scale, to_jumprelu
from mechscope.sae.train import TrainConfig, Trainer, TrainResult, train

_EXPORTS = {
    **dict.fromkeys(["train_many", "live_activations", "store_batches"], "mechscope.sae.data"),
    **dict.fromkeys(["evaluate", "mmcs", "matched_correlation", "recovered_fraction", "density_histogram"],
                    "mechscope.sae.evals"),
    **dict.fromkeys(["ce_loss_recovered"], "mechscope.sae.splice"),
    "SAEFeaturizer": "mechscope.sae.featurizer",
    **dict.fromkeys(["save_saelens", "load_saelens"], "mechscope.sae.saelens"),
    **dict.fromkeys(["save_sae", "load_sae"], "mechscope.sae.io"),
    "feature_pages": "mechscope.sae.pages",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
