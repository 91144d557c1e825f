"""Distributed Alignment Search: learn where variables live, with the model frozen.

DAS (Geiger et al. 2023) learns, for each high-level variable, an orthonormal subspace of
a site's activation such that interchanging that subspace between a base and a source
makes the network output the causal model's counterfactual label. The loss is the
cross-entropy of the intervened network's output against the counterfactual label; only
the alignment's parameters train (Adam); the model is frozen and in eval mode.

- :class:`SubspaceAlignment` -- low-rank DAS (default): one orthonormal ``d x k_total``
  basis per site, shared by the variables there on disjoint columns; ``kind="rotation"``
  learns a full ``d x d`` rotation of which each variable owns some coordinates.
- :func:`fit` -- the training loop, for any :class:`Trainable` (Boundless DAS and DBM
  plug in the same way). It runs on a tail engine by default: the activations before
  the site are computed once, and each step runs only the network after the site.
- :func:`das` -- the one-call form: build, fit, return the trained hard alignment.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from mechscope.causal.alignment import Alignment, AlignmentError, Place, interchange_features
from mechscope.causal.counterfactual import CounterfactualData
from mechscope.causal.engine import Engine, Readout, group_by_site, identity_readout, make_engine
from mechscope.causal.stiefel import StiefelSubspace
from mechscope.core.config import Config, ConfigError, config, param
from mechscope.core.featurize import Featurizer, LinearFeaturizer, Rotation, Subspace
from mechscope.core.site import Site


@config
class FitConfig(Config):
    """How an alignment trains: Adam at the MIB baselines' lr 1e-2 (the DAS tutorial uses 1e-3)."""

    epochs: int = param(10, ge=1, help="passes over the training data")
    batch_size: int = param(1024, ge=1, help="examples per step")
    lr: float = param(1e-2, gt=0, help="Adam learning rate of the alignment")
    seed: int = param(0, help="seed of the initialisation and the batch order")
    engine: Literal["auto", "tail", "full", "suffix"] = param(
        "auto", help="tail: precompute activations before the site; suffix: also the positions before the "
                     "intervened ones (a causal LM at its last position); full: whole forwards every step")


class Trainable(nn.Module):
    """An alignment being learnt: how sources mix in, a penalty, a schedule, the result."""

    sites: dict[str, Site]

    def mix(self, variable: str, base: Tensor, source: Tensor) -> Tensor:
        raise NotImplementedError

    def mix_site(self, variables: Sequence[str], base: Tensor, sources: Sequence[Tensor]) -> Tensor:
        """All of one site's variables mixed in, in order (subclasses may fuse them)."""
        for v, source in zip(variables, sources):
            base = self.mix(v, base, source)
        return base

    def interchange_bases(self, variables: Sequence[str]) -> list[Tensor] | None:
        """Each variable's orthonormal columns ``B_v`` [d, k_v] where mixing them in at one site
        is ``x + Σ_v (x_v - x) B_v B_vᵀ`` (a hard interchange), else None; an engine may then
        fold the mix into the layer after the site (:mod:`mechscope.causal.fold`)."""
        return None

    def penalty(self) -> Tensor | None:
        return None

    def schedule(self, progress: float) -> None:
        """Called before every step with the fraction of training done (annealing)."""

    def before_step(self) -> None:
        """Called after the backward pass, before the optimiser step (e.g. to project gradients)."""

    def after_step(self) -> None:
        """Called after every optimiser step (e.g. to re-orthonormalise a basis)."""

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def alignment(self) -> Alignment:
        """The hard alignment to evaluate and save."""
        raise NotImplementedError


by_site = group_by_site  # variables grouped by their site, in order


Orthogonality = Literal["retraction", "parametrization"]


def orthonormal_basis(d: int, k: int, orthogonality: Orthogonality, seed: int) -> Featurizer:
    """A trainable orthonormal ``d x k`` basis (``k = d``: a rotation)."""
    if orthogonality == "retraction":
        return StiefelSubspace(d, k, seed=seed)
    if orthogonality == "parametrization":
        return Rotation(d, seed=seed) if k == d else Subspace(d, k, seed=seed)
    raise ConfigError(f"orthogonality must be 'retraction' or 'parametrization', got {orthogonality!r}")


