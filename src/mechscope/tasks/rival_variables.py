"""Rival intermediate variables: a world where one of two rival hypotheses is true by construction.

Three digits ``x, y, z`` in ``0..K-1`` (one-hot, concatenated: ``[n, 3K]``); the network
outputs the class ``x + y + z`` (``3K - 2`` classes). Two causal models explain this
output equally well from the outside (the spec's example):

- ``S``: ``S := X + Y``, ``O := S + Z``;
- ``T``: ``T := Y + Z``, ``O := X + T``.

The network is the zoo MLP ``3K-2H-2H-H-(3K-2)``, trained with an architectural
constraint that makes ``S`` exist and ``T`` not: the first two hidden layers are
block-diagonal, so units ``0..H-1`` of ``acts.0`` and ``acts.1`` (the "XY block") read
only ``x`` and ``y``, and units ``H..2H-1`` (the "Z block") read only ``z``; only the
third hidden layer mixes the blocks. Every function of ``(x, y)`` alone that determines the
output realises ``S`` under interchange (setting the XY block to a source's value sets the
output to ``S_source + z_base``, which is ``S``'s counterfactual); ``Y + Z`` is computed
nowhere before the last hidden layer, where ``X`` is mixed in too. The constraint is kept
during training by masking the weights (and their gradients), and the shipped weights are
checked to hold it when loaded.

``mechscope train rival_variables`` rewrites the checkpoint by :class:`Recipe`
(full-batch Adam on all ``K^3`` inputs; a few seconds on one thread).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mechscope.causal.alignment import Place
from mechscope.causal.hypothesis import Hypothesis
from mechscope.causal.model import CausalModel, Variable
from mechscope.core.checkpoint import load_module_state, save_module
from mechscope.core.featurize import Identity
from mechscope.core.site import Site
from mechscope.zoo.mlp import MLP

NAME = "rival_variables"
K = 10  # digit values 0..K-1
BLOCK = 16  # H: units per block in the two constrained layers
WIDTHS = (3 * K, 2 * BLOCK, 2 * BLOCK, BLOCK, 3 * K - 2)
CHECKPOINT = Path(__file__).resolve().parent.parent / "zoo" / "checkpoints" / f"{NAME}.safetensors"
XY_UNITS = tuple(range(BLOCK))  # the units of acts.0 / acts.1 that read only x and y
Z_UNITS = tuple(range(BLOCK, 2 * BLOCK))
DIGITS = tuple(range(K))
SUMS = tuple(range(3 * K - 2))


def causal_model(intermediate: str = "S") -> CausalModel:
    """``"S"``: S := X + Y, O := S + Z (true of the network); ``"T"``: T := Y + Z, O := X + T (its rival)."""
    inputs = [Variable("X", DIGITS), Variable("Y", DIGITS), Variable("Z", DIGITS)]
    add = lambda a, b: a + b  # noqa: E731 - elementwise on [n] long tensors
    if intermediate == "S":
        return CausalModel([*inputs, Variable("S", tuple(range(2 * K - 1)), ("X", "Y"), add),
                            Variable("O", SUMS, ("S", "Z"), add)], output="O")
    if intermediate == "T":
        return CausalModel([*inputs, Variable("T", tuple(range(2 * K - 1)), ("Y", "Z"), add),
                            Variable("O", SUMS, ("X", "T"), add)], output="O")
    raise ValueError(f"the rival-variables world has intermediates 'S' (X + Y) and 'T' (Y + Z), got {intermediate!r}")


def sample(n: int, generator: torch.Generator) -> dict[str, Tensor]:
    """``n`` uniform digit triples ``{X, Y, Z: [n] long}``."""
    return {v: torch.randint(0, K, (n,), generator=generator) for v in ("X", "Y", "Z")}


def to_model_inputs(values: Mapping[str, Tensor]) -> Tensor:  # -> [n, 3K] float one-hot
    return torch.cat([F.one_hot(values[v].long(), K) for v in ("X", "Y", "Z")], dim=-1).float()


def all_inputs() -> dict[str, Tensor]:
    """Every one of the ``K^3`` triples, in ``x, y, z`` order (the training set)."""
    grid = torch.cartesian_prod(*(torch.arange(K),) * 3)  # [K^3, 3]
    return {"X": grid[:, 0], "Y": grid[:, 1], "Z": grid[:, 2]}


def site(layer: int, block: str = "xy") -> Site:
    """Hidden layer ``layer`` (0, 1, 2) after its ReLU; at layers 0 and 1 the ``"xy"`` or ``"z"`` block's units."""
    if layer not in (0, 1, 2):
        raise ValueError(f"the rival-variables MLP has hidden layers 0, 1, 2; got {layer}")
    if layer == 2:
        return Site("acts.2", name="hidden.2")
    if block not in ("xy", "z"):
        raise ValueError(f"a block is 'xy' or 'z', got {block!r}")
    return Site(f"acts.{layer}", name=f"hidden.{layer}.{block}")


