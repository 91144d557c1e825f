"""A hand-built network whose two attributes live in known orthogonal subspaces (for the
disentanglement tests).

Inputs: an entity (one-hot over 6) and a query (one-hot over 2: colour or shape). Each
entity has a colour and a shape (3 values each). The hidden layer (the site, 8 wide) is

    h = R [onehot(colour); onehot(shape); onehot(query)] + OFFSET

for a fixed random rotation ``R``: colour lives exactly on ``R[:, 0:3]``, shape on
``R[:, 3:6]``, the query on ``R[:, 6:8]``; every neuron mixes all three. The next layer
undoes the rotation and gates each value by the query (``relu(value + query - 1)``), and
the readout names one of 6 classes: colours 0..2, shapes 3..5.
"""

from __future__ import annotations

import torch

from mechscope.causal.counterfactual import make_counterfactuals
from mechscope.causal.disentangle import DisentangleData
from mechscope.causal.model import CausalModel, Variable
from mechscope.core.site import Site
from mechscope.zoo.mlp import MLP

N_ENT = 6
COLOUR = torch.tensor([0, 1, 2, 0, 1, 2])
SHAPE = torch.tensor([0, 0, 1, 1, 2, 2])  # every (colour, shape) pair of an entity differs from some other's
R = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(7)))[0]  # [8, 8] orthonormal
OFFSET = 3.0
SITE = Site("acts.0", name="hidden")
ATTRS = ("colour", "shape")


def causal_model(colour: torch.Tensor = COLOUR, shape: torch.Tensor = SHAPE, k: int = 3) -> CausalModel:
    """Entity -> its colour and shape (``k`` values each) -> the queried one: class ``c`` or ``k + s``."""
    return CausalModel([
        Variable("E", tuple(range(len(colour)))), Variable("Q", (0, 1)),
        Variable("colour", tuple(range(k)), ("E",), lambda e: colour[e]),
        Variable("shape", tuple(range(k)), ("E",), lambda e: shape[e]),
        Variable("O", tuple(range(2 * k)), ("Q", "colour", "shape"), lambda q, c, s: torch.where(q == 0, c, k + s)),
    ], output="O")


def network(scale: float = 10.0) -> MLP:
    net = MLP((N_ENT + 2, 8, 6, 6))
    code = torch.zeros(8, N_ENT + 2)  # unrotated hidden code of each input unit
    for e in range(N_ENT):
        code[int(COLOUR[e]), e] = 1.0
        code[3 + int(SHAPE[e]), e] = 1.0
    code[6, N_ENT], code[7, N_ENT + 1] = 1.0, 1.0
    gate = torch.zeros(6, 8)  # unit i = value i of its attribute + its query - 1
    gate[:3, :3], gate[3:, 3:6] = torch.eye(3), torch.eye(3)
    gate[:3, 6], gate[3:, 7] = 1.0, 1.0
    with torch.no_grad():
        net.layers[0].weight.copy_(R @ code)
        net.layers[0].bias.fill_(OFFSET)  # h >= OFFSET - 2 > 0: the ReLU is the identity
        net.layers[1].weight.copy_(gate @ R.T)
        net.layers[1].bias.copy_(-gate @ R.T @ torch.full((8,), OFFSET) - 1.0)
        net.readout.weight.copy_(scale * torch.eye(6))
        net.readout.bias.zero_()
    return net.eval()


def to_inputs(values, n_ent: int = N_ENT) -> torch.Tensor:  # [n, n_ent + 2]
    return torch.cat([torch.nn.functional.one_hot(values["E"], n_ent), torch.nn.functional.one_hot(values["Q"], 2)],
                     -1).float()


def pairs(attribute: str, query: str, n: int = 300, seed: int = 0, colour=COLOUR, shape=SHAPE, k: int = 3):
    q, n_ent = ATTRS.index(query), len(colour)
    sampler = lambda m, g: {"E": torch.randint(0, n_ent, (m,), generator=g), "Q": torch.full((m,), q)}  # noqa: E731
    data = make_counterfactuals(causal_model(colour, shape, k), (attribute,), sampler, 4 * n,
                                lambda v: to_inputs(v, n_ent), seed=seed, balance=False)
    hl, table = data.meta["high_level"], {"colour": colour, "shape": shape}
    differ = torch.ones(len(data), dtype=torch.bool)
    for a in dict.fromkeys((attribute, query)):
        differ &= table[a][hl["base"]["E"]] != table[a][hl[attribute]["E"]]
    return data.subset(torch.nonzero(differ).flatten()[:n])


def data(n: int = 300, seed: int = 0, colour=COLOUR, shape=SHAPE, k: int = 3) -> DisentangleData:
    w = dict(colour=colour, shape=shape, k=k)
    return DisentangleData({a: pairs(a, a, n, seed + i, **w) for i, a in enumerate(ATTRS)},
                           {("colour", "shape"): pairs("colour", "shape", n, seed + 5, **w),
                            ("shape", "colour"): pairs("shape", "colour", n, seed + 6, **w)})


# -- a network that notices any mix: each attribute one scalar, read by its nearest value ----
K_SCALAR = 8
COLOUR_8 = torch.arange(16) % K_SCALAR
SHAPE_8 = (torch.arange(16) * 3 + torch.arange(16) // K_SCALAR) % K_SCALAR  # every (colour, shape) pair distinct
R6 = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(11)))[0]  # [6, 6] orthonormal
SCALAR_SITE = Site("hidden", name="hidden")


class ScalarAttributes(torch.nn.Module):
    """``hidden = R6 [colour, shape, onehot(query), 0, 0]`` (colour on ``R6[:, 0]``, shape on ``R6[:, 1]``);
    the logits of value ``v`` of the queried attribute are ``-(projection - v)^2``. A fraction ``a``
    of another entity's value moves the projection by ``a`` times their difference (up to 7), so a
    featurizer that mixes even a little of one attribute into the other fails Isolate on some pairs."""

    def __init__(self) -> None:
        super().__init__()
        code = torch.zeros(6, 18)
        code[0, :16], code[1, :16] = COLOUR_8.float(), SHAPE_8.float()
        code[2, 16], code[3, 17] = 1.0, 1.0
        self.embed = torch.nn.Linear(18, 6, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(R6 @ code)
        self.hidden = torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, 18] -> [n, 16]
        h = self.hidden(self.embed(x)) @ R6  # back to [colour, shape, q_colour, q_shape, 0, 0]
        v = torch.arange(K_SCALAR, dtype=h.dtype)
        gate = 100.0 * (1 - h[:, 2:4])  # the attribute not asked about is pushed far down
        return torch.cat([-(h[:, :1] - v) ** 2 - gate[:, :1], -(h[:, 1:2] - v) ** 2 - gate[:, 1:]], -1)


def scalar_data(n: int = 300, seed: int = 0) -> DisentangleData:
    return data(n, seed, COLOUR_8, SHAPE_8, K_SCALAR)
