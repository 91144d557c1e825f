"""Two alignments compared on the same interchange pairs: the IIA difference and its interval.

A finding such as "DAS beats masking over neurons by at least 0.05" compares two IIAs
measured on the *same* test pairs, so its uncertainty is that of a paired difference:
each kept pair gives 1 or 0 for each alignment, and the interval is a percentile
bootstrap over the pairs of the per-pair difference (the hypotheses spec: "a paired
bootstrap of the IIA difference gives a confidence interval"). Both alignments are scored
on the pairs the network gets right without intervention, exactly as
:func:`mechscope.causal.iia.iia` does, so ``hits(...).float().mean()`` is that IIA.

The pure pieces (``hits``, ``paired_contrast``, ``Contrast``) live in
:mod:`mechscope.causal.iia`, where hypotheses are compared the same way; this module
applies them to a bench's test sets.
"""

from __future__ import annotations

from typing import Mapping

from torch import nn

from mechscope.causal.alignment import Alignment
from mechscope.causal.counterfactual import CounterfactualData
from mechscope.causal.engine import Readout, identity_readout
from mechscope.causal.iia import Contrast, hits, paired_contrast

__all__ = ["Contrast", "contrasts", "hits", "paired_contrast"]


def contrasts(model: nn.Module, tests: Mapping[str, CounterfactualData], a: Alignment, b: Alignment,
              readout: Readout = identity_readout, seed: int = 0) -> dict[str, Contrast]:
    """IIA(a) − IIA(b) on every test set whose variables both alignments place."""
    out = {}
    for name, data in tests.items():
        if all(v in a.places and v in b.places for v in data.variables):
            out[name] = paired_contrast(hits(model, data, a, readout), hits(model, data, b, readout), seed)
    return out
