"""Sparse TopK encode and decode: training never builds the dense ``[batch, d_sae]`` code.

A TopK SAE keeps k of m latents per token. Written with dense tensors, its step costs five
``batch x d x m`` matmuls (encode; dense decode; their backward) although only ``batch x k``
latents are non-zero. Here:

- **encode** runs the one matmul that cannot be avoided, ``h = (x - b_pre) W_enc + b_enc``,
  selects the top k, keeps the dead latents' block of ``h`` for AuxK, and frees ``h``;
- **decode** is an ``embedding_bag`` of the selected decoder rows weighted by their
  activations (``batch x k x d`` work, no dense code);
- **backward** of the encoder sees a gradient with ``k`` non-zeros per row: it is turned into
  a CSR matrix ``[m, batch]`` (rows sorted by latent) and ``∂W_encᵀ = G ᵀ (x - b_pre)`` is one
  sparse-dense product; ``∂b_enc`` and ``∂b_pre`` are latent-wise sums, so no ``[batch, d]``
  gradient is built unless the input itself needs one.

The decode backward (``∂W_dec`` by index-add, ``∂values`` by gathered dot products) is
PyTorch's own ``embedding_bag`` backward, which is sparse already.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 1024  # rows of pre-activations computed and selected at a time

def _csr(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR matrix from (row, col, value) triplets; duplicates are summed by the product."""
    order = torch.argsort(rows)
    counts = torch.bincount(rows, minlength=shape[0])  # [shape[0]]
    crow = torch.zeros(shape[0] + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(counts, 0, out=crow[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols[order], values[order], size=shape, check_invariants=False)


class _TopKEncode(torch.autograd.Function):
    """``(x, b_pre, W_enc, b_enc) -> (values [B, k], indices [B, k], dead pre-activations [B, n_dead])``."""

    @staticmethod
    def forward(ctx, x, b_pre, W_enc, b_enc, k, dead):  # noqa: D401 - autograd API
        xc = x - b_pre if b_pre is not None else x  # [B, d_in]
        B, m = x.shape[0], W_enc.shape[1]
        vals = xc.new_empty(B, k)
        idx = torch.empty(B, k, dtype=torch.long, device=x.device)
        h_dead = xc.new_empty(B, dead.numel() if dead is not None else 0)  # [B, n_dead]
        # row chunks: each block of pre-activations is selected from while it is still in cache,
        # and the dense [B, m] tensor never exists (memory O(CHUNK * m))
        buf = xc.new_empty(min(B, CHUNK), m)
        for s in range(0, B, CHUNK):
            e = min(s + CHUNK, B)
            h = torch.addmm(b_enc, xc[s:e], W_enc, out=buf[:e - s])  # [chunk, m]
            torch.topk(h, k, dim=-1, sorted=False, out=(vals[s:e], idx[s:e]))
            if dead is not None:
                torch.index_select(h, 1, dead, out=h_dead[s:e])
        vals = vals.relu_()
        ctx.has_b_pre = b_pre is not None
        ctx.save_for_backward(xc, W_enc, idx, vals, dead if dead is not None else idx.new_zeros(0))
        ctx.mark_non_differentiable(idx)
        return vals, idx, h_dead

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_dead):
        xc, W_enc, idx, vals, dead = ctx.saved_tensors
        B, m = xc.shape[0], W_enc.shape[1]
        g = (g_vals if g_vals is not None else torch.zeros_like(vals)) * (vals > 0)  # ReLU' on the kept values
        lat, gv = idx.reshape(-1), g.reshape(-1)  # [B*k]: latent and gradient of each non-zero
        grad_b_enc = torch.zeros(m, dtype=gv.dtype, device=gv.device).index_add_(0, lat, gv)  # [m]
        rows = torch.arange(B, device=lat.device).repeat_interleave(idx.shape[1])  # [B*k]
        dense_dead = g_dead is not None and dead.numel() > 0  # AuxK: a dense block over dead latents
        grad_x = grad_b_pre = grad_W = None
        if ctx.needs_input_grad[2]:
            grad_W = (_csr(lat, rows, gv, (m, B)) @ xc).T.contiguous()  # [d_in, m]
            if dense_dead:
                grad_W.index_add_(1, dead, xc.T @ g_dead)
        if dense_dead:
            grad_b_enc.index_add_(0, dead, g_dead.sum(0))
        if ctx.needs_input_grad[0]:
            grad_x = _csr(rows, lat, gv, (B, m)) @ W_enc.T  # [B, d_in]
            if dense_dead:
                grad_x = grad_x + g_dead @ W_enc.index_select(1, dead).T
            grad_b_pre = -grad_x.sum(0) if ctx.has_b_pre else None
        elif ctx.has_b_pre and ctx.needs_input_grad[1]:
            grad_b_pre = -(W_enc @ grad_b_enc)  # Σ_b ∂xc_b = W_enc · (per-latent sums): no [B, d] tensor
        return grad_x, grad_b_pre, grad_W, grad_b_enc if ctx.needs_input_grad[3] else None, None, None


def topk_encode(
    x: Tensor, b_pre: Tensor | None, W_enc: Tensor, b_enc: Tensor, k: int, dead: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sparse TopK encoder: ``(values [B, k], indices [B, k], dead_pre_acts [B, n_dead])``.

    ``x`` is ``[B, d_in]``. Values are ``ReLU``-ed and gradients reach ``x``, ``b_pre``,
    ``W_enc`` and ``b_enc`` through the kept entries only. ``dead`` (long ``[n_dead]``)
    also returns the pre-activations of those latents, differentiable, for AuxK: its
    block is handled densely, which beats scatter/gather when ``k_aux`` is a sizeable share
    of the dead latents (the recipe's ``k_aux = d/2``).
    """
    if x.dim() != 2:
        raise ValueError(f"topk_encode expects rows [batch, d_in], got shape {list(x.shape)}")
    return _TopKEncode.apply(x, b_pre, W_enc, b_enc, int(k), dead)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:  # -> [B, d_out]
    """``Σ_j values[b, j] · W_dec[indices[b, j]]`` without a dense code (no bias added)."""
    if indices.shape[1] == 0:
        return torch.zeros(values.shape[0], W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def dense_code(values: Tensor, indices: Tensor, d_sae: int) -> Tensor:  # -> [B, d_sae]
    """The dense code of a sparse one (for evaluation and tests, not for training)."""
    return torch.zeros(values.shape[0], d_sae, dtype=values.dtype, device=values.device).scatter(1, indices, values)
