"""k-sparse probes: which few neurons carry a binary feature (Gurnee et al. 2023, arXiv 2305.01610).

Rank every neuron by how well it alone separates the classes, keep the top ``k``, and
fit an L2 logistic-regression probe on those ``k`` only; report test F1 and the chosen
neurons. Rankings (all computed on the training split only):

- ``mean_diff``: ``|mu+ - mu-|``, the difference of class means;
- ``f_stat``: the one-way ANOVA F statistic (between-class over within-class variance);
- ``mutual_info``: plug-in mutual information (bits) between the label and the neuron
  discretised into equal-count bins;
- ``l1``: ``|w|`` of an L1-regularised logistic regression on standardised neurons, at the
  strongest penalty of a geometric path down from ``lambda_max`` (where every weight is
  zero) that leaves at least ``k`` non-zero weights; neurons still at zero rank after them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from mechscope.probe.linear import (
    DEFAULT_L2_GRID,
    LinearProbe,
    ProbeError,
    as_activations,
    encode_labels,
    split_indices,
    standardise,
    train_probe,
)

RANKINGS: tuple[str, ...] = ("mean_diff", "f_stat", "mutual_info", "l1")


def _binary(labels: Any, n: int) -> tuple[Tensor, Tensor]:
    idx, classes = encode_labels(labels, n)
    if idx.dim() != 1 or classes.numel() != 2:
        raise ProbeError(f"k-sparse probes take binary labels [n]; got {classes.numel()} classes "
                         f"and shape {list(idx.shape)} (one-vs-rest a multi-class label first)")
    return idx, classes


def mean_diff_scores(x: Tensor, y: Tensor) -> Tensor:  # [n, d], [n] in {0,1} -> [d]
    return (x[y == 1].mean(0) - x[y == 0].mean(0)).abs()


def f_stat_scores(x: Tensor, y: Tensor) -> Tensor:
    """One-way ANOVA F for two groups: between-group over within-group mean squares."""
    n = x.shape[0]
    grand = x.mean(0)
    between = torch.zeros_like(grand)
    within = torch.zeros_like(grand)
    for c in (0, 1):
        xc = x[y == c]
        between += xc.shape[0] * (xc.mean(0) - grand) ** 2
        within += ((xc - xc.mean(0)) ** 2).sum(0)
    return between / (within / (n - 2)).clamp_min(1e-300)  # (k-1) = 1 between-group dof


def mutual_info_scores(x: Tensor, y: Tensor, bins: int = 16) -> Tensor:
    """Plug-in I(neuron; label) in bits, the neuron cut into ``bins`` equal-count bins."""
    n, d = x.shape
    ranks = x.argsort(0).argsort(0)  # [n, d] rank of each value within its neuron
    b = (ranks * bins) // n  # [n, d] bin index
    onehot_y = torch.nn.functional.one_hot(y, 2).double()  # [n, 2]
    joint = torch.zeros(d, bins, 2, dtype=torch.float64)
    for c in (0, 1):
        joint[:, :, c] = torch.nn.functional.one_hot(b[y == c], bins).double().sum(0)
    joint /= n
    pb = joint.sum(-1, keepdim=True)
    py = onehot_y.mean(0)[None, None, :]
    ratio = joint / (pb * py).clamp_min(1e-300)
    terms = torch.where(joint > 0, joint * ratio.clamp_min(1e-300).log2(), torch.zeros_like(joint))
    return terms.sum(dim=(1, 2))


def l1_scores(x: Tensor, y: Tensor, k: int, n_path: int = 30, max_iter: int = 500) -> Tensor:
    """|w| of L1 logistic regression (FISTA on standardised x) at the first point of the path with
    >= k non-zeros; the rest ranked by the path point at which each neuron first entered."""
    mean, std = standardise(x)
    z = (x - mean) / std
    n = z.shape[0]
    yd = y.double()
    lam_max = float((z.T @ (yd - yd.mean())).abs().max()) / n
    lams = lam_max * torch.logspace(0, -3, n_path, dtype=torch.float64)
    step = 4.0 * n / float(torch.linalg.matrix_norm(z, ord=2) ** 2 + n)  # 1/L of the logistic loss (+bias)
    w = torch.zeros(z.shape[1], dtype=torch.float64)
    b = torch.tensor(math.log((yd.mean() / (1 - yd.mean())).item()), dtype=torch.float64)
    entered = torch.full((z.shape[1],), float(n_path), dtype=torch.float64)
    for i, lam in enumerate(lams):
        w, b = _fista(z, yd, w, b, float(lam), step, max_iter)
        entered = torch.where((w != 0) & (entered == n_path), torch.full_like(entered, i), entered)
        if int((w != 0).sum()) >= k:
            break
    # non-zero weights rank first, by |w| (scores in (1, 2]); the zeros after them, earlier
    # entry on the path first (scores in [0, 1))
    active = w != 0
    by_weight = 1.0 + w.abs() / w.abs().max().clamp_min(1e-300)
    by_entry = (n_path - entered) / (n_path + 1)
    return torch.where(active, by_weight, by_entry)


def _fista(z: Tensor, y: Tensor, w: Tensor, b: Tensor, lam: float, step: float, max_iter: int,
           tol: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Proximal gradient with momentum on mean logistic loss + lam * ||w||_1 (bias unpenalised)."""
    n = z.shape[0]
    v_w, v_b, t = w.clone(), b.clone(), 1.0
    for _ in range(max_iter):
        p = torch.sigmoid(z @ v_w + v_b)
        g_w, g_b = z.T @ (p - y) / n, (p - y).mean()
        w_new = v_w - step * g_w
        w_new = w_new.sign() * (w_new.abs() - step * lam).clamp_min(0)
        b_new = v_b - step * g_b
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        v_w = w_new + (t - 1) / t_new * (w_new - w)
        v_b = b_new + (t - 1) / t_new * (b_new - b)
        moved = float((w_new - w).abs().max())
        w, b, t = w_new, b_new, t_new
        if moved < tol:
            break
    return w, b


