"""A plain multilayer perceptron, the simplest model a site can point into."""

from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """``Linear -> ReLU`` repeated, then a linear readout.

    Paths: ``layers.{i}`` (Linear), ``acts.{i}`` (ReLU, the hidden activations) and
    ``readout``. ``widths = (d_in, h1, ..., d_out)``.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 16, 16, 16, 2)) -> None:
        super().__init__()
        if len(widths) < 2 or any(w < 1 for w in widths):
            raise ValueError(f"MLP widths must be >= 2 positive ints (d_in, ..., d_out), got {widths}")
        self.widths = tuple(widths)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-2], widths[1:-1]))
        self.acts = nn.ModuleList(nn.ReLU() for _ in widths[1:-1])
        self.readout = nn.Linear(widths[-2], widths[-1])

    def forward(self, x: Tensor) -> Tensor:  # [batch, d_in] -> [batch, d_out]
        for layer, act in zip(self.layers, self.acts):
            x = act(layer(x))
        return self.readout(x)
