"""Price tagging, small (the shape of the Boundless DAS paper's task, Wu et al. 2023).

"Say yes only if the price Z lies between X and Y", in its numeric form: a sequence
``X Y Z ?`` of digit tokens (0-9, ``X <= Y``) and the answer ``yes`` or ``no`` at the
``?`` position. Causal model: ``X, Z -> L := [Z >= X]`` (the left boundary),
``Y, Z -> R := [Z <= Y]``, ``L, R -> O := L and R``. Alpaca-7B implements L and R
(Boundless DAS finds L with IIA about 0.96); here a small transformer is trained on the
task by the project's recipe and the same search runs over its residual stream.

Sampling balances the three cases (in range, below, above: 1/2, 1/4, 1/4). The trained
network ships as ``zoo/checkpoints/price_tagging.safetensors``; ``mechscope train
price_tagging`` rewrites it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mechscope.causal.counterfactual import CounterfactualData, make_counterfactuals
from mechscope.causal.engine import last_position
from mechscope.causal.model import CausalModel, Variable
from mechscope.core.checkpoint import load_module_state, save_module
from mechscope.core.config import Config, config, param
from mechscope.core.site import Site
from mechscope.zoo.transformer import Transformer, TransformerConfig

NAME = "price_tagging"
DIGITS = 10
QUERY, NO, YES = DIGITS, DIGITS + 1, DIGITS + 2  # tokens: digits 0..9, "?", "no", "yes"
SEQ = 4  # X Y Z ?
MODEL = TransformerConfig(vocab=DIGITS + 3, n_ctx=SEQ, d_model=64, n_layers=2, n_heads=4, d_head=16, d_mlp=256)
CHECKPOINT = Path(__file__).resolve().parent.parent / "zoo" / "checkpoints" / f"{NAME}.safetensors"
VARIABLES = ("L", "R")
INTERVENTIONS: dict[str, tuple[str, ...]] = {"L": ("L",), "R": ("R",)}
POSITIONS = ("X", "Y", "Z", "?")
readout = last_position  # the answer is read at the "?" position


def causal_model() -> CausalModel:
    digits = tuple(range(DIGITS))
    return CausalModel([
        Variable("X", digits), Variable("Y", digits), Variable("Z", digits),
        Variable("L", (False, True), ("X", "Z"), lambda x, z: z >= x),
        Variable("R", (False, True), ("Y", "Z"), lambda y, z: z <= y),
        Variable("O", (False, True), ("L", "R"), lambda left, right: left & right),
    ], output="O")


def sample(n: int, generator: torch.Generator) -> dict[str, Tensor]:
    """``X <= Y``; Z in range with probability 1/2, below X or above Y with 1/4 each (when possible)."""
    a = torch.randint(0, DIGITS, (n,), generator=generator)
    b = torch.randint(0, DIGITS, (n,), generator=generator)
    x, y = torch.minimum(a, b), torch.maximum(a, b)
    u = torch.rand(n, generator=generator)
    case = torch.where(u < 0.5, 0, torch.where(u < 0.75, 1, 2))  # 0 in range, 1 below, 2 above
    case = torch.where((case == 1) & (x == 0), 0, case)  # nothing below 0 / above 9: stay in range
    case = torch.where((case == 2) & (y == DIGITS - 1), 0, case)
    r = torch.rand(n, generator=generator)
    inside = x + (r * (y - x + 1)).long().clamp(max=DIGITS)  # uniform in [x, y]
    below = (r * x).long()  # uniform in [0, x)
    above = y + 1 + (r * (DIGITS - 1 - y)).long()  # uniform in (y, 9]
    z = torch.where(case == 0, torch.minimum(inside, y), torch.where(case == 1, below, above))
    return {"X": x, "Y": y, "Z": z}


def to_model_inputs(values: Mapping[str, Tensor]) -> Tensor:  # [n, 4] token ids
    n = values["X"].shape[0]
    return torch.stack([values["X"], values["Y"], values["Z"], torch.full((n,), QUERY)], dim=-1).long()


def answer_token(o: Tensor) -> Tensor:
    """O (bool) -> the token id the model must say."""
    return torch.where(torch.as_tensor(o).bool(), YES, NO).long()


def site(layer: int, position: int = SEQ - 1) -> Site:
    """The residual stream after block ``layer`` at ``position`` (default: the "?")."""
    if not 0 <= layer < MODEL.n_layers or not 0 <= position < SEQ:
        raise ValueError(f"layer must be in 0..{MODEL.n_layers - 1} and position in 0..{SEQ - 1}, got {layer}, {position}")
    return Site(f"blocks.{layer}", positions=[position], name=f"resid_post.{layer}@{POSITIONS[position]}")


def counterfactuals(n: int, seed: int, which: str = "L") -> CounterfactualData:
    if which not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {which!r}; valid: {list(INTERVENTIONS)}")
    return make_counterfactuals(causal_model(), INTERVENTIONS[which], sample, n, to_model_inputs,
                                label_of=answer_token, seed=seed, name=which)


# -- the model and its recipe -----------------------------------------------------------
@config
class TrainConfig(Config):
    """The recipe of the shipped network: AdamW on balanced fresh samples, loss at "?" only."""

    steps: int = param(3000, help="optimiser steps")
    batch_size: int = param(256, help="examples per step")
    lr: float = param(1e-3, help="AdamW learning rate")
    weight_decay: float = param(0.01, help="AdamW weight decay")
    seed: int = param(0, help="seed of the initialisation and the data")


QUICK = TrainConfig(steps=600)


def build_model() -> Transformer:
    return Transformer(MODEL)


def accuracy(model: torch.nn.Module) -> float:
    """Accuracy over every input (all 550 sequences with X <= Y)."""
    x, y, z = torch.meshgrid(torch.arange(DIGITS), torch.arange(DIGITS), torch.arange(DIGITS), indexing="ij")
    keep = x.flatten() <= y.flatten()
    values = {"X": x.flatten()[keep], "Y": y.flatten()[keep], "Z": z.flatten()[keep]}
    with torch.no_grad():
        pred = readout(model(to_model_inputs(values))).argmax(-1)
    return float((pred == answer_token(causal_model().run(values))).float().mean())


def train(cfg: TrainConfig = TrainConfig(), log: Any = print) -> tuple[Transformer, dict[str, Any]]:
    torch.manual_seed(cfg.seed)
    model = build_model()
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    cm, t0 = causal_model(), time.perf_counter()
    for step in range(cfg.steps):
        values = sample(cfg.batch_size, gen)
        loss = F.cross_entropy(readout(model(to_model_inputs(values))), answer_token(cm.run(values)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % max(1, cfg.steps // 5) == 0:
            log(f"step {step + 1}/{cfg.steps}: loss {float(loss.detach()):.4f}")
    model.eval()
    return model, {"accuracy": accuracy(model), "seconds": time.perf_counter() - t0, "config": cfg.to_dict()}


def load_model(path: Path = CHECKPOINT) -> Transformer:
    model = build_model()
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no trained price-tagging network; run `mechscope train {NAME}`")
    load_module_state(path, model)
    return model.eval()


def train_and_ship(out_dir: Path, log: Any = print, cfg: TrainConfig | None = None) -> list[Path]:
    """The `mechscope train price_tagging` entry point: train by the recipe, write the checkpoint."""
    model, metrics = train(cfg or TrainConfig(), log)
    path = Path(out_dir) / CHECKPOINT.name
    save_module(path, model, {"task": NAME, "model": vars(MODEL), **metrics})
    log(f"accuracy {metrics['accuracy']:.4f} over all inputs; wrote {path}")
    return [path]
