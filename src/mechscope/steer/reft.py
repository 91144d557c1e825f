"""Representation finetuning: LoReFT and DiReFT (Wu et al. 2024, arXiv 2404.03592).

The model stays frozen; a small trained intervention edits hidden states at chosen layers
and prompt positions:

- **LoReFT** ``Phi(h) = h + R^T (W h + b - R h)`` with ``R`` [r, d] of orthonormal rows
  (orthogonal parametrisation, orthogonal init), ``W`` [r, d], ``b`` [r]: it replaces the
  projection ``R h`` of ``h`` on an r-dimensional subspace by a learned affine function of ``h``.
- **DiReFT** ``Phi(h) = h + R^T (W h + b)`` with no orthogonality and no subtraction.

Both have ``2 r d + r`` trainable parameters per intervention. Interventions are
``nn.Module`` interventions of :mod:`mechscope.core.run` (``(view, call) -> view``),
applied at a site's positions: by default the first ``k`` and last ``k`` prompt tokens
("f2+l2"), one intervention per layer shared by those positions. Because only prompt
positions are edited, generated tokens see the edit through attention, as in the paper.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from mechscope.core.checkpoint import load_module_state, load_tensors, save_module
from mechscope.core.run import run
from mechscope.core.site import Site


class ReftError(ValueError):
    """A ReFT configuration or checkpoint that cannot be used as given."""


class LoReFT(nn.Module):
    """``h + R^T (W h + b - R h)``; ``R`` [rank, d] with orthonormal rows."""

    kind = "loreft"

    def __init__(self, d: int, rank: int = 4, seed: int | None = None) -> None:
        super().__init__()
        if not 1 <= rank <= d:
            raise ReftError(f"LoReFT rank must be in 1..{d} (the hidden width), got {rank}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.d, self.rank = d, rank
        self.rotate = nn.Linear(d, rank, bias=False)  # weight [rank, d] = R
        nn.init.orthogonal_(self.rotate.weight, generator=gen)
        orthogonal(self.rotate, "weight")  # R R^T = I kept throughout training
        self.learned_source = nn.Linear(d, rank)  # W h + b
        with torch.no_grad():
            bound = 1 / d ** 0.5
            self.learned_source.weight.uniform_(-bound, bound, generator=gen)
            self.learned_source.bias.zero_()

    def forward(self, h: Tensor, call: Any = None) -> Tensor:  # [..., d] -> [..., d]
        _check_width(self, h, call)
        x = _in_own_precision(self, h)
        r = self.rotate.weight  # [rank, d]
        delta = self.learned_source(x) - x @ r.T  # [..., rank]
        return (x + delta @ r).to(h.dtype)


class DiReFT(nn.Module):
    """``h + R^T (W h + b)`` with ``R`` unconstrained."""

    kind = "direft"

    def __init__(self, d: int, rank: int = 4, seed: int | None = None) -> None:
        super().__init__()
        if not 1 <= rank <= d:
            raise ReftError(f"DiReFT rank must be in 1..{d} (the hidden width), got {rank}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.d, self.rank = d, rank
        self.rotate = nn.Linear(d, rank, bias=False)  # R [rank, d]
        nn.init.orthogonal_(self.rotate.weight, generator=gen)
        self.learned_source = nn.Linear(d, rank)
        with torch.no_grad():
            bound = 1 / d ** 0.5
            self.learned_source.weight.uniform_(-bound, bound, generator=gen)
            self.learned_source.bias.zero_()

    def forward(self, h: Tensor, call: Any = None) -> Tensor:
        _check_width(self, h, call)
        x = _in_own_precision(self, h)
        return (x + self.learned_source(x) @ self.rotate.weight).to(h.dtype)


KINDS: dict[str, type[nn.Module]] = {"loreft": LoReFT, "direft": DiReFT}


def _in_own_precision(m: nn.Module, h: Tensor) -> Tensor:
    """``h`` in the intervention's own dtype (its parameters', float32 unless cast): a model run in
    bf16 or fp16 gets the edit computed in float32 and rounded once, on the way back."""
    return h.to(m.learned_source.weight.dtype)


def _check_width(m: nn.Module, h: Tensor, call: Any) -> None:
    if h.shape[-1] != m.d:
        where = f"site {call.site}" if call is not None else "the input"
        raise ReftError(f"{type(m).__name__} was built for width {m.d} but {where} has width {h.shape[-1]}; "
                        "build it with the site's width")


def n_trainable(module: nn.Module) -> int:
    """Trainable parameters, counting an orthogonal parametrisation's matrix once."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- positions
