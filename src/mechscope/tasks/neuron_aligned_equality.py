"""A hierarchical-equality network whose variables ARE neuron-aligned: the neuron search's control.

The bench's finding that the best neuron-aligned alignment of the trained
hierarchical-equality MLP stays low (``hierarchical_equality/neuron_search``) is only
informative if the same search, with the same data, *finds* a neuron-aligned alignment
where one exists. This module builds such a network by hand, with the task's
architecture (the zoo MLP 16-16-16-16-2) and inputs, so that the ground truth is known
exactly:

- hidden layer 0 holds ``ReLU(±(w_i − x_i))`` (8 units, for WX) and ``ReLU(±(y_i − z_i))``
  (8 units, for YZ), each unit scaled by a random positive factor and the 16 units placed
  in a random order: WX lives on ``NeuronAligned.neurons["WX"]``, YZ on the other 8;
- hidden layer 1 turns each group's L1 distance into ``a = ReLU(1 − c·‖w − x‖₁)``
  (1 when the objects are equal, 0 once they differ by more than ``1/c`` in L1);
- hidden layer 2 computes AND and NOR of the two, and the readout says "equal" when
  either is on: ``O = [WX = YZ]``.

Interchanging WX's 8 units from a source gives layer 0 exactly the activations of the
input ``(w_s, x_s, y, z)``, a real input whose label is the counterfactual label, so the
interchange is exact (IIA 1 on every pair but those within ``1/c`` of the threshold,
which fresh uniform vectors almost never are). Nothing is trained: only a bug in the
search or the interventions can keep the search from finding the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mechscope.tasks.hierarchical_equality import (
    OBJECT_DIM,
    VARIABLES,
    WIDTHS,
    build_model,
)
from mechscope.zoo.mlp import MLP

SHARPNESS = 20.0  # c: unequal objects closer than 1/c = 0.05 in L1 read as equal (probability ~1e-7 per pair)
LOGIT_SCALE = 10.0


@dataclass(frozen=True)
class NeuronAligned:
    """The hand-built network and where each variable lives at hidden layer 0."""

    model: MLP
    neurons: dict[str, tuple[int, ...]]  # variable -> its hidden-layer-0 units (sorted)
    scales: Tensor  # [16] positive scale of each hidden-layer-0 unit, in the network's order


def _differences() -> Tensor:  # [16, 16]: row j of the unpermuted layer 0 reads ±(a_i − b_i)
    rows = torch.zeros(4 * OBJECT_DIM, 4 * OBJECT_DIM)
    for group, (first, second) in enumerate(((0, 1), (2, 3))):  # (W, X) then (Y, Z)
        for i in range(OBJECT_DIM):
            for sign_row, sign in enumerate((1.0, -1.0)):
                r = group * 2 * OBJECT_DIM + sign_row * OBJECT_DIM + i
                rows[r, first * OBJECT_DIM + i] = sign
                rows[r, second * OBJECT_DIM + i] = -sign
    return rows


def build(seed: int = 0) -> NeuronAligned:
    """The network for ``seed`` (which sets the order and the scales of the layer-0 units)."""
    gen = torch.Generator().manual_seed(seed)
    width = WIDTHS[1]
    half = width // 2
    perm = torch.randperm(width, generator=gen)  # unpermuted unit j goes to position perm[j]
    scales = 0.5 + 1.5 * torch.rand(width, generator=gen)  # [16] in [0.5, 2), per unpermuted unit
    net = build_model()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        w0 = torch.zeros(width, WIDTHS[0])
        w0[perm] = scales[:, None] * _differences()  # h0[perm[j]] = scale_j ReLU(±(a_i − b_i))
        net.layers[0].weight.copy_(w0)
        for unit, group in enumerate((perm[:half], perm[half:])):  # layer 1: a = ReLU(1 − c Σ_j h0_j / scale_j)
            net.layers[1].weight[unit, group] = -SHARPNESS / scales[:half] if unit == 0 else -SHARPNESS / scales[half:]
            net.layers[1].bias[unit] = 1.0
        net.layers[2].weight[0, :2] = 1.0   # AND = ReLU(a + b − 1)
        net.layers[2].bias[0] = -1.0
        net.layers[2].weight[1, :2] = -1.0  # NOR = ReLU(1 − a − b)
        net.layers[2].bias[1] = 1.0
        net.readout.weight[1, :2] = LOGIT_SCALE  # class 1 ("equal") when AND or NOR is on
        net.readout.bias[0] = LOGIT_SCALE / 2
    placed = torch.empty(width)
    placed[perm] = scales
    neurons = {VARIABLES[0]: tuple(sorted(perm[:half].tolist())), VARIABLES[1]: tuple(sorted(perm[half:].tolist()))}
    return NeuronAligned(net.eval(), neurons, placed)
