"""A hand-built network whose alignment is known exactly, for the causal tests.

Inputs are two bits ``a, b``; the causal model is ``P := A, Q := B, O := P and Q``.
The network (the zoo MLP with widths 2-2-2) stores ``(a, b)`` *rotated by 45 degrees*
in its hidden layer (plus an offset that keeps the ReLU linear), and its readout undoes
the rotation and thresholds ``a + b``. So P lives exactly on the hidden direction
``R[:, 0]`` and Q on ``R[:, 1]``; each single neuron mixes both.
"""

from __future__ import annotations

import math

import torch

from mechscope.causal.counterfactual import make_counterfactuals
from mechscope.causal.model import CausalModel, Variable
from mechscope.zoo.mlp import MLP

ANGLE = math.pi / 4
R = torch.tensor([[math.cos(ANGLE), -math.sin(ANGLE)], [math.sin(ANGLE), math.cos(ANGLE)]])  # [2, 2], columns = directions
OFFSET = torch.tensor([2.0, 2.0])
SCALE = 8.0


def causal_model() -> CausalModel:
    return CausalModel([
        Variable("A", (0, 1)), Variable("B", (0, 1)),
        Variable("P", (0, 1), ("A",), lambda a: a),
        Variable("Q", (0, 1), ("B",), lambda b: b),
        Variable("O", (False, True), ("P", "Q"), lambda p, q: (p + q) == 2),
    ], output="O")


def sample(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"A": torch.randint(0, 2, (n,), generator=gen), "B": torch.randint(0, 2, (n,), generator=gen)}


def to_inputs(values) -> torch.Tensor:  # [n, 2]
    return torch.stack([values["A"], values["B"]], dim=-1).float()


def network(q_scale: float = 1.0) -> MLP:
    """hidden = R diag(1, q_scale) x + offset (>= 0: the ReLU is the identity); logits = [0, SCALE (x0 + x1 - 1.5)].

    ``q_scale != 1`` gives Q more variance than P along its direction, so that principal
    components find the two directions (with equal variances any rotation is a PCA basis).
    """
    net = MLP((2, 2, 2))
    stretch = torch.tensor([1.0, q_scale])
    with torch.no_grad():
        net.layers[0].weight.copy_(R * stretch)  # h = R D x + c, i.e. x = D⁻¹ Rᵀ (h - c)
        net.layers[0].bias.copy_(OFFSET)
        w = SCALE * R @ (1 / stretch)  # x0 + x1 = (1/D)ᵀ Rᵀ (h - c) = (R D⁻¹ 1)ᵀ (h - c)
        net.readout.weight.copy_(torch.stack([torch.zeros(2), w]))
        net.readout.bias.copy_(torch.tensor([0.0, -float(w @ OFFSET) - 1.5 * SCALE]))
    return net.eval()


def data(variables, n=400, seed=0):
    return make_counterfactuals(causal_model(), variables, sample, n, to_inputs, seed=seed)
