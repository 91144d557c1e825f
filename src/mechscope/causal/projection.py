"""Several variables' interchanges at one orthonormal basis as one matrix product.

Variables that share a basis ``B`` [d, k] on disjoint columns ``B_v`` mix their sources
into a base as ``x_b + Σ_v (x_v − x_b) B_v B_vᵀ`` (the closed form of an interchange in
an orthonormal basis). Where the basis is nearly square (a full rotation, or low-rank
DAS whose variables fill the site) the cheapest form multiplies the stacked offsets by
the stacked projectors:

``x_b + [x_1 − x_b | x_2 − x_b | …] [P_1; P_2; …]`` with ``P_v = B_v B_vᵀ`` [d, d],

one ``[n, V d] × [V d, d]`` product forward. :class:`_ProjectedMix` is its forward and
backward written out, so that a DAS step pays one autograd node for the whole mixing:
the gradient of the projectors is one product ``[x_1 − x_b | …]ᵀ g`` and the basis's
``∂/∂B_v = (G_v + G_vᵀ) B_v`` is a handful of ``d × d`` operations, where the composed
graph (encode each source, mask its columns, decode) costs three products of the batch
each way and a dozen small nodes. The activations get their gradients only when they
require them (an earlier trained intervention).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def column_masks(k: int, columns: Sequence[Sequence[int]], like: Tensor) -> Tensor:  # -> [V, k]
    """0/1 rows marking each variable's columns of the basis."""
    masks = torch.zeros(len(columns), k, dtype=like.dtype, device=like.device)
    for j, cols in enumerate(columns):
        masks[j, list(cols)] = 1.0
    return masks


class _ProjectedMix(torch.autograd.Function):
    """``base + Σ_v (s_v − base) B diag(m_v) Bᵀ`` for basis ``B`` [d, k], masks ``m`` [V, k]."""

    @staticmethod
    def forward(ctx, basis: Tensor, masks: Tensor, base: Tensor, *sources: Tensor) -> Tensor:  # type: ignore[override]
        d, n_var = basis.shape[0], len(sources)
        stacked = (basis[None] * masks[:, None, :]).reshape(n_var * d, -1)  # [V d, k]: rows of B diag(m_v)
        projectors = stacked @ basis.T  # [V d, d]: P_1; P_2; ...
        offsets = torch.cat([source - base for source in sources], dim=1)  # [n, V d]
        ctx.save_for_backward(basis, masks, offsets, projectors)
        return torch.addmm(base, offsets, projectors)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        basis, masks, offsets, projectors = ctx.saved_tensors
        d, n_var = basis.shape[0], masks.shape[0]
        grads: list[Tensor | None] = [None, None, None] + [None] * n_var
        if ctx.needs_input_grad[0]:
            gp = (offsets.T @ g).reshape(n_var, d, d)  # dL/dP_v
            sym = gp + gp.transpose(1, 2)  # P_v = B_v B_vᵀ: dL/dB_v = (G_v + G_vᵀ) B_v
            grads[0] = ((sym @ basis) * masks[:, None, :]).sum(0)  # [d, k]
        if any(ctx.needs_input_grad[3:]) or ctx.needs_input_grad[2]:
            per = [g @ projectors[j * d:(j + 1) * d].T for j in range(n_var)]  # dL/ds_v
            for j in range(n_var):
                grads[3 + j] = per[j] if ctx.needs_input_grad[3 + j] else None
            if ctx.needs_input_grad[2]:
                grads[2] = g - sum(per)
        return tuple(grads)


def mix_by_projectors(basis: Tensor, masks: Tensor, base: Tensor, sources: Sequence[Tensor]) -> Tensor:
    """``base`` [n, d] with each source's columns of ``basis`` [d, k] interchanged (masks [V, k])."""
    return _ProjectedMix.apply(basis, masks, base, *sources)