def hypothesis(intermediate: str, layer: int = 1) -> Hypothesis:
    """``intermediate`` (``"S"`` or ``"T"``) placed on the XY block of hidden layer ``layer``
    (all units at layer 2), in the neuron basis."""
    units = tuple(range(WIDTHS[layer + 1])) if layer == 2 else XY_UNITS
    place = Place(site(layer), Identity(WIDTHS[layer + 1]), units)
    return Hypothesis(f"{intermediate} at hidden.{layer}", causal_model(intermediate), {intermediate: place})


# -- the model and its recipe -----------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """How the shipped network was trained: full-batch Adam on all K^3 inputs."""

    steps: int = 1500
    lr: float = 1e-2
    seed: int = 0


def masks() -> dict[str, Tensor]:
    """The block structure: parameter name -> 0/1 mask (1 where a weight may be non-zero)."""
    m0 = torch.zeros(WIDTHS[1], WIDTHS[0])
    m0[:BLOCK, :2 * K] = 1.0  # XY block reads x and y
    m0[BLOCK:, 2 * K:] = 1.0  # Z block reads z
    m1 = torch.zeros(WIDTHS[2], WIDTHS[1])
    m1[:BLOCK, :BLOCK] = 1.0
    m1[BLOCK:, BLOCK:] = 1.0
    return {"layers.0.weight": m0, "layers.1.weight": m1}


def build_model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    model = MLP(WIDTHS)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks().items():
            params[name].mul_(mask)
    return model


def check_constraint(model: MLP) -> None:
    """Refuse a network whose masked weights are not zero: the world's ground truth would not hold."""
    params = dict(model.named_parameters())
    for name, mask in masks().items():
        leak = float(params[name].detach().abs().mul(1 - mask).max())
        if leak != 0.0:
            raise ValueError(f"{name} has weight {leak:.3g} where the block structure needs 0, so the XY block "
                             f"may read z and S is not known to exist; retrain it with `mechscope train {NAME}`")


def accuracy(model: MLP) -> float:
    values = all_inputs()
    with torch.no_grad():
        pred = model(to_model_inputs(values)).argmax(-1)
    return float((pred == causal_model().run(values)).float().mean())


def train(recipe: Recipe = Recipe(), log: Any = None) -> MLP:
    """Train by ``recipe`` with the block structure held (masked weights and gradients)."""
    model = build_model(recipe.seed)
    values = all_inputs()
    x, y = to_model_inputs(values), causal_model().run(values).long()  # [K^3, 3K], [K^3]
    params, mask = dict(model.named_parameters()), masks()
    for name, m in mask.items():  # gradients of the masked weights are zero, so Adam never moves them
        params[name].register_hook(lambda g, m=m: g * m)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step + 1) % 500 == 0:
            log(f"step {step + 1}/{recipe.steps}: loss {float(loss.detach()):.4f}")
    model = model.eval()
    check_constraint(model)
    if log:
        log(f"accuracy {accuracy(model):.4f} on all {K ** 3} inputs in {time.perf_counter() - t0:.1f}s")
    return model


def save(model: MLP, path: Path = CHECKPOINT, recipe: Recipe = Recipe()) -> Path:
    save_module(path, model, {"task": NAME, "widths": list(WIDTHS), "recipe": asdict(recipe),
                              "accuracy": accuracy(model)})
    return path


def load(path: Path = CHECKPOINT) -> MLP:
    """The shipped network (eval mode), its block structure checked; a missing file says how to make it."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no trained rival-variables network; run `mechscope train {NAME}`")
    model = MLP(WIDTHS)
    load_module_state(path, model)
    check_constraint(model)
    return model.eval()


def train_and_ship(out_dir: Path, log: Any = None) -> list[Path]:
    """``mechscope train rival_variables``: train by :class:`Recipe` and write the checkpoint into ``out_dir``."""
    return [save(train(Recipe(), log=log), Path(out_dir) / CHECKPOINT.name)]