class SubspaceAlignment(Trainable):
    """Low-rank DAS (``kind="subspace"``) or a full rotation (``kind="rotation"``).

    Variables at the same site share one basis and own disjoint, consecutive columns of
    it (``dims[v]`` each), so that several variables can be searched for at once. The
    basis stays orthonormal by QR retraction after each step (``"retraction"``, fast)
    or by the core's orthogonal parametrisation (``"parametrization"``).
    """

    def __init__(self, sites: Mapping[str, Site], dims: Mapping[str, int], widths: Mapping[Site, int],
                 kind: Literal["subspace", "rotation"] = "subspace", seed: int = 0,
                 orthogonality: Orthogonality = "retraction") -> None:
        super().__init__()
        if kind not in ("subspace", "rotation"):
            raise ConfigError(f"kind must be 'subspace' or 'rotation', got {kind!r}")
        self.sites, self.dims, self.kind = dict(sites), dict(dims), kind
        self.featurizers = nn.ModuleList()
        self._where: dict[str, tuple[int, tuple[int, ...]]] = {}
        for i, (site, names) in enumerate(by_site(self.sites).items()):
            d, total = widths[site], sum(self.dims[v] for v in names)
            if any(self.dims[v] < 1 for v in names):
                raise AlignmentError(f"every variable needs at least 1 dimension, got {self.dims}")
            if total > d:
                raise AlignmentError(
                    f"variables {names} ask for {total} dimensions in all ({', '.join(f'{v}: {self.dims[v]}' for v in names)}) "
                    f"at site {site}, which is only {d} wide; give them at most {d} together")
            self.featurizers.append(orthonormal_basis(d, d if kind == "rotation" else total, orthogonality, seed + i))
            start = 0
            for v in names:
                self._where[v] = (i, tuple(range(start, start + self.dims[v])))
                start += self.dims[v]

    def mix(self, variable: str, base: Tensor, source: Tensor) -> Tensor:
        i, feats = self._where[variable]
        return interchange_features(self.featurizers[i], feats, base, source)

    def mix_site(self, variables: Sequence[str], base: Tensor, sources: Sequence[Tensor]) -> Tensor:
        """The variables of one basis in one projection: ``x_b + (sum_v ((x_v - x_b) B) * m_v) Bᵀ``.

        ``m_v`` masks the columns of variable ``v``. Because the columns are orthonormal and
        disjoint this equals applying :meth:`mix` variable by variable (up to rounding) with
        one encoding per source and a single decoding, which is faster (``docs/results.md``).
        """
        where = [self._where[v] for v in variables]
        if len(variables) < 2 or len({i for i, _ in where}) > 1:
            return super().mix_site(variables, base, sources)
        basis = self.featurizers[where[0][0]].basis().to(base.dtype)  # [d, k]
        feats = None
        for (_, cols), source in zip(where, sources):
            mask = torch.zeros(basis.shape[1], dtype=base.dtype, device=base.device)  # [k]
            mask[cols[0]:cols[-1] + 1] = 1.0  # a variable's columns are consecutive
            f = ((source - base) @ basis) * mask  # [..., k]: this variable's columns of the source's offset
            feats = f if feats is None else feats + f
        return base + feats @ basis.T

    def interchange_bases(self, variables: Sequence[str]) -> list[Tensor] | None:
        where = [self._where[v] for v in variables]
        if len({i for i, _ in where}) > 1 or not isinstance(self.featurizers[where[0][0]], LinearFeaturizer):
            return None
        basis = self.featurizers[where[0][0]].basis()  # [d, k]
        return [basis[:, cols[0]:cols[-1] + 1] for _, cols in where]  # a variable's columns are consecutive

    def before_step(self) -> None:
        for f in self.featurizers:
            if isinstance(f, StiefelSubspace):
                f.project_grad()

    def after_step(self) -> None:
        for f in self.featurizers:
            if isinstance(f, StiefelSubspace):
                f.retract()

    def alignment(self) -> Alignment:
        return Alignment({v: Place(self.sites[v], self.featurizers[i], feats) for v, (i, feats) in self._where.items()})


