"""Toy models of superposition (Elhage et al. 2022, arXiv 2209.10652).

``x' = ReLU(Wᵀ W x + b)`` with ``W ∈ R^{m×n}``: n sparse features squeezed through m
hidden dimensions. Several independent *instances* (one per sparsity level, importance
curve or seed) train at once as one tensor, because a 5 → 2 model is far too small to
keep a CPU busy on its own.

- :class:`TMS` is the multi-instance model used for training (``W`` is
  ``[n_instances, n_hidden, n_features]``). Its sites: ``hidden`` (the hidden vector
  ``[batch, n_instances, n_hidden]``, after the optional identity) and ``relu`` (the output).
- :meth:`TMS.instance` gives one instance as a plain module of ``nn.Linear`` layers
  (:class:`TMSInstance`, paths ``encoder``, optional ``identity``, ``decoder``, ``relu``),
  the shape parameter-decomposition methods address by site path.
- Measures are pure functions of ``W``: dimensions per feature ``D* = m / ‖W‖²_F``,
  per-feature dimensionality ``D_i``, interference and the number of represented features.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from mechscope.core.checkpoint import load_module_state, load_tensors, save_module
from mechscope.core.config import Config, ConfigError, config, param

# dimensionalities that the uniform polytopes of the paper give each feature
GEOMETRIC_FRACTIONS = (1.0, 3 / 4, 2 / 3, 1 / 2, 2 / 5, 3 / 8)


@config
class TMSConfig(Config):
    """One training run of several TMS instances at once (defaults: the paper's intro setting)."""

    n_features: int = param(5, help="number of input features n", ge=1)
    n_hidden: int = param(2, help="hidden dimensions m", ge=1)
    n_instances: int = param(10, help="independent models trained as one tensor", ge=1)
    feature_probability: tuple[float, ...] = param(
        (), help="probability each feature is active, one per instance (or one for all); "
                 "empty: 20^-linspace(0, 1, n_instances), the paper's sparsity sweep")
    importance_decay: float = param(0.9, help="importance of feature i is decay^i (1.0: uniform)")
    tied: bool = param(True, help="decoder is the encoder's transpose (x' = ReLU(WᵀWx + b))")
    hidden_identity: bool = param(False, help="insert a frozen identity layer in the hidden space (SPD's +ID)")
    at_least_one_active: bool = param(False, help="redraw inputs until at least one feature is active (SPD targets)")
    steps: int = param(10_000, help="optimiser steps", ge=1)
    batch_size: int = param(1024, help="examples per step (per instance)", ge=1)
    lr: float = param(1e-3, help="AdamW learning rate (constant)")
    weight_decay: float = param(0.01, help="AdamW weight decay (0.01: torch's default, as in the paper's code)")
    seed: int = param(0, help="seed of the initialisation and the data")

    def validate(self) -> None:
        probs = self.feature_probability
        if probs and len(probs) not in (1, self.n_instances):
            raise ConfigError(f"TMSConfig.feature_probability has {len(probs)} values; give one per instance "
                              f"({self.n_instances}), a single value for all, or none for the default sweep")
        if any(not 0.0 < p <= 1.0 for p in probs):
            raise ConfigError(f"TMSConfig.feature_probability values must be in (0, 1], got {probs}")
        if self.importance_decay <= 0:
            raise ConfigError(f"TMSConfig.importance_decay must be > 0, got {self.importance_decay}")
        if self.lr <= 0:
            raise ConfigError(f"TMSConfig.lr must be > 0, got {self.lr}")

    def probabilities(self) -> Tensor:  # [n_instances]
        if not self.feature_probability:
            return 20.0 ** -torch.linspace(0, 1, self.n_instances)
        return torch.tensor(self.feature_probability, dtype=torch.float32).expand(self.n_instances).clone()

    def importance(self) -> Tensor:  # [n_features]
        return self.importance_decay ** torch.arange(self.n_features, dtype=torch.float32)


def intro_config(**changes: Any) -> TMSConfig:
    """The paper's intro figure: n=5, m=2, importance 0.9^i, ten sparsity levels."""
    return TMSConfig(**changes)


def spd_config(shape: str = "5-2", identity: bool = False, n_instances: int = 8, **changes: Any) -> TMSConfig:
    """The SPD paper's TMS targets (``"5-2"`` or ``"40-10"``): p = 0.05, importance 1,
    AdamW lr 5e-3, 10k steps, at least one feature active. Several seeds train as
    instances; pick one that represents every feature (:func:`best_instance`)."""
    shapes = {"5-2": (5, 2, 1024), "40-10": (40, 10, 8192)}
    if shape not in shapes:
        raise ConfigError(f"unknown SPD TMS shape {shape!r}; valid: {', '.join(shapes)}")
    n, m, batch = shapes[shape]
    base = dict(n_features=n, n_hidden=m, n_instances=n_instances, feature_probability=(0.05,),
                importance_decay=1.0, hidden_identity=identity, at_least_one_active=True,
                lr=5e-3, batch_size=batch)
    return TMSConfig(**{**base, **changes})


class TMS(nn.Module):
    """``n_instances`` toy models as one tensor: ``[batch, inst, n] -> [batch, inst, n]``."""

    def __init__(self, cfg: TMSConfig) -> None:
        super().__init__()
        self.cfg = cfg
        k, m, n = cfg.n_instances, cfg.n_hidden, cfg.n_features
        w = torch.empty(k, n, m)
        for i in range(k):  # Xavier normal per instance, as in the paper's code
            nn.init.xavier_normal_(w[i])
        self.W = nn.Parameter(w.transpose(1, 2).contiguous())  # [inst, m, n]
        self.W_dec = None if cfg.tied else nn.Parameter(w.clone())  # [inst, n, m]
        self.b = nn.Parameter(torch.zeros(k, n))  # [inst, n]
        # the +ID identity is a frozen buffer here; the instance view makes it an nn.Linear
        self.register_buffer("identity", torch.eye(m).expand(k, m, m).clone() if cfg.hidden_identity else None)
        self.hidden = nn.Identity()
        self.relu = nn.ReLU()

    def decoder_weight(self) -> Tensor:  # [inst, n, m]
        return self.W.transpose(1, 2) if self.W_dec is None else self.W_dec

    def forward(self, x: Tensor) -> Tensor:  # [batch, inst, n] -> [batch, inst, n]
        if x.dim() != 3 or x.shape[1:] != (self.cfg.n_instances, self.cfg.n_features):
            raise ValueError(f"TMS expects inputs [batch, n_instances={self.cfg.n_instances}, "
                             f"n_features={self.cfg.n_features}], got {list(x.shape)}")
        h = torch.einsum("bin,imn->bim", x, self.W)  # [batch, inst, m]
        if self.identity is not None:
            h = torch.einsum("bim,ikm->bik", h, self.identity)
        h = self.hidden(h)
        out = torch.einsum("bim,inm->bin", h, self.decoder_weight()) + self.b  # [batch, inst, n]
        return self.relu(out)

    def instance(self, i: int) -> "TMSInstance":
        """Instance ``i`` as a standalone single model (weights copied, eval mode)."""
        if not -self.cfg.n_instances <= i < self.cfg.n_instances:
            raise IndexError(f"instance {i} out of range; this TMS has {self.cfg.n_instances} instances")
        one = TMSInstance(self.cfg.n_features, self.cfg.n_hidden, self.cfg.hidden_identity, self.cfg.tied)
        with torch.no_grad():
            one.encoder.weight.copy_(self.W[i])
            one.decoder.weight.copy_(self.decoder_weight()[i])
            one.decoder.bias.copy_(self.b[i])
        return one.eval()


class TMSInstance(nn.Module):
    """One toy model as plain layers: ``relu(decoder(identity(encoder(x))))``.

    ``encoder`` is ``nn.Linear(n, m, bias=False)`` (weight = W), ``decoder`` is
    ``nn.Linear(m, n)`` (weight = Wᵀ when ``tied``: a copy, since a decomposition keeps the
    target frozen), ``identity`` is a frozen ``nn.Linear(m, m, bias=False)`` set to the
    identity when ``hidden_identity``. ``tied`` records that ``decoder.weight == encoder.weight.T``.
    """

    def __init__(self, n_features: int, n_hidden: int, hidden_identity: bool = False, tied: bool = True) -> None:
        super().__init__()
        self.n_features, self.n_hidden, self.tied = n_features, n_hidden, tied
        self.encoder = nn.Linear(n_features, n_hidden, bias=False)
        self.identity = None
        if hidden_identity:
            self.identity = nn.Linear(n_hidden, n_hidden, bias=False)
            with torch.no_grad():
                self.identity.weight.copy_(torch.eye(n_hidden))
            self.identity.requires_grad_(False)
        self.decoder = nn.Linear(n_hidden, n_features)
        self.relu = nn.ReLU()

    @property
    def W(self) -> Tensor:  # [m, n]
        return self.encoder.weight

    def forward(self, x: Tensor) -> Tensor:  # [batch, n] -> [batch, n]
        if x.shape[-1] != self.n_features:
            raise ValueError(f"TMSInstance expects inputs [..., {self.n_features}], got {list(x.shape)}")
        h = self.encoder(x)  # [batch, m]
        if self.identity is not None:
            h = self.identity(h)
        return self.relu(self.decoder(h))


# ------------------------------------------------------------------------------ data


def sample_features(n_batch: int, probs: Tensor, n_features: int, at_least_one: bool = False,
                    generator: torch.Generator | None = None) -> Tensor:
    """Sparse features ``[batch, inst, n]``: each U[0, 1) with its instance's probability, else 0."""
    k = probs.shape[0]
    values = torch.rand(n_batch, k, n_features, generator=generator)
    active = torch.rand(n_batch, k, n_features, generator=generator) < probs[None, :, None]
    if at_least_one:  # redraw the masks of all-zero rows until every row has an active feature
        empty = ~active.any(-1)  # [batch, inst]
        while bool(empty.any()):
            redraw = torch.rand(int(empty.sum()), n_features, generator=generator) < probs.expand(n_batch, k)[empty][:, None]
            active[empty] = redraw
            empty = ~active.any(-1)
    return values * active


def one_hot_inputs(n_features: int, value: float = 1.0) -> Tensor:  # [n, n]
    """Each feature alone at ``value`` (rows), for per-feature diagnostics."""
    return torch.eye(n_features) * value


# ------------------------------------------------------------------------------ training


def weighted_mse(out: Tensor, x: Tensor, importance: Tensor) -> Tensor:
    """Per-instance loss ``mean_{batch, i} I_i (x_i - x'_i)²`` -> ``[inst]``."""
    return (importance * (x - out) ** 2).mean(dim=(0, 2))


def initial_model(cfg: TMSConfig) -> TMS:
    """The model :func:`train_tms` starts from (same seed, same draws), untrained; the global
    random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return TMS(cfg).eval()


def initial_weight_draws(cfg: TMSConfig, draws: int, generator: torch.Generator | None = None) -> Tensor:
    """``draws`` independent samples of ``W`` ``[draws, n_instances, m, n]`` from the distribution
    :class:`TMS` initialises it with (Xavier normal per instance: std sqrt(2 / (n + m)))."""
    std = math.sqrt(2.0 / (cfg.n_features + cfg.n_hidden))
    return std * torch.randn(draws, cfg.n_instances, cfg.n_hidden, cfg.n_features, generator=generator)


def train_tms(cfg: TMSConfig, log: Callable[[str], None] | None = None, log_every: int = 0) -> tuple[TMS, dict[str, Any]]:
    """Train all instances of ``cfg`` at once; returns the model and a history.

    The summed per-instance loss keeps the instances independent (each instance's
    gradient comes only from its own term).
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = TMS(cfg)  # the weights of initial_model(cfg)
    probs, importance = cfg.probabilities(), cfg.importance()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    history: dict[str, Any] = {"step": [], "loss": []}
    start = time.perf_counter()
    for step in range(cfg.steps):
        x = sample_features(cfg.batch_size, probs, cfg.n_features, cfg.at_least_one_active, gen)
        per_instance = weighted_mse(model(x), x, importance)  # [inst]
        opt.zero_grad(set_to_none=True)
        per_instance.sum().backward()
        opt.step()
        if step % max(cfg.steps // 50, 1) == 0 or step == cfg.steps - 1:
            history["step"].append(step)
            history["loss"].append(per_instance.detach().tolist())
        if log and log_every and step % log_every == 0:
            log(f"tms step {step}: loss per instance {[round(v, 5) for v in per_instance.tolist()]}")
    history["seconds"] = time.perf_counter() - start
    history["steps_per_second"] = cfg.steps / max(history["seconds"], 1e-9)
    return model.eval(), history


def save_tms(path: str | Path, model: TMS) -> None:
    save_module(path, model, model.cfg)


def load_tms(path: str | Path) -> TMS:
    """Load a :func:`save_tms` checkpoint, rebuilding the model from its recorded config."""
    _, meta = load_tensors(path)
    model = TMS(TMSConfig.from_dict(meta["config"]))
    load_module_state(path, model)
    return model.eval()


# ------------------------------------------------------------------------------ measures


def _as_instances(W: Tensor) -> Tensor:
    if W.dim() == 2:
        W = W.unsqueeze(0)
    if W.dim() != 3:
        raise ValueError(f"expected W as [n_hidden, n_features] or [n_instances, n_hidden, n_features], got {list(W.shape)}")
    return W.detach().double()


def feature_norms(W: Tensor) -> Tensor:  # -> [inst, n]
    """‖W_i‖, the length of each feature's direction in the hidden space."""
    return _as_instances(W).norm(dim=1)


def dimensions_per_feature(W: Tensor) -> Tensor:  # -> [inst]
    """``D* = m / ‖W‖²_F``: hidden dimensions per (effectively) embedded feature."""
    W = _as_instances(W)
    return W.shape[1] / W.pow(2).sum(dim=(1, 2))


def _overlaps(W: Tensor) -> Tensor:  # [inst, n, n]: (Ŵ_i · W_j)²
    W = _as_instances(W)
    unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("imn,imk->ink", unit, W).pow(2)


def feature_dimensionality(W: Tensor) -> Tensor:  # -> [inst, n]
    """``D_i = ‖W_i‖² / Σ_j (Ŵ_i · W_j)²``: the share of a dimension feature i owns."""
    norms2 = feature_norms(W).pow(2)
    return norms2 / _overlaps(W).sum(-1).clamp_min(1e-12)


def interference(W: Tensor) -> Tensor:  # -> [inst, n]
    """``Σ_{j≠i} (Ŵ_i · W_j)²``: how much other features leak along feature i's direction."""
    ov = _overlaps(W)
    return ov.sum(-1) - torch.diagonal(ov, dim1=1, dim2=2)


def represented_features(W: Tensor, threshold: float = 0.5) -> Tensor:  # -> [inst]
    """Features with ‖W_i‖ > ``threshold`` (the paper's criterion), per instance."""
    return (feature_norms(W) > threshold).sum(-1)


def near_fraction(D: Tensor, tolerance: float, fractions: tuple[float, ...] = GEOMETRIC_FRACTIONS) -> Tensor:
    """Whether each dimensionality lies within ``tolerance`` of a geometric fraction."""
    f = torch.tensor(fractions, dtype=D.dtype)
    return (D.unsqueeze(-1) - f).abs().min(-1).values <= tolerance


def summary(W: Tensor) -> dict[str, list]:
    """All measures per instance, JSON-ready."""
    return {
        "dimensions_per_feature": dimensions_per_feature(W).tolist(),
        "represented": represented_features(W).tolist(),
        "feature_norms": feature_norms(W).tolist(),
        "feature_dimensionality": feature_dimensionality(W).tolist(),
        "interference": interference(W).tolist(),
    }


def best_instance(model: TMS, threshold: float = 0.5) -> int:
    """The instance whose shortest feature is longest, if it represents every feature
    (‖W_i‖ > ``threshold`` for all i); raises, naming the norms, if none does."""
    norms = feature_norms(model.W)  # [inst, n]
    shortest = norms.min(-1).values
    ok = shortest > threshold
    if not bool(ok.any()):
        raise RuntimeError(
            f"no instance represents all {model.cfg.n_features} features (shortest ‖W_i‖ per instance: "
            f"{[round(v, 3) for v in shortest.tolist()]}); train more instances (seeds) or more steps")
    return int(torch.where(ok, shortest, torch.full_like(shortest, -math.inf)).argmax())
