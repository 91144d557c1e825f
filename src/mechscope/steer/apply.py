"""Using a direction: add it (steering) or project it out (directional ablation).

Both are ordinary interventions of :mod:`mechscope.core.intervene` run through
:func:`mechscope.core.run.run`; nothing here touches hooks.

- **Addition** ``x <- x + coeff * v`` at chosen sites and positions (ActAdd adds at the
  first positions, contrastive activation addition at every position after the prompt).
  :class:`Steer` checks the direction's width against the site and refuses a coefficient
  that would overflow the activations' dtype, with an error that says what to lower.
- **Directional ablation** ``x <- x - r r^T x`` (Arditi et al. 2024, arXiv 2406.11717) at
  every layer and position. It is applied to the output of every module that *writes* to
  the residual stream (token and position embeddings, each attention output projection,
  each MLP down projection), which keeps the direction out of the residual stream
  everywhere, including between attention and MLP inside a block. This is exactly the
  hook form of the weight edit in :mod:`mechscope.steer.orthogonalize`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.intervene import ProjectOut
from mechscope.core.models import StructureError, structure
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


def residual_writers(model: nn.Module) -> list[str]:
    """Paths of every module whose output is added to the residual stream.

    Token and position embeddings (every ``nn.Embedding`` outside the blocks of width
    ``d_model``), then per block the attention output projection and the MLP down
    projection. A block without a found attention projection is an error: a write that is
    not listed would leave the direction in the stream.
    """
    s = structure(model)
    if s.n_layers == 0 or not s.d_model:
        raise StructureError(f"{s.model_class}: no block list / d_model was found, so the residual stream's "
                             "writers are unknown; pass them with structure(model, blocks=..., ...)")
    inside = tuple(b.path + "." for b in s.blocks)
    paths = [name for name, m in model.named_modules()
             if isinstance(m, nn.Embedding) and m.embedding_dim == s.d_model and not name.startswith(inside)]
    if s.embed and s.embed not in paths:
        paths.insert(0, s.embed)
    for b in s.blocks:
        if b.attn_out_proj is None:
            raise StructureError(f"block {b.path!r}: no attention output projection was found; pass "
                                 "structure(model, attn_out_proj='attn.o_proj') (path relative to the block)")
        paths.append(b.attn_out_proj)
        if b.mlp_down_proj is not None:
            paths.append(b.mlp_down_proj)
        elif b.mlp is not None:
            raise StructureError(f"block {b.path!r} has an MLP but no down projection was found; pass "
                                 "structure(model, mlp_down_proj='mlp.down_proj')")
    for p in paths:
        find_module(model, p)  # clear error for a stale path
    return paths


def ablation_interventions(model: nn.Module, direction: Any) -> list[tuple[Site, ProjectOut]]:
    """Directional ablation of ``direction`` at every layer and position (see module docstring)."""
    v = as_direction(direction, "ablation direction")
    d_model = structure(model).d_model
    if d_model and v.shape[0] != d_model:
        raise SteeringError(f"the ablation direction has dimension {v.shape[0]} but the residual stream of "
                            f"{type(model).__name__} has width {d_model}; compute it on the residual stream")
    project = ProjectOut(v[None, :])
    return [(Site(p), project) for p in residual_writers(model)]


def ablate(model: nn.Module, inputs: Any, direction: Any) -> Any:
    """The model's output on ``inputs`` with ``direction`` kept out of the residual stream."""
    out, _ = run(model, inputs, ablation_interventions(model, direction))
    return out