@dataclass
class FitResult:
    """What training did: loss per epoch, steps, seconds (wall clock and this process's CPU
    time, which a shared machine's other processes do not inflate), the engine used."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    engine: str = ""
    cpu_seconds: float = 0.0

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds else float("nan")


class frozen:
    """Context: the model in eval mode with no parameter requiring grad; restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self.training = self.model.training
        self.grads = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in self.grads:
            p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc: Any) -> None:
        for p, g in self.grads:
            p.requires_grad_(g)
        self.model.train(self.training)


def widths_of(engine: Engine, sites: Sequence[Site]) -> dict[Site, int]:
    """The width (last dimension) of each site's view."""
    with torch.no_grad():
        return {s: int(engine.base_views(s, torch.arange(1)).shape[-1]) for s in dict.fromkeys(sites)}


def fit(model: nn.Module, data: CounterfactualData, trainable: Trainable, readout: Readout = identity_readout,
        cfg: FitConfig = FitConfig(), engine: Engine | None = None,
        on_epoch: Callable[[int, float], None] | None = None) -> FitResult:
    """Train ``trainable`` on ``data`` (cross-entropy to the counterfactual labels + penalty)."""
    with frozen(model):
        eng = engine or make_engine(model, data, {v: trainable.sites[v] for v in data.variables}, readout, cfg.engine)
        opt = torch.optim.Adam(trainable.param_groups(cfg.lr))
        gen = torch.Generator().manual_seed(cfg.seed)
        labels, n = data.labels, len(data)
        per_epoch = math.ceil(n / cfg.batch_size)
        total, result = cfg.epochs * per_epoch, FitResult(engine=eng.kind)
        t0, c0 = time.perf_counter(), time.process_time()
        for epoch in range(cfg.epochs):
            order, running = torch.randperm(n, generator=gen), 0.0
            for b in range(per_epoch):
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                trainable.schedule(result.steps / total)
                loss = step_loss(eng, trainable, idx, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                trainable.before_step()
                opt.step()
                trainable.after_step()
                result.steps += 1
                running += float(loss.detach())
            result.losses.append(running / per_epoch)
            if on_epoch is not None:
                on_epoch(epoch, result.losses[-1])
        result.seconds, result.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        trainable.schedule(1.0)
    return result


def step_loss(engine: Engine, trainable: Trainable, idx: Tensor, labels: Tensor) -> Tensor:
    """One step's loss; orthogonal parametrisations are computed once per step (cached)."""
    with parametrize.cached():
        logits = engine.logits(idx, trainable.mix, trainable.mix_site, trainable.interchange_bases)  # [batch, classes]
        loss = F.cross_entropy(logits, labels.index_select(0, idx))
        extra = trainable.penalty()
    return loss if extra is None else loss + extra


def das(model: nn.Module, data: CounterfactualData, sites: Site | Mapping[str, Site], dims: int | Mapping[str, int],
        readout: Readout = identity_readout, *, kind: Literal["subspace", "rotation"] = "subspace",
        cfg: FitConfig = FitConfig(), orthogonality: Orthogonality = "retraction",
        on_epoch: Callable[[int, float], None] | None = None) -> tuple[Alignment, FitResult]:
    """Learn a subspace (or rotation) per variable of ``data`` at ``sites`` by DAS.
    ``on_epoch(epoch, mean loss)`` is called after every epoch (e.g. an experiment tracker)."""
    sites = {v: sites for v in data.variables} if isinstance(sites, Site) else dict(sites)
    dims = {v: dims for v in data.variables} if isinstance(dims, int) else dict(dims)
    missing = [v for v in data.variables if v not in sites or v not in dims]
    if missing:
        raise AlignmentError(f"variables {missing} of the data have no site or no dims; give both for every variable")
    with frozen(model):
        engine = make_engine(model, data, {v: sites[v] for v in data.variables}, readout, cfg.engine)
        trainable = SubspaceAlignment({v: sites[v] for v in data.variables}, dims,
                                      widths_of(engine, list(sites.values())), kind, cfg.seed, orthogonality)
    result = fit(model, data, trainable, readout, cfg, engine, on_epoch)
    return trainable.alignment(), result