_POSITIONS = re.compile(r"^(?:f(?P<f>\d+))?\+?(?:l(?P<l>\d+))?$")


def parse_positions(spec: str) -> tuple[int, int]:
    """``"f2+l2"`` -> (2, 2); ``"l1"`` -> (0, 1)."""
    m = _POSITIONS.match(spec.strip()) if isinstance(spec, str) else None
    if not m or not (m.group("f") or m.group("l")):
        raise ReftError(f"positions must look like 'f2+l2', 'f1' or 'l3' (first / last prompt tokens), got {spec!r}")
    first, last = int(m.group("f") or 0), int(m.group("l") or 0)
    if first + last == 0:
        raise ReftError(f"positions {spec!r} select no tokens")
    return first, last


def prompt_positions(prompt_start: Tensor, prompt_len: Tensor, spec: str) -> Tensor:
    """Absolute indices [batch, f + l] of the first f and last l prompt tokens of each row."""
    first, last = parse_positions(spec)
    short = prompt_len < first + last
    if bool(short.any()):
        raise ReftError(f"a prompt of {int(prompt_len[short][0])} tokens is shorter than the {first + last} "
                        f"positions of {spec!r}; use fewer positions")
    f = prompt_start[:, None] + torch.arange(first)[None, :]
    l_ = prompt_start[:, None] + prompt_len[:, None] - last + torch.arange(last)[None, :]
    return torch.cat([f, l_], dim=1)


# --------------------------------------------------------------------------- a set of interventions
class Reft(nn.Module):
    """One ReFT intervention per site (sites without positions; positions come per batch)."""

    def __init__(self, sites: Sequence[Site], d: int, kind: str = "loreft", rank: int = 4,
                 positions: str = "f2+l2", seed: int = 0) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ReftError(f"unknown ReFT kind {kind!r}; choose one of {', '.join(KINDS)}")
        if not sites:
            raise ReftError("give at least one site to intervene at")
        parse_positions(positions)
        self.sites = [s.replace(positions=None) for s in sites]
        self.kind, self.rank, self.d, self.positions = kind, rank, d, positions
        self.interventions = nn.ModuleList(KINDS[kind](d, rank, seed + i) for i, _ in enumerate(self.sites))

    def plan(self, index: Tensor) -> list[tuple[Site, nn.Module]]:
        """Interventions at absolute positions ``index`` [batch, n] (see :func:`prompt_positions`)."""
        return [(s.replace(positions=index), m) for s, m in zip(self.sites, self.interventions)]

    def forward_fn(self, model: nn.Module, index: Tensor) -> Callable[[Any], Any]:
        """``inputs -> output`` of the frozen model with the interventions at ``index``."""
        plan = self.plan(index)
        return lambda inputs: run(model, inputs, plan)[0]

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "d": self.d, "positions": self.positions,
                "sites": [s.to_dict() for s in self.sites]}


def save_reft(path: str | Path, reft: Reft) -> None:
    """Save the interventions' weights with their sites, kind, rank and positions."""
    save_module(path, reft, {"reft": reft.config()})


def load_reft(path: str | Path) -> Reft:
    """Rebuild a :class:`Reft` from :func:`save_reft`'s file."""
    _, meta = load_tensors(path, verify=False)
    cfg = (meta or {}).get("config", {}).get("reft") if isinstance(meta, dict) else None
    if not isinstance(cfg, dict):
        raise ReftError(f"{path} is not a ReFT checkpoint (no 'reft' config in its metadata); write it with save_reft")
    reft = Reft([Site.from_dict(s) for s in cfg["sites"]], cfg["d"], cfg["kind"], cfg["rank"], cfg["positions"])
    load_module_state(path, reft)
    return reft.eval()


@dataclass(frozen=True)
class ReftRecipe:
    """Training of a ReFT on a supervised task (the model frozen)."""

    steps: int = 400
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0
