"""Fourier analysis of modular arithmetic (Nanda et al. 2023, arXiv 2301.05217).

A model that grokked ``a + b mod p`` computes with a few *key frequencies* w_k = 2πk/p:
its embeddings carry cos/sin(w_k a), its neurons products of them, and its logits are
∝ Σ_k cos(w_k (a + b − c)). Everything here is a pure function of weights or of
activations on the full ``p × p`` input grid:

- :func:`fourier_basis`: the real orthonormal basis ``[p, p]`` (rows: const, cos 1, sin 1, ...);
- :func:`frequency_energy`: the energy per frequency of a matrix along its input axis;
- :func:`neuron_frequencies`: per neuron, the frequency whose 2-D Fourier terms explain
  most of its variance over (a, b), and how much;
- :func:`logit_frequency_energy`: the share of the logits along cos/sin(w_k(a + b − c));
- :func:`key_frequencies`: the key set of one view, cut at the largest gap in energy;
- :func:`restricted_logits` / :func:`excluded_logits`: the logits kept to, or stripped
  of, their key-frequency components cos/sin(w_k (a + b));
- :func:`gini`: sparsity of a vector of norms.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def fourier_basis(p: int, dtype: torch.dtype = torch.float64) -> Tensor:  # [p, p]
    """Orthonormal real Fourier basis on Z_p: row 0 constant, rows 2k-1 / 2k cos / sin of w_k x."""
    if p < 3 or p % 2 == 0:
        raise ValueError(f"the Fourier analysis needs an odd modulus p >= 3, got {p}")
    x = torch.arange(p, dtype=dtype)
    rows = [torch.ones(p, dtype=dtype)]
    for k in range(1, (p - 1) // 2 + 1):
        rows += [torch.cos(2 * math.pi * k * x / p), torch.sin(2 * math.pi * k * x / p)]
    basis = torch.stack(rows)  # [p, p]
    return basis / basis.norm(dim=1, keepdim=True)


def n_frequencies(p: int) -> int:
    return (p - 1) // 2


def _pair_energy(coeffs: Tensor) -> Tensor:
    """Energy per frequency k = 1..(p-1)/2 from squared coefficients along the basis axis 0."""
    sq = coeffs.pow(2)
    return sq[1::2] + sq[2::2]  # cos_k + sin_k


def frequency_energy(W: Tensor, p: int) -> Tensor:  # [n_freq]
    """Energy of each frequency in ``W`` ``[p, ...]`` along its first (input) axis."""
    if W.shape[0] != p:
        raise ValueError(f"expected a matrix whose first axis is the {p} residues, got shape {list(W.shape)}")
    coeffs = fourier_basis(p) @ W.detach().double().reshape(p, -1)  # [p, rest]
    return _pair_energy(coeffs).sum(-1)


def fourier_norms(W: Tensor, p: int) -> Tensor:  # [p]
    """Norm of each Fourier component of ``W`` ``[p, ...]`` (const, cos 1, sin 1, ...)."""
    coeffs = fourier_basis(p) @ W.detach().double().reshape(p, -1)
    return coeffs.norm(dim=-1)


def neuron_frequencies(acts: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """For neuron activations ``[p, p, n]`` over the (a, b) grid: each neuron's best frequency
    (1-based) and the fraction of its variance the terms of that frequency explain.

    The terms of frequency k are the 2-D Fourier components that involve only k (and the
    constant): cos/sin(w_k a), cos/sin(w_k b) and their four products.
    """
    if acts.dim() != 3 or acts.shape[:2] != (p, p):
        raise ValueError(f"expected activations [p={p}, p={p}, neurons], got {list(acts.shape)}")
    F = fourier_basis(p)
    coeffs = torch.einsum("ia,jb,abn->ijn", F, F, acts.detach().double())  # [p, p, n]
    sq = coeffs.pow(2)
    total = sq.sum((0, 1)) - sq[0, 0]  # variance: everything but the constant
    K = n_frequencies(p)
    per_k = torch.empty(K, sq.shape[-1], dtype=sq.dtype)
    for k in range(1, K + 1):
        idx = [2 * k - 1, 2 * k]
        with_const = [0, *idx]
        per_k[k - 1] = sq[with_const][:, with_const].sum((0, 1)) - sq[0, 0]
    frac = per_k / total.clamp_min(1e-30)  # [K, n]
    best = frac.max(0)
    return best.indices + 1, best.values


def logit_frequency_energy(logits: Tensor, p: int) -> Tensor:  # [n_freq]
    """Share of the (centred) logits ``[p, p, p]`` (a, b, c) along cos/sin(w_k (a + b − c))."""
    L = logits.detach().double()
    L = L - L.mean(-1, keepdim=True)
    x = torch.arange(p, dtype=torch.float64)
    s = (x[:, None, None] + x[None, :, None] - x[None, None, :])  # [p, p, p] a + b − c
    out = torch.empty(n_frequencies(p), dtype=torch.float64)
    for k in range(1, n_frequencies(p) + 1):
        c, sn = torch.cos(2 * math.pi * k * s / p), torch.sin(2 * math.pi * k * s / p)
        out[k - 1] = ((L * c).sum() ** 2 / c.pow(2).sum() + (L * sn).sum() ** 2 / sn.pow(2).sum())
    return out / L.pow(2).sum().clamp_min(1e-30)


def key_frequencies(energy: Tensor, max_keys: int | None = None) -> list[int]:
    """Frequencies (1-based) above the largest drop in sorted energy.

    A model with a clean Fourier algorithm puts orders of magnitude more energy in its
    key frequencies than in the rest, so the cut is the largest ratio between
    consecutive sorted energies among the top ``max_keys`` (default: a third of them).
    """
    e = energy.detach().double().clamp_min(1e-30)
    order = e.argsort(descending=True)
    top = max_keys or max(len(e) // 3, 2)
    ratios = e[order[:top]] / e[order[1:top + 1]]  # ratio of the i-th to the (i+1)-th largest
    cut = int(ratios.argmax()) + 1
    return sorted(int(k) + 1 for k in order[:cut])


def _key_directions(p: int, keys: list[int]) -> Tensor:  # [p*p, 2K] orthonormal
    """cos/sin(w_k (a + b)) over the (a, b) grid, for each key frequency, normalised."""
    x = torch.arange(p, dtype=torch.float64)
    s = (x[:, None] + x[None, :]).reshape(-1)  # [p*p]
    cols = []
    for k in keys:
        cols += [torch.cos(2 * math.pi * k * s / p), torch.sin(2 * math.pi * k * s / p)]
    D = torch.stack(cols, dim=1)
    return D / D.norm(dim=0, keepdim=True)


def restricted_logits(logits: Tensor, p: int, keys: list[int]) -> Tensor:
    """Logits ``[p*p, c]`` over the (a, b) grid kept only to their mean and their
    components along cos/sin(w_k (a + b)) for the key frequencies (the restricted loss)."""
    L = logits.detach().double()
    D = _key_directions(p, keys)
    mean = L.mean(0, keepdim=True)
    return mean + D @ (D.T @ (L - mean))


def excluded_logits(logits: Tensor, p: int, keys: list[int]) -> Tensor:
    """Logits ``[p*p, c]`` with their key-frequency components cos/sin(w_k (a + b)) removed."""
    L = logits.detach().double()
    D = _key_directions(p, keys)
    return L - D @ (D.T @ L)


def gini(x: Tensor) -> float:
    """Gini coefficient of non-negative values: 0 for equal, → 1 when one holds everything."""
    v = x.detach().double().abs().flatten().sort().values
    n = v.numel()
    if n == 0 or float(v.sum()) == 0.0:
        return 0.0
    idx = torch.arange(1, n + 1, dtype=torch.float64)
    return float((2 * (idx * v).sum() / (n * v.sum())) - (n + 1) / n)
