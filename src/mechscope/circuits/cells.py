"""Cells to patch, built from a model's structure: the residual stream, attention and
MLP outputs and single heads, each at every position or at chosen ones.

Built on :mod:`mechscope.core.aliases`, so the same call works on the zoo transformer
and on Hugging Face models (GPT-2, Llama, ...). ``positions=None`` gives one cell per
component covering every position; a list gives one cell per (component, position).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from torch import Tensor, nn

from mechscope.circuits.patching import Cell
from mechscope.core import aliases
from mechscope.core.site import Site
from mechscope.core.structure import ModelStructure, structure

Positions = Sequence[int] | None


def _positions(positions: Positions) -> list[int | None]:
    return [None] if positions is None else [int(p) for p in positions]


def _cells(site: Site, positions: Positions, label: str) -> list[Cell]:
    site = site.replace(name=None)  # cells are keyed by place, the label carries the name
    return [Cell(site, p, label if p is None else f"{label}@{p}") for p in _positions(positions)]


def resid_cells(model: nn.Module | ModelStructure, positions: Positions = None,
                layers: Iterable[int] | None = None) -> list[Cell]:
    """The residual stream before each block (``resid_pre.l``), layer-major."""
    s = model if isinstance(model, ModelStructure) else structure(model)
    out = []
    for layer in layers if layers is not None else range(s.n_layers):
        out += _cells(aliases.resid_pre(s, layer), positions, f"resid_pre.{layer}")
    return out


def attn_cells(model: nn.Module | ModelStructure, positions: Positions = None) -> list[Cell]:
    s = model if isinstance(model, ModelStructure) else structure(model)
    return [c for layer in range(s.n_layers) for c in _cells(aliases.attn_out(s, layer), positions, f"attn_out.{layer}")]


def mlp_cells(model: nn.Module | ModelStructure, positions: Positions = None) -> list[Cell]:
    s = model if isinstance(model, ModelStructure) else structure(model)
    return [c for layer in range(s.n_layers) for c in _cells(aliases.mlp_out(s, layer), positions, f"mlp_out.{layer}")]


def head_cells(model: nn.Module | ModelStructure, positions: Positions = None) -> list[Cell]:
    """Every head of every layer (its slice of the output projection's input)."""
    s = model if isinstance(model, ModelStructure) else structure(model)
    return [c for layer in range(s.n_layers) for h in range(s.n_heads or 0)
            for c in _cells(aliases.head_out(s, layer, h), positions, f"head.{layer}.{h}")]


def grid(values: Tensor, n_rows: int) -> Tensor:
    """Scores of layer-major cells as ``[n_rows, n_cols]`` (e.g. layers × positions)."""
    if values.numel() % n_rows:
        raise ValueError(f"{values.numel()} scores do not split into {n_rows} rows")
    return values.view(n_rows, -1)


def auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of ranking ``labels`` (1: in the circuit) by ``scores``.

    The probability that a random circuit member scores above a random non-member (ties
    count half): 1.0 is a perfect recovery, 0.5 chance.
    """
    scores, labels = scores.detach().double().flatten(), labels.flatten().bool()
    pos, neg = scores[labels], scores[~labels]
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError(f"AUC needs both circuit and non-circuit components, got {pos.numel()} and {neg.numel()}")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
