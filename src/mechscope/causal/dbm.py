"""Differentiable binary masking (DBM): which neurons (or features) hold a variable.

Each variable gets a logit per feature of a fixed basis (neurons by default; PCA
components or SAE latents work the same way); the interchange mixes base and source
features with the mask ``sigmoid(logit / T)``. The loss is the counterfactual
cross-entropy plus ``l1 * sum(mask)``; ``T`` anneals linearly from 1 to 0.001 over the
first half of training and then stays (the MIB baselines' defaults, as are ``l1 = 1e-4``
and the fit's lr 1e-2). For evaluation the mask is thresholded at 1/2 (logit > 0); a
feature two variables both claim goes to the one with the larger logit, and a variable
left with no feature gets its best one that no other variable holds.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from mechscope.causal.alignment import Alignment, AlignmentError, Place, mask_interchange
from mechscope.causal.counterfactual import CounterfactualData
from mechscope.causal.das import FitConfig, FitResult, Trainable, fit, frozen, widths_of
from mechscope.causal.engine import Readout, identity_readout, make_engine
from mechscope.core.featurize import Featurizer, Identity
from mechscope.core.site import Site

TEMPERATURE = (1.0, 0.001)
ANNEAL_FRACTION = 0.5
L1 = 1e-4


class MaskAlignment(Trainable):
    """A learnable soft mask per variable over a fixed featurizer's features."""

    def __init__(self, sites: Mapping[str, Site], featurizers: Mapping[str, Featurizer], l1: float = L1,
                 temperature: tuple[float, float] = TEMPERATURE, anneal_fraction: float = ANNEAL_FRACTION) -> None:
        super().__init__()
        self.sites, self.featurizers = dict(sites), dict(featurizers)
        for i, f in enumerate(dict.fromkeys(self.featurizers.values())):
            self.add_module(f"featurizer_{i}", f.requires_grad_(False))  # the basis is fixed
        self.logits = nn.ParameterDict({v: nn.Parameter(torch.zeros(f.n_features)) for v, f in self.featurizers.items()})
        self.l1, (self.t_start, self.t_end), self.anneal_fraction = l1, temperature, anneal_fraction
        self.temperature = self.t_start

    def mask(self, variable: str) -> Tensor:  # [n_features]
        return torch.sigmoid(self.logits[variable] / self.temperature)

    def mix(self, variable: str, base: Tensor, source: Tensor) -> Tensor:
        return mask_interchange(self.featurizers[variable], self.mask(variable), base, source)

    def penalty(self) -> Tensor:
        return self.l1 * sum(self.mask(v).sum() for v in self.logits)

    def schedule(self, progress: float) -> None:
        frac = min(max(progress / self.anneal_fraction, 0.0), 1.0)
        self.temperature = self.t_start + (self.t_end - self.t_start) * frac

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.logits.parameters()), "lr": lr}]

    def hard_features(self) -> dict[str, tuple[int, ...]]:
        """Features with logit > 0; a contested one goes to the larger logit.

        A variable left with none gets its highest-logit feature that no rival holds, or
        else one taken from a rival that holds several.
        """
        logits = {v: p.detach() for v, p in self.logits.items()}
        order = list(logits)
        rivals = {v: [u for u in logits if u != v and self.sites[u] == self.sites[v]
                      and self.featurizers[u] is self.featurizers[v]] for v in logits}
        keep = {}
        for v, lg in logits.items():
            mask = lg > 0
            for u in rivals[v]:
                mask &= (lg > logits[u]) | ((lg == logits[u]) & (order.index(v) < order.index(u)))
            keep[v] = mask
        for v in order:
            if not bool(keep[v].any()):
                self._give_one(v, logits[v], keep, rivals[v])
        return {v: tuple(torch.nonzero(keep[v]).flatten().tolist()) for v in order}

    @staticmethod
    def _give_one(v: str, logit: Tensor, keep: dict[str, Tensor], rivals: list[str]) -> None:
        taken = torch.zeros_like(keep[v])
        for u in rivals:
            taken |= keep[u]
        spare = taken.clone()  # features of rivals that hold more than one
        for u in rivals:
            if int(keep[u].sum()) <= 1:
                spare &= ~keep[u]
        for allowed in (~taken, spare):
            if bool(allowed.any()):
                f = int(logit.masked_fill(~allowed, float("-inf")).argmax())
                for u in rivals:
                    keep[u][f] = False
                keep[v][f] = True
                return
        raise AlignmentError(f"variable {v!r} gets no feature: its rivals hold one each of {int(taken.sum())}; "
                             "the basis has fewer features than variables")

    def alignment(self) -> Alignment:
        return Alignment({v: Place(self.sites[v], self.featurizers[v], f) for v, f in self.hard_features().items()})


def dbm(model: nn.Module, data: CounterfactualData, sites: Site | Mapping[str, Site],
        readout: Readout = identity_readout, *, featurizer: Featurizer | None = None,
        cfg: FitConfig = FitConfig(), l1: float = L1) -> tuple[Alignment, FitResult]:
    """DBM for every variable of ``data``; neurons unless another ``featurizer`` is given."""
    sites = {v: sites for v in data.variables} if isinstance(sites, Site) else {v: sites[v] for v in data.variables}
    with frozen(model):
        engine = make_engine(model, data, sites, readout, cfg.engine)
        widths = widths_of(engine, list(sites.values()))
    shared = {s: featurizer or Identity(widths[s]) for s in dict.fromkeys(sites.values())}
    trainable = MaskAlignment(sites, {v: shared[s] for v, s in sites.items()}, l1)
    result = fit(model, data, trainable, readout, cfg, engine)
    return trainable.alignment(), result
