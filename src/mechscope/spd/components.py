"""Rank-one subcomponents of one weight matrix, and how to read the target's weights.

A decomposed matrix ``W`` (``d_out × d_in``, the orientation of ``nn.Linear.weight``) is
approximated by ``C`` rank-one subcomponents ``W ≈ U V = Σ_c U[:, c] V[c, :]`` with
``U`` ``[d_out, C]`` and ``V`` ``[C, d_in]``. The *inner activation* of subcomponent ``c``
on an input ``a`` is ``h_c = V[c] · a``; the masked layer output is ``U (m ⊙ h) + bias``.

Layers SPD can decompose (the target stays frozen; its biases are kept, not decomposed):

| module                      | ``W`` (d_out × d_in)          | input ``a``        |
|-----------------------------|-------------------------------|--------------------|
| ``nn.Linear``               | ``weight``                    | ``[..., d_in]``    |
| transformers ``Conv1D``     | ``weight.T`` (GPT-2 style)    | ``[..., d_in]``    |
| ``nn.Embedding``            | ``weight.T`` (one-hot input)  | token ids ``[...]``|
| ``nn.Identity`` (inserted)  | ``I_d``                       | ``[..., d]``       |
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

LayerKind = Literal["linear", "conv1d", "embedding", "identity"]


class SPDError(ValueError):
    """A decomposition that cannot work as asked; the message says what to change."""


def layer_kind(module: nn.Module) -> LayerKind | None:
    """Which kind of decomposable layer ``module`` is, or None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Identity):
        return "identity"
    # transformers' Conv1D (GPT-2): weight [d_in, d_out]; matched by its defining traits
    # so that transformers stays an optional dependency
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(getattr(module, "weight", None), Tensor):
        return "conv1d"
    return None


def decomposable_paths(model: nn.Module) -> list[str]:
    """Paths of every linear, Conv1D and embedding layer of ``model`` (for error messages)."""
    return [n for n, m in model.named_modules() if n and layer_kind(m) in ("linear", "conv1d", "embedding")]


def target_weight(module: nn.Module, kind: LayerKind, width: int | None = None) -> Tensor:  # [d_out, d_in]
    """The target's matrix in ``d_out × d_in`` orientation (a view, never a copy, except I)."""
    if kind == "linear":
        return module.weight
    if kind in ("conv1d", "embedding"):
        return module.weight.T
    if kind == "identity":
        if width is None:
            raise SPDError("an identity layer needs its width to be decomposed")
        return torch.eye(width)
    raise SPDError(f"unknown layer kind {kind!r}")


def target_bias(module: nn.Module, kind: LayerKind) -> Tensor | None:  # [d_out] or None
    if kind in ("linear", "conv1d"):
        return module.bias
    return None


class Components(nn.Module):
    """Base: ``C`` rank-one subcomponents with ``U`` ``[d_out, C]`` and ``V`` ``[C, d_in]``."""

    C: int
    d_in: int
    d_out: int
    takes_tokens: bool = False  # an embedding's input is token ids, not vectors

    @property
    def U(self) -> Tensor:  # [d_out, C]
        raise NotImplementedError

    @property
    def V(self) -> Tensor:  # [C, d_in]
        raise NotImplementedError

    def weight(self) -> Tensor:  # [d_out, d_in]
        return self.U @ self.V

    def inner(self, a: Tensor) -> Tensor:  # [..., d_in] -> [..., C]
        """Inner activations ``h = V a`` of every subcomponent."""
        return a @ self.V.T

    def expand(self, h: Tensor) -> Tensor:  # [..., C] -> [..., d_out]
        """``U h``: the layer output (no bias) of (masked) inner activations."""
        return h @ self.U.T

    def delta_out(self, a: Tensor, target_w: Tensor) -> Tensor:  # -> [..., d_out]
        """``(W - U V) a``: what the subcomponents miss of the target on input ``a``."""
        return a @ (target_w - self.weight()).T

    def subcomponent_norms(self) -> Tensor:  # [C]
        """``‖U_c V_c‖_F = ‖U_c‖ ‖V_c‖`` (a rank-one matrix's norm)."""
        return self.U.norm(dim=0) * self.V.norm(dim=1)

    def subcomponent_weights(self) -> Tensor:  # [C, d_out, d_in]
        return self.U.T[:, :, None] * self.V[:, None, :]


class LinearComponents(Components):
    """Subcomponents of a linear map, initialised ``V ~ N(0, 1/d_in)``, ``U ~ N(0, 1/C)``."""

    def __init__(self, C: int, d_in: int, d_out: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if C < 1:
            raise SPDError(f"C (subcomponents per matrix) must be >= 1, got {C}")
        self.C, self.d_in, self.d_out = int(C), int(d_in), int(d_out)
        self.U_param = nn.Parameter(torch.randn(d_out, C, generator=generator) / C ** 0.5)
        self.V_param = nn.Parameter(torch.randn(C, d_in, generator=generator) / d_in ** 0.5)

    @property
    def U(self) -> Tensor:
        return self.U_param

    @property
    def V(self) -> Tensor:
        return self.V_param


class EmbeddingComponents(LinearComponents):
    """Subcomponents of an embedding seen as a linear map of one-hot tokens: ``h = V[:, token]``."""

    takes_tokens = True

    def inner(self, a: Tensor) -> Tensor:  # token ids [...] -> [..., C]
        if a.dtype not in (torch.long, torch.int32, torch.int64):
            raise SPDError(f"an embedding's subcomponents take integer token ids, got dtype {a.dtype}")
        return self.V.T[a]

    def delta_out(self, a: Tensor, target_w: Tensor) -> Tensor:  # token ids [...] -> [..., d_out]
        return (target_w - self.weight()).T[a]


class TiedComponents(Components):
    """Subcomponents tied to another layer's as its transpose: ``U = V_srcᵀ``, ``V = U_srcᵀ``.

    For tied-weight models (TMS's decoder is the encoder's transpose). Holds no parameters:
    gradients from both layers reach the source's ``U`` and ``V``.
    """

    def __init__(self, source: LinearComponents) -> None:
        super().__init__()
        if source.takes_tokens:
            raise SPDError("an embedding's subcomponents cannot be the source of tied components")
        self._source = (source,)  # a tuple: not registered, so the parameters are not duplicated
        self.C, self.d_in, self.d_out = source.C, source.d_out, source.d_in

    @property
    def source(self) -> LinearComponents:
        return self._source[0]

    @property
    def U(self) -> Tensor:
        return self.source.V.T

    @property
    def V(self) -> Tensor:
        return self.source.U.T
