"""Confidence intervals for the figures the bench and the methods report. Pure functions.

An accuracy or an interchange-intervention accuracy is a proportion of ``n`` independent
examples: its interval is Wilson's score interval, which stays inside [0, 1] and keeps its
coverage near 0 and 1 where the normal approximation does not. Any other statistic of
per-example values (a mean loss, a mean KL, a difference of two accuracies on the same
examples) gets a percentile bootstrap over the examples, seeded so that a rerun prints the
same interval. A difference of two proportions gets Newcombe's hybrid score interval, built
from the two Wilson intervals. A ranking scored by its AUC against a set of members is
compared with a uniformly random ranking exactly (the Mann-Whitney U distribution), not
by a normal approximation: with 5 members among 8 the normal one is far off.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch

Z95 = 1.959963984540054  # standard normal quantile at 0.975


def wilson_interval(proportion: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion observed on ``n`` examples (95 % by default)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of examples, got {n!r}")
    if not 0.0 <= proportion <= 1.0:
        raise ValueError(f"a proportion lies in [0, 1], got {proportion!r}")
    z2 = z * z
    centre = (proportion + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(proportion * (1 - proportion) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo = 0.0 if proportion == 0.0 else max(0.0, centre - half)
    hi = 1.0 if proportion == 1.0 else min(1.0, centre + half)
    return lo, hi


def bootstrap_interval(values: "torch.Tensor | Sequence[float]",
                       statistic: "Callable[[torch.Tensor], torch.Tensor] | None" = None, *,
                       resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` (default: the mean) over the first axis.

    ``values``: [n, ...] per-example values; ``statistic`` maps a resampled [n, ...] tensor
    to a scalar. Resampling is seeded (``seed``) and does not touch the global generator.
    """
    import torch  # here: the bench's Result imports this module, and `mechscope --help` loads no torch

    x = torch.as_tensor(values, dtype=torch.float64)
    if x.ndim == 0 or x.shape[0] < 2:
        raise ValueError(f"a bootstrap needs at least 2 examples, got shape {tuple(x.shape)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    gen = torch.Generator().manual_seed(seed)
    idx: torch.Tensor = torch.randint(0, x.shape[0], (resamples, x.shape[0]), generator=gen)  # [B, n]
    if statistic is None and x.ndim == 1:
        draws = x[idx].mean(1)  # [B], all resamples at once
    else:
        stat = statistic or (lambda v: v.mean())
        draws = torch.stack([torch.as_tensor(stat(x[i]), dtype=torch.float64).reshape(()) for i in idx])
    alpha = (1.0 - level) / 2
    lo, hi = torch.quantile(draws, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
    return float(lo), float(hi)


def newcombe_interval(p1: float, n1: int, p2: float, n2: int) -> tuple[float, float]:
    """95 % interval of ``p1 - p2``, two proportions of independent samples of ``n1`` and ``n2``
    (Newcombe 1998, hybrid score method: each proportion's Wilson interval, combined). For two
    proportions of the same examples it is conservative (positively correlated successes
    narrow the true interval)."""
    l1, u1 = wilson_interval(p1, n1)
    l2, u2 = wilson_interval(p2, n2)
    d = p1 - p2
    return d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


def _u_counts(n_pos: int, n_neg: int) -> list[int]:
    """Number of rankings (no ties) of n_pos members and n_neg others per Mann-Whitney U = 0..n_pos*n_neg."""
    f = [[[1] for _ in range(n_neg + 1)] for _ in range(n_pos + 1)]  # f[i][j][u]
    for i in range(1, n_pos + 1):
        for j in range(1, n_neg + 1):
            top_member, top_other = f[i - 1][j], f[i][j - 1]  # the highest-ranked one is a member (beats all j)
            out = [0] * (i * j + 1)
            for u, c in enumerate(top_member):
                out[u + j] += c
            for u, c in enumerate(top_other):
                out[u] += c
            f[i][j] = out
    return f[n_pos][n_neg] if n_pos and n_neg else [1]


def auc_permutation_p(auc_value: float, n_pos: int, n_neg: int) -> float:
    """Exact probability that a uniformly random ranking reaches an AUC >= ``auc_value``."""
    counts = _u_counts(n_pos, n_neg)
    u = math.ceil(auc_value * n_pos * n_neg - 1e-9)
    return sum(counts[u:]) / sum(counts)


def auc_random_quantile(q: float, n_pos: int, n_neg: int) -> float:
    """The ``q`` quantile of the AUC of a uniformly random ranking (smallest a with P(AUC <= a) >= q)."""
    counts, total, seen = _u_counts(n_pos, n_neg), 0, 0
    total = sum(counts)
    for u, c in enumerate(counts):
        seen += c
        if seen >= q * total:
            return u / (n_pos * n_neg)
    return 1.0
