"""Using a direction: add it (steering) or project it out (directional ablation).

Both are ordinary interventions of :mod:`mechscope.core.intervene` run through
:func:`mechscope.core.run.run`; nothing here touches hooks.

- **Addition** ``x <- x + coeff * v`` at chosen sites and positions (ActAdd adds at the
  first positions, contrastive activation addition at every position after the prompt).
  :class:`Steer` checks the direction's width against the site and refuses a coefficient
  that would overflow the activations' dtype, with an error that says what to lower.
- **Directional ablation** ``x <- x - r r^T x`` (Arditi et al. 2024, arXiv 2406.11717) at
  every layer and position. It is applied to every *write* to the residual stream (the
  embeddings, and what each block adds for its attention and its MLP, after any
  post-sublayer norm: :mod:`mechscope.core.writes`), which keeps the direction out of the
  stream everywhere, including between attention and MLP inside a block. Where each
  write is a projection's own output this is exactly the hook form of the weight edit in
  :mod:`mechscope.steer.orthogonalize`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.intervene import ProjectOut
from mechscope.core.aliases import attn_out, mlp_out, resid_pre
from mechscope.core.structure import StructureError, structure
from mechscope.core.run import HookCall, find_module, run
from mechscope.core.site import Site


class SteeringError(ValueError):
    """A direction or coefficient that cannot be applied at a site."""


def as_direction(direction: Any, what: str = "direction") -> Tensor:
    """A finite, non-zero 1-D float tensor ``[d]``."""
    v = torch.as_tensor(direction)
    if v.dim() == 2 and v.shape[0] == 1:
        v = v[0]
    if v.dim() != 1:
        raise SteeringError(f"a {what} must be a vector [d], got shape {list(v.shape)}")
    v = v.float() if not v.is_floating_point() else v
    if not bool(torch.isfinite(v).all()):
        raise SteeringError(f"the {what} holds NaN or inf values; recompute it from finite activations")
    if float(v.norm()) == 0.0:
        raise SteeringError(f"the {what} is the zero vector; it has no direction to steer along")
    return v


@dataclass(frozen=True, eq=False)
class Steer:
    """``view + coeff * vector`` with clear errors for a width mismatch and for overflow."""

    vector: Tensor  # [d]
    coeff: float = 1.0
    mask: Tensor | None = None  # [batch, pos]: add only where true (for a site without positions)

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", as_direction(self.vector, "steering vector"))
        if isinstance(self.coeff, bool) or not isinstance(self.coeff, (int, float)) or not math.isfinite(self.coeff):
            raise SteeringError(f"the steering coefficient must be a finite number, got {self.coeff!r}")

    def __call__(self, view: Tensor, call: HookCall) -> Tensor:
        if self.vector.shape[0] != view.shape[-1]:
            raise SteeringError(
                f"the steering vector has dimension {self.vector.shape[0]} but site {call.site} has width "
                f"{view.shape[-1]}; compute the direction at this site (or pick the site it came from)")
        big = float(torch.finfo(view.dtype).max) if view.is_floating_point() else math.inf
        added = abs(self.coeff) * float(self.vector.abs().max())
        peak = added + float(view.detach().abs().max())
        if not math.isfinite(added) or peak >= big:
            raise SteeringError(
                f"steering at {call.site} with coefficient {self.coeff:g} adds values up to {added:.3g}, which "
                f"overflows {view.dtype} (max {big:.3g}); lower the coefficient (activations there are "
                f"about {float(view.detach().abs().mean()):.3g} in size) or run the model in a wider dtype")
        add = self.coeff * self.vector.to(view.device, view.dtype)  # [d]
        if self.mask is None:
            return view + add
        if view.dim() < 3 or tuple(self.mask.shape) != tuple(view.shape[:2]):
            raise SteeringError(f"the steering mask has shape {list(self.mask.shape)} but the view at {call.site} is "
                                f"{list(view.shape)}; a mask is [batch, pos] for a site without positions")
        return view + self.mask.to(view.device, view.dtype)[..., None] * add


def steering_interventions(direction: Any, sites: Site | Sequence[Site], coeff: float,
                           positions: Any = None) -> list[tuple[Site, Steer]]:
    """``Steer(direction, coeff)`` at each site (optionally narrowed to ``positions``)."""
    sites = [sites] if isinstance(sites, Site) else list(sites)
    if not sites:
        raise SteeringError("give at least one site to steer at")
    if positions is not None:
        sites = [s.replace(positions=positions) for s in sites]
    add = Steer(as_direction(direction), coeff)
    return [(s, add) for s in sites]


def steer(model: nn.Module, inputs: Any, direction: Any, sites: Site | Sequence[Site], coeff: float,
          positions: Any = None) -> Any:
    """The model's output on ``inputs`` with ``coeff * direction`` added at ``sites``."""
    out, _ = run(model, inputs, steering_interventions(direction, sites, coeff, positions))
    return out


def residual_writers(model: nn.Module) -> list[Site]:
    """Sites of every write to the residual stream, each checked on the structure probe.

    First the token and position embeddings, where the stream before block 0 is their sum
    (times one constant, as Gemma scales it), else the input of block 0 itself; then per
    block what it adds for its attention and its MLP (the ``attn_out`` / ``mlp_out``
    aliases: after any post-sublayer norm). A block whose writes could not be established
    is an error: a write that is not listed would leave the direction in the stream.
    """
    s = structure(model)
    if s.n_layers == 0 or not s.d_model:
        raise StructureError(f"{s.model_class}: no block list / d_model was found, so the residual stream's "
                             "writers are unknown; pass them with structure(model, blocks=..., ...)")
    first = [Site(p) for p in s.embed_writes] if s.embed_writes else [resid_pre(s, 0)]
    blocks = []
    for layer, b in enumerate(s.blocks):
        b.writes()  # the reason, when they are unknown
        blocks += [alias(s, layer) for alias, w in ((attn_out, b.attn_write), (mlp_out, b.mlp_write)) if w is not None]
    for site in first + blocks:
        find_module(model, site.path)  # clear error for a stale path
    return first + blocks


def ablation_interventions(model: nn.Module, direction: Any) -> list[tuple[Site, ProjectOut]]:
    """Directional ablation of ``direction`` at every layer and position (see module docstring)."""
    v = as_direction(direction, "ablation direction")
    d_model = structure(model).d_model
    if d_model and v.shape[0] != d_model:
        raise SteeringError(f"the ablation direction has dimension {v.shape[0]} but the residual stream of "
                            f"{type(model).__name__} has width {d_model}; compute it on the residual stream")
    project = ProjectOut(v[None, :])
    return [(site, project) for site in residual_writers(model)]


def ablate(model: nn.Module, inputs: Any, direction: Any) -> Any:
    """The model's output on ``inputs`` with ``direction`` kept out of the residual stream."""
    out, _ = run(model, inputs, ablation_interventions(model, direction))
    return out
