"""Two alignments compared on the same interchange pairs: the IIA difference and its interval.

A finding such as "DAS beats masking over neurons by at least 0.05" compares two IIAs
measured on the *same* test pairs, so its uncertainty is that of a paired difference:
each kept pair gives 1 or 0 for each alignment, and the interval is a percentile
bootstrap over the pairs of the per-pair difference (the hypotheses spec: "a paired
bootstrap of the IIA difference gives a confidence interval"). Both alignments are scored
on the pairs the network gets right without intervention, exactly as
:func:`mechscope.causal.iia.iia` does, so ``hits(...).float().mean()`` is that IIA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from mechscope.causal.alignment import Alignment
from mechscope.causal.counterfactual import CounterfactualData
from mechscope.causal.engine import Readout, identity_readout, make_engine
from mechscope.causal.iia import keep_correct
from mechscope.core.stats import bootstrap_interval


def hits(model: nn.Module, data: CounterfactualData, alignment: Alignment, readout: Readout = identity_readout,
         batch_size: int = 4096) -> Tensor:
    """[kept] bool: for each pair the model gets right unintervened, whether the interchange
    under ``alignment`` gives the counterfactual label (their mean is the IIA)."""
    was = model.training
    model.eval()
    try:
        kept = keep_correct(model, data, readout, batch_size)
        mixer = alignment.restrict(kept.variables).mixer()
        eng = make_engine(model, kept, {v: alignment[v].site for v in kept.variables}, readout)
        out = []
        with torch.no_grad():
            for start in range(0, eng.n, batch_size):
                idx = torch.arange(start, min(start + batch_size, eng.n))
                out.append(eng.logits(idx, mixer).argmax(-1) == kept.labels.index_select(0, idx))
    finally:
        model.train(was)
    return torch.cat(out)


@dataclass(frozen=True)
class Contrast:
    """IIA(a) − IIA(b) on ``n`` shared pairs, with its paired-bootstrap 95 % interval."""

    value: float
    interval: tuple[float, float]
    n: int
    iia_a: float
    iia_b: float

    def to_dict(self) -> dict[str, Any]:
        return {"difference": self.value, "ci95": list(self.interval), "n": self.n, "iia_a": self.iia_a,
                "iia_b": self.iia_b}


def paired_contrast(hits_a: Tensor, hits_b: Tensor, seed: int = 0) -> Contrast:
    """The mean of ``hits_a − hits_b`` on the same pairs and its bootstrap interval.

    ``hits_a``, ``hits_b``: [n] bool, or [m, n] for m sites scored on the same n pairs
    (e.g. one per layer), whose difference is then averaged over the sites pair by pair
    (MIB's average over layers) before resampling the pairs.
    """
    if hits_a.shape != hits_b.shape or hits_a.ndim not in (1, 2):
        raise ValueError(f"paired hits must be two [n] (or [sites, n]) tensors on the same pairs, got "
                         f"{tuple(hits_a.shape)} and {tuple(hits_b.shape)}")
    a, b = hits_a.double().reshape(-1, hits_a.shape[-1]), hits_b.double().reshape(-1, hits_b.shape[-1])  # [m, n]
    diff = (a - b).mean(0)  # [n]: in {-1, 0, 1} for one site
    value = float(diff.mean())
    lo, hi = bootstrap_interval(diff, seed=seed)
    # the percentile interval of a constant (identical alignments) is that constant; keep the value inside
    lo, hi = min(lo, value), max(hi, value)
    return Contrast(value, (lo, hi), int(diff.numel()), float(a.mean()), float(b.mean()))


def contrasts(model: nn.Module, tests: Mapping[str, CounterfactualData], a: Alignment, b: Alignment,
              readout: Readout = identity_readout, seed: int = 0) -> dict[str, Contrast]:
    """IIA(a) − IIA(b) on every test set whose variables both alignments place."""
    out = {}
    for name, data in tests.items():
        if all(v in a.places and v in b.places for v in data.variables):
            out[name] = paired_contrast(hits(model, data, a, readout), hits(model, data, b, readout), seed)
    return out
