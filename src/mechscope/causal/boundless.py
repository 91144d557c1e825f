"""Boundless DAS (Wu et al. 2023): a full rotation with a learned boundary.

Instead of fixing how many rotated dimensions hold the variable, Boundless DAS learns
it: the interchange mixes rotated base and source features with a soft mask

    m_i = sigmoid((c_i - 0) / T) * sigmoid((b * n - c_i) / T),   c_i = i + 1/2,  i = 0 .. n-1

over the ``n`` rotated coordinates, with the boundary ``b`` in [1e-3, 1] (init 0.5)
trained beside the rotation and the temperature ``T`` annealed linearly from 50 to 0.1
on the reference's n = 4096 (Alpaca-7B). ``T`` is in units of coordinates: it is how
many coordinates the mask's edge is soft over. At T = 50 a 4096-wide mask is sharp
(1 % of the width soft), a 16-wide one is a uniform blur whose only trainable effect is
"mix less", which drives any small model's boundary to zero in the first steps. So the
schedule is kept *relative to the width*: ``T = tau * n`` with tau annealed from
50/4096 to 0.1/4096, which is exactly the reference schedule at n = 4096.
The loss is the counterfactual cross-entropy plus a price on the subspace's size. The
reference tutorial adds ``1.0 * b`` on Alpaca-7B, whose residual stream has n = 4096
dimensions; the gradient the cross-entropy sends to ``b`` grows with ``n`` (it moves
``b * n`` coordinates), so the same ``1.0 * b`` would collapse any small model's
boundary before the temperature falls. The price here is therefore per dimension,
``dim_weight * b * n`` with ``dim_weight = 1/4096``: the tutorial's trade-off at its own
width, the same trade-off at every width. The boundary trains at lr 1e-2 and the
rotation at the fit's lr (the tutorial's split). Coordinates are unit bins centred at
``c_i = i + 1/2``: the reference code uses ``c_i = i``, which pins coordinate 0 at
``m_0 = sigmoid(0) = 1/2`` for ever -- negligible at n = 4096, half of a 2-wide space.
The learnt hard alignment keeps the coordinates with ``c_i < b * n`` (m_i -> 1 as T -> 0).

One variable per site, as in the paper; :func:`boundless_das` trains one per variable.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from mechscope.causal.alignment import Alignment, Place, mask_interchange
from mechscope.causal.counterfactual import CounterfactualData
from mechscope.causal.das import FitConfig, FitResult, Orthogonality, Trainable, fit, frozen, orthonormal_basis, widths_of
from mechscope.causal.engine import Readout, identity_readout, make_engine
from mechscope.causal.stiefel import StiefelSubspace
from mechscope.core.site import Site

TEMPERATURE = (50.0 / 4096, 0.1 / 4096)  # tau: the reference's 50 -> 0.1 at n = 4096, per coordinate of width
DIM_WEIGHT = 1.0 / 4096  # the tutorial's 1.0 * b on a 4096-wide residual stream, per dimension


class BoundlessAlignment(Trainable):
    """A rotation of ``site`` plus a learned boundary for one variable."""

    def __init__(self, variable: str, site: Site, width: int, seed: int = 0, orthogonality: Orthogonality = "retraction",
                 temperature: tuple[float, float] = TEMPERATURE, dim_weight: float = DIM_WEIGHT,
                 boundary_lr: float = 1e-2) -> None:
        super().__init__()
        self.variable, self.sites, self.width = variable, {variable: site}, int(width)
        self.rotation = orthonormal_basis(width, width, orthogonality, seed)
        self.boundary = nn.Parameter(torch.tensor(0.5))
        self.register_buffer("population", torch.arange(width, dtype=torch.float32) + 0.5)  # [n] bin centres
        self.t_start, self.t_end = temperature
        self.temperature = self.t_start
        self.dim_weight, self.boundary_lr = dim_weight, boundary_lr

    def clamped(self) -> Tensor:
        return self.boundary.clamp(1e-3, 1.0)

    def mask(self) -> Tensor:  # [n]
        t, edge = self.temperature * self.width, self.clamped() * self.width
        return torch.sigmoid(self.population / t) * torch.sigmoid((edge - self.population) / t)

    def mix(self, variable: str, base: Tensor, source: Tensor) -> Tensor:
        return mask_interchange(self.rotation, self.mask(), base, source)

    def penalty(self) -> Tensor:
        return self.dim_weight * self.clamped() * self.width

    def schedule(self, progress: float) -> None:
        self.temperature = self.t_start + (self.t_end - self.t_start) * min(max(progress, 0.0), 1.0)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.rotation.parameters()), "lr": lr},
                {"params": [self.boundary], "lr": self.boundary_lr}]

    def before_step(self) -> None:
        if isinstance(self.rotation, StiefelSubspace):
            self.rotation.project_grad()

    def after_step(self) -> None:
        if isinstance(self.rotation, StiefelSubspace):
            self.rotation.retract()

    @property
    def size(self) -> int:
        """Rotated coordinates the variable holds: those whose centre i + 1/2 lies below b * n."""
        return max(1, min(self.width, math.ceil(float(self.clamped().detach()) * self.width - 0.5 - 1e-9)))

    def alignment(self) -> Alignment:
        return Alignment({self.variable: Place(self.sites[self.variable], self.rotation, tuple(range(self.size)))})


def boundless_das(model: nn.Module, data: CounterfactualData, site: Site, readout: Readout = identity_readout,
                  *, cfg: FitConfig = FitConfig(), orthogonality: Orthogonality = "retraction",
                  dim_weight: float = DIM_WEIGHT) -> tuple[Alignment, FitResult]:
    """Boundless DAS for the single variable of ``data`` at ``site``."""
    if len(data.variables) != 1:
        raise ValueError(f"Boundless DAS learns one variable per site; the data intervenes on {list(data.variables)}. "
                         "Train one per variable (on data intervening on that variable alone)")
    v = data.variables[0]
    with frozen(model):
        engine = make_engine(model, data, {v: site}, readout, cfg.engine)
        trainable = BoundlessAlignment(v, site, widths_of(engine, [site])[site], cfg.seed, orthogonality,
                                       dim_weight=dim_weight)
    result = fit(model, data, trainable, readout, cfg, engine)
    return trainable.alignment(), result
