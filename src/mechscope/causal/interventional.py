"""A featurizer trained on interventions, with a learned assignment of features to variables.

The talk's proposal (hypotheses spec, "Featurizers from interventional data"): instead of
a dictionary fitted to the observational distribution of activations (an SAE), train one
on counterfactual data -- interchange interventions of a causal model with several
variables -- and let it find both the features and which variable each belongs to.

:class:`InterventionalDictionary` is one orthonormal dictionary of ``n_features`` features
at a site (``n_features = d``: a full rotation; every direction a feature) and, per
variable, a learned soft mask over those features, ``sigmoid(logit / T)``. A training
example intervenes on some of the variables, each from its own source; the site becomes

    x_b + sum_v ((x_{s_v} - x_b) B ⊙ m_v) Bᵀ

and the loss is the cross-entropy to the counterfactual label, plus a sparsity penalty
``l1 · sum_v sum_j m_v[j]`` and an exclusivity penalty ``λ · sum_j sum_{u<v} m_u[j] m_v[j]``
(a feature claimed by two variables costs). ``T`` anneals as in DBM, so the masks end
binary; the hard assignment gives each feature to at most one variable (a contested one
to the larger logit). The dictionary and all the masks train together, on the data of
all variables at once -- unlike DAS and multi-task DAS, where each variable's features are
fixed in advance (a block of columns, or a separate subspace per variable).

The result is an ordinary :class:`~mechscope.causal.alignment.Alignment` (one basis,
disjoint features per variable), scored by IIA or by disentanglement like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from mechscope.causal.alignment import Alignment, AlignmentError
from mechscope.causal.counterfactual import CounterfactualData
from mechscope.causal.das import FitConfig, FitResult, fit, frozen, widths_of
from mechscope.causal.dbm import ANNEAL_FRACTION, L1, TEMPERATURE, MaskAlignment
from mechscope.causal.engine import Readout, identity_readout, make_engine
from mechscope.causal.stiefel import StiefelSubspace
from mechscope.core.site import Site

# a feature held by two variables costs this much per unit of overlap; set before any run, so that
# one fully shared feature (0.01) outweighs the sparsity cost of one held feature (L1 = 1e-4) 100x
EXCLUSIVITY = 1e-2


@dataclass(frozen=True)
class DictionaryConfig:
    """The dictionary's width (None: the site's width, a full rotation) and its penalties."""

    n_features: int | None = None
    l1: float = L1
    exclusivity: float = EXCLUSIVITY
    temperature: tuple[float, float] = TEMPERATURE
    anneal_fraction: float = ANNEAL_FRACTION

    def __post_init__(self) -> None:
        if self.n_features is not None and self.n_features < 1:
            raise AlignmentError(f"n_features must be >= 1 (or None for the site's width), got {self.n_features}")
        if self.l1 < 0 or self.exclusivity < 0:
            raise AlignmentError(f"penalties must be >= 0, got l1={self.l1}, exclusivity={self.exclusivity}")


class InterventionalDictionary(MaskAlignment):
    """One trainable orthonormal dictionary at a site, and a learned soft mask per variable over it."""

    def __init__(self, site: Site, variables: Sequence[str], width: int, cfg: DictionaryConfig = DictionaryConfig(),
                 seed: int = 0) -> None:
        variables = list(variables)
        if len(variables) < 1 or len(set(variables)) != len(variables):
            raise AlignmentError(f"give one or more distinct variables, got {variables}")
        m = cfg.n_features or width
        if m > width:
            raise AlignmentError(f"an orthonormal dictionary of a {width}-wide site holds at most {width} features, "
                                 f"asked for {m}")
        if m < len(variables):
            raise AlignmentError(f"{len(variables)} variables need at least {len(variables)} features, got {m}")
        basis = StiefelSubspace(width, m, seed=seed)
        super().__init__({v: site for v in variables}, {v: basis for v in variables}, cfg.l1, cfg.temperature,
                         cfg.anneal_fraction)
        basis.requires_grad_(True)  # the parent holds its featurizers fixed; this dictionary is learnt
        self.basis, self.exclusivity, self.variables = basis, cfg.exclusivity, variables
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # a small random start, so that the variables' masks are not born identical
            for v in variables:
                self.logits[v].copy_(0.01 * torch.randn(m, generator=gen))

    def masks(self) -> Tensor:  # [variables, n_features]
        return torch.stack([self.mask(v) for v in self.variables])

    def penalty(self) -> Tensor:
        m = self.masks()
        overlap = (m.sum(0) ** 2 - (m ** 2).sum(0)) / 2  # [n_features]: sum over pairs u < v of m_u m_v
        return self.l1 * m.sum() + self.exclusivity * overlap.sum()

    def mix_site(self, variables: Sequence[str], base: Tensor, sources: Sequence[Tensor]) -> Tensor:
        """Every variable from its own source, all read off the unmixed base (one projection)."""
        b = self.basis.basis().to(base.dtype)  # [d, m]
        feats = sum(((s - base) @ b) * self.mask(v).to(base.dtype) for v, s in zip(variables, sources))
        return base + feats @ b.T

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.logits.parameters()) + [self.basis.weight], "lr": lr}]

    def before_step(self) -> None:
        self.basis.project_grad()

    def after_step(self) -> None:
        self.basis.retract()

    def assignment(self) -> dict[str, tuple[int, ...]]:
        """The learned hard assignment: variable -> its features (disjoint)."""
        return self.hard_features()


def train_dictionary(model: nn.Module, data: CounterfactualData, site: Site, readout: Readout = identity_readout, *,
                     cfg: FitConfig = FitConfig(), dictionary: DictionaryConfig = DictionaryConfig(),
                     ) -> tuple[Alignment, FitResult, InterventionalDictionary]:
    """Train the dictionary and the masks of every variable of ``data`` at ``site``.

    ``data`` holds the interventions of all the variables at once (e.g.
    :func:`~mechscope.causal.counterfactual.combine` of one set per variable and kind).
    """
    with frozen(model):
        engine = make_engine(model, data, {v: site for v in data.variables}, readout, cfg.engine)
        width = widths_of(engine, [site])[site]
    trainable = InterventionalDictionary(site, data.variables, width, dictionary, cfg.seed)
    result = fit(model, data, trainable, readout, cfg, engine)
    return trainable.alignment(), result, trainable

