"""Compressed computation: a residual MLP computing ReLU of 100 features with 50 neurons.

The SPD paper's target (Bushnaq, Braun, Sharkey 2025; ``spd.md``): 100 sparse features
``x_i ~ U[-1, 1]`` (each active with probability 0.01, at least one active) are embedded
into a 1000-dimensional residual stream by a fixed random ``W_E`` with unit-norm rows,
one residual MLP block of 50 ReLU neurons (no biases) adds to it, and the fixed
unembedding ``W_Eᵀ`` reads the features back. The labels are ``y = x + ReLU(x)``: the
residual stream carries ``x``, the MLP must compute ``ReLU(x_i)`` for 100 features with
50 neurons, so it computes them in superposition.

Sites: ``embed`` (frozen ``W_E``), ``mlp_in`` (``W_in``, 1000 → 50), ``act`` (the ReLU,
the neurons), ``mlp_out`` (``W_out``, 50 → 1000), ``unembed`` (frozen ``W_Eᵀ``).
Training (``train_resid_mlp``): AdamW (weight decay 0.01), lr 3e-3 cosine, batch 2048,
1000 steps (the reference's one-layer recipe), MSE on the read-off features.
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


@config
class ResidMLPConfig(Config):
    """The target and its training recipe (defaults: the SPD paper's one-layer model)."""

    n_features: int = param(100, help="sparse input features", ge=1)
    d_embed: int = param(1000, help="width of the residual stream", ge=1)
    d_mlp: int = param(50, help="ReLU neurons of the MLP", ge=1)
    feature_probability: float = param(0.01, help="probability each feature is active")
    steps: int = param(1000, help="optimiser steps", ge=1)
    batch_size: int = param(2048, help="examples per step", ge=1)
    lr: float = param(3e-3, help="AdamW learning rate (cosine decay to 0)")
    weight_decay: float = param(0.01, help="AdamW weight decay")
    seed: int = param(0, help="seed of the embedding, the initialisation and the data")

    def validate(self) -> None:
        if not 0.0 < self.feature_probability <= 1.0:
            raise ConfigError(f"ResidMLPConfig.feature_probability must be in (0, 1], got {self.feature_probability}")
        if self.lr <= 0:
            raise ConfigError(f"ResidMLPConfig.lr must be > 0, got {self.lr}")


class ResidMLP(nn.Module):
    """``unembed(r + mlp_out(ReLU(mlp_in(r))))`` with ``r = embed(x)``; embeddings frozen."""

    def __init__(self, cfg: ResidMLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        w_e = torch.randn(cfg.n_features, cfg.d_embed, generator=gen)
        w_e = w_e / w_e.norm(dim=-1, keepdim=True)  # [n_features, d_embed], unit-norm rows
        self.embed = nn.Linear(cfg.n_features, cfg.d_embed, bias=False)
        self.mlp_in = nn.Linear(cfg.d_embed, cfg.d_mlp, bias=False)
        self.act = nn.ReLU()
        self.mlp_out = nn.Linear(cfg.d_mlp, cfg.d_embed, bias=False)
        self.unembed = nn.Linear(cfg.d_embed, cfg.n_features, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(w_e.T)
            self.unembed.weight.copy_(w_e)
            nn.init.kaiming_uniform_(self.mlp_in.weight, a=math.sqrt(5), generator=gen)
            nn.init.kaiming_uniform_(self.mlp_out.weight, a=math.sqrt(5), generator=gen)
        self.embed.requires_grad_(False)
        self.unembed.requires_grad_(False)

    @property
    def W_E(self) -> Tensor:  # [n_features, d_embed]
        return self.unembed.weight

    def forward(self, x: Tensor) -> Tensor:  # [batch, n_features] -> [batch, n_features]
        if x.shape[-1] != self.cfg.n_features:
            raise ValueError(f"ResidMLP expects inputs [..., {self.cfg.n_features}], got {list(x.shape)}")
        r = self.embed(x)  # [batch, d_embed]
        r = r + self.mlp_out(self.act(self.mlp_in(r)))
        return self.unembed(r)


def labels(x: Tensor) -> Tensor:
    """The function to learn: ``y = x + ReLU(x)``."""
    return x + torch.relu(x)


def sparse_features(n_batch: int, n_features: int, p: float, low: float = -1.0, high: float = 1.0,
                    at_least_one: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """``[batch, n]`` features, each ``U[low, high]`` with probability ``p``, else 0.

    With ``at_least_one`` the rows are drawn from the distribution conditioned on at least
    one active feature (rejection sampling in bulk: the same distribution as redrawing
    each empty row until it is not empty, in one or two vectorised rounds).
    """
    rows: list[Tensor] = []
    need = n_batch
    p_any = 1.0 - (1.0 - p) ** n_features if at_least_one else 1.0
    while need > 0:
        draw = need if not at_least_one else int(need / p_any * 1.1) + 16
        active = torch.rand(draw, n_features, generator=generator) < p
        values = torch.rand(draw, n_features, generator=generator) * (high - low) + low
        x = values * active
        if at_least_one:
            x = x[active.any(-1)]
        x = x[:need]
        rows.append(x)
        need -= x.shape[0]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def sampler(cfg: ResidMLPConfig) -> Callable[[int, torch.Generator], Tensor]:
    """``data(batch_size, generator)``: the target's input distribution."""
    return lambda b, g: sparse_features(b, cfg.n_features, cfg.feature_probability, generator=g)


def per_feature_mse(out: Tensor, y: Tensor) -> Tensor:  # [batch, n] -> [n]
    return (out - y).pow(2).mean(0)


def train_resid_mlp(cfg: ResidMLPConfig, log: Callable[[str], None] | None = None) -> tuple[ResidMLP, dict[str, Any]]:
    """Train the MLP weights (embeddings stay fixed); returns the model and its history."""
    torch.manual_seed(cfg.seed)
    model = ResidMLP(cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: dict[str, Any] = {"step": [], "loss": []}
    start = time.perf_counter()
    for step in range(cfg.steps):
        lr = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(cfg.steps - 1, 1)))
        for group in opt.param_groups:
            group["lr"] = lr
        x = sparse_features(cfg.batch_size, cfg.n_features, cfg.feature_probability, generator=gen)
        loss = (model(x) - labels(x)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(cfg.steps // 20, 1) == 0 or step == cfg.steps - 1:
            history["step"].append(step)
            history["loss"].append(float(loss.detach()))
            if log:
                log(f"resid_mlp step {step}: loss {float(loss.detach()):.3e}")
    history["seconds"] = time.perf_counter() - start
    return model.eval(), history


def evaluate(model: nn.Module, cfg: ResidMLPConfig, n: int = 20_000, seed: int = 123) -> dict[str, float]:
    """Loss of the model and of the MLP-less baseline (``ŷ = x``) on fresh data."""
    x = sparse_features(n, cfg.n_features, cfg.feature_probability, generator=torch.Generator().manual_seed(seed))
    y = labels(x)
    with torch.no_grad():
        loss = float((model(x) - y).pow(2).mean())
    return {"loss": loss, "no_mlp_loss": float((x - y).pow(2).mean())}


def save_resid_mlp(path: str | Path, model: ResidMLP) -> None:
    save_module(path, model, model.cfg)


def load_resid_mlp(path: str | Path) -> ResidMLP:
    """Load a :func:`save_resid_mlp` checkpoint, rebuilding the model from its config."""
    _, meta = load_tensors(path)
    model = ResidMLP(ResidMLPConfig.from_dict(meta["config"]))
    load_module_state(path, model)
    return model.eval()