def rank_neurons(x: Any, labels: Any, method: str = "f_stat", k: int | None = None) -> Tensor:
    """Scores [d] (higher = more informative) by one of :data:`RANKINGS`."""
    x = as_activations(x)
    y, _ = _binary(labels, x.shape[0])
    if method == "mean_diff":
        return mean_diff_scores(x, y)
    if method == "f_stat":
        return f_stat_scores(x, y)
    if method == "mutual_info":
        return mutual_info_scores(x, y)
    if method == "l1":
        return l1_scores(x, y, k if k is not None else 1)
    raise ProbeError(f"unknown neuron ranking {method!r}; choose one of {', '.join(RANKINGS)}")


def f1_score(pred: Tensor, target: Tensor) -> float:
    """F1 of the positive class (index 1)."""
    tp = float(((pred == 1) & (target == 1)).sum())
    fp = float(((pred == 1) & (target == 0)).sum())
    fn = float(((pred == 0) & (target == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


@dataclass
class SparseProbe:
    """A k-sparse probe: the chosen neurons (best first), their scores and the test scores."""

    method: str
    k: int
    neurons: list[int]
    scores: list[float]
    probe: LinearProbe
    f1: float
    accuracy: float

    def overlap(self, support: Sequence[int]) -> float:
        """Fraction of ``support`` (e.g. the planted neurons) among the chosen neurons."""
        support = set(int(s) for s in support)
        return len(support & set(self.neurons)) / max(1, min(len(support), self.k))

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "k": self.k, "neurons": self.neurons, "f1": self.f1, "accuracy": self.accuracy}


def sparse_probe(x: Any, labels: Any, k: int, method: str = "f_stat", *, seed: int = 0,
                 split: Sequence[Tensor] | None = None, fractions: Sequence[float] = (0.6, 0.2, 0.2),
                 l2_grid: Sequence[float] = DEFAULT_L2_GRID) -> SparseProbe:
    """Rank on the training split, keep the top ``k`` neurons, fit an L2 probe on them, score on test."""
    x = as_activations(x)
    y, _ = _binary(labels, x.shape[0])
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= x.shape[1]:
        raise ProbeError(f"k must be an int in 1..{x.shape[1]} (the number of neurons), got {k!r}")
    tr, va, te = split if split is not None else split_indices(x.shape[0], fractions, seed)
    scores = rank_neurons(x[tr], y[tr], method, k)
    top = torch.argsort(scores, descending=True, stable=True)[:k]
    fit = train_probe(x[:, top], y, l2_grid=l2_grid, split=(tr, va, te))
    pred = fit.probe.predict_index(x[te][:, top])[:, 0]
    return SparseProbe(method, k, top.tolist(), scores[top].tolist(), fit.probe,
                       f1_score(pred, y[te]), fit.accuracy)
