"""Hierarchical equality (the DAS paper's first experiment; Geiger et al. 2023).

Four objects ``w, x, y, z``, each a random 4-d vector uniform in [-1, 1]; the label is
``(w == x) == (y == z)``. Causal model: ``W, X, Y, Z -> WX := [W = X], YZ := [Y = Z]
-> O := [WX = YZ]``. Network: an MLP on the concatenated 16-d input with three hidden
ReLU layers of 16 units and a 2-way output (class 1 = "equal"), trained here on ~1M
fresh examples (lr 1e-3, batch 1024, 3 epochs). Every example draws fresh vectors, and
test vectors come from another random stream, so test objects are never seen in
training. Sampling balances the four cases of the two equalities.

The trained network ships as ``zoo/checkpoints/hierarchical_equality.safetensors``;
``mechscope train hierarchical_equality`` rewrites it by this recipe.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mechscope.causal.counterfactual import CounterfactualData, combine, make_counterfactuals
from mechscope.causal.model import CausalModel, Variable
from mechscope.core.checkpoint import load_module_state, save_module
from mechscope.core.config import Config, config, param
from mechscope.core.site import Site
from mechscope.zoo.mlp import MLP

NAME = "hierarchical_equality"
OBJECT_DIM = 4
WIDTHS = (16, 16, 16, 16, 2)
CHECKPOINT = Path(__file__).resolve().parent.parent / "zoo" / "checkpoints" / f"{NAME}.safetensors"
VARIABLES = ("WX", "YZ")
# counterfactual data sets of the DAS paper: each variable alone, and both with two sources
INTERVENTIONS: dict[str, tuple[str, ...]] = {"WX": ("WX",), "YZ": ("YZ",), "both": ("WX", "YZ")}


def causal_model() -> CausalModel:
    """W, X, Y, Z -> WX, YZ -> O (vectorised: values carry a leading batch dimension)."""
    eq = lambda a, b: (a == b).all(-1)  # noqa: E731 - vectors equal in every coordinate
    return CausalModel([
        Variable("W"), Variable("X"), Variable("Y"), Variable("Z"),
        Variable("WX", (False, True), ("W", "X"), eq),
        Variable("YZ", (False, True), ("Y", "Z"), eq),
        Variable("O", (False, True), ("WX", "YZ"), lambda a, b: a == b),
    ], output="O")


def sample(n: int, generator: torch.Generator) -> dict[str, Tensor]:
    """``n`` inputs with the four (w = x, y = z) cases equally likely; fresh vectors."""
    def vec() -> Tensor:  # [n, 4] uniform in [-1, 1]
        return torch.rand(n, OBJECT_DIM, generator=generator) * 2 - 1

    w, x, y, z = vec(), vec(), vec(), vec()
    same_wx = torch.rand(n, generator=generator) < 0.5  # [n]
    same_yz = torch.rand(n, generator=generator) < 0.5
    x = torch.where(same_wx[:, None], w, x)
    z = torch.where(same_yz[:, None], y, z)
    return {"W": w, "X": x, "Y": y, "Z": z}


def to_model_inputs(values: Mapping[str, Tensor]) -> Tensor:  # -> [n, 16]
    return torch.cat([values["W"], values["X"], values["Y"], values["Z"]], dim=-1)


def labels(values: Mapping[str, Tensor]) -> Tensor:  # [n] long, 1 = "equal"
    return causal_model().run(values).long()


def site(layer: int) -> Site:
    """Hidden layer ``layer`` (0, 1, 2) after its ReLU."""
    if not 0 <= layer < len(WIDTHS) - 2:
        raise ValueError(f"the hierarchical-equality MLP has hidden layers 0..{len(WIDTHS) - 3}, got {layer}")
    return Site(f"acts.{layer}", name=f"hidden.{layer}")


def counterfactuals(n: int, seed: int, which: str = "both") -> CounterfactualData:
    """Balanced interchange data for ``which`` in ``INTERVENTIONS`` (``"both"``: two sources)."""
    if which not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {which!r}; valid: {list(INTERVENTIONS)}")
    return make_counterfactuals(causal_model(), INTERVENTIONS[which], sample, n, to_model_inputs, seed=seed, name=which)


def training_counterfactuals(n_each: int, seed: int) -> CounterfactualData:
    """The DAS training mixture: WX alone, YZ alone and both, ``n_each`` of each."""
    return combine([counterfactuals(n_each, seed + i, w) for i, w in enumerate(INTERVENTIONS)], name="WX+YZ+both")


# -- the model and its recipe -----------------------------------------------------------
@config
class TrainConfig(Config):
    """The recipe of the shipped network (spec: ~1M examples, lr 1e-3, batch 1024, 3 epochs)."""

    n_train: int = param(1_048_576, help="training examples (fresh vectors each)")
    epochs: int = param(3, help="passes over the training set")
    batch_size: int = param(1024, help="examples per step")
    lr: float = param(1e-3, help="Adam learning rate")
    n_test: int = param(20_000, help="test examples, on vectors never seen in training")
    seed: int = param(0, help="seed of the initialisation and the data")


QUICK = TrainConfig(n_train=131_072, epochs=3, n_test=4000)


def build_model() -> MLP:
    return MLP(WIDTHS)


def accuracy(model: torch.nn.Module, n: int, seed: int) -> float:
    """Accuracy on ``n`` fresh test examples (a random stream separate from training)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    values = sample(n, gen)
    with torch.no_grad():
        return float((model(to_model_inputs(values)).argmax(-1) == labels(values)).float().mean())


def train(cfg: TrainConfig = TrainConfig(), log: Any = print) -> tuple[MLP, dict[str, Any]]:
    """Train the network by the recipe; returns it (eval mode) and its metrics."""
    torch.manual_seed(cfg.seed)
    model = build_model()
    gen = torch.Generator().manual_seed(cfg.seed)
    values = sample(cfg.n_train, gen)
    x, y = to_model_inputs(values), labels(values)  # [n, 16], [n]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        order = torch.randperm(cfg.n_train, generator=gen)
        total = 0.0
        for start in range(0, cfg.n_train, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {total / cfg.n_train:.4f}")
    model.eval()
    metrics = {"test_accuracy": accuracy(model, cfg.n_test, cfg.seed), "seconds": time.perf_counter() - t0,
               "config": cfg.to_dict()}
    return model, metrics


def save(model: MLP, path: Path = CHECKPOINT, metrics: Mapping[str, Any] | None = None) -> Path:
    save_module(path, model, {"task": NAME, "widths": list(WIDTHS), **(dict(metrics or {}))})
    return path


def load_model(path: Path = CHECKPOINT) -> MLP:
    """The shipped network (eval mode); a missing file says how to recreate it."""
    model = build_model()
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no trained hierarchical-equality network; run `mechscope train {NAME}`")
    load_module_state(path, model)
    return model.eval()


def train_and_ship(out_dir: Path, log: Any = print, cfg: TrainConfig | None = None) -> list[Path]:
    """The `mechscope train hierarchical_equality` entry point: train by the recipe, write the checkpoint."""
    model, metrics = train(cfg or TrainConfig(), log)
    path = save(model, Path(out_dir) / CHECKPOINT.name, metrics)
    log(f"test accuracy {metrics['test_accuracy']:.4f} on unseen vectors; wrote {path}")
    return [path]
