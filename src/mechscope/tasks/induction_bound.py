"""The best a position-only predictor can do on the induction data: the 1-layer control's bound.

One attention layer cannot compose heads, so its prediction at query position q is (at
best) a mixture of the earlier tokens, with weights that may depend on positions but not on
whether an earlier token *follows* an occurrence of the current one (that needs a
previous-token head feeding the keys). The predictor class is therefore::

    p_q(y | x) = sum_{k=1..q} w_{q,k} [x_k = y]  +  w_{q,u} / K,        w_q on the simplex,

one-hot mixtures of the body tokens x_1..x_q plus a uniform component over the K = V - 1
tokens that r is drawn from (BOS is never a next token, so weight on it is wasted).

Which weights are Bayes-optimal? Training draws P uniformly from ``training_periods(L)``
and ``t_i = r[i mod P]`` with r i.i.d. uniform over K tokens (``tasks/induction.py``). The
weights may not depend on the contents, so they cannot use the posterior of P given the
tokens: they minimise the *prior-averaged* expected log loss (the Bayes risk under the
training distribution), separately for each q::

    w_q* = argmax_w  sum_P pi(P) E_r[ log p_q(t_q | x; w) | P ].

Two things make w* differ from "weight pi(P) on the token P back":

- *Several positions are right under one period.* Under P every key k with
  k - 1 = q (mod P) holds the target (its class, ``(k - 1) mod P``, is the target's), so
  the key 2P back is as good as the key P back, and the key 20 back is right under both
  P = 10 and P = 20. Write W_c = sum of w over keys of class c. If no two tokens collided
  the objective would be ``sum_P pi(P) log(W_{c*(P)}(w) + w_u / K)``, whose optimum shares
  mass onto keys that are right under several periods (the prior weights are optimal
  only when every key is right under at most one period).
- *Random tokens collide.* A key of another class c holds the target with probability
  1 / K, independently across classes (r[c] and r[c*] are independent uniform draws), so the
  mass on the target is ``a + S`` with ``a = W_{c*} + w_u / K`` and
  ``S = sum_{c != c*} B_c W_c``, B_c ~ Bernoulli(1 / K) i.i.d.

``E log(a + S)`` is computed exactly by summing over the collision patterns B (all of
them when ``max_collisions`` is None; otherwise patterns with more collisions are dropped,
and their probability is returned, 1e-5 at L = 20, V = 64 with 4). The objective is
concave in w; the EM step ``w <- w * grad`` keeps w on the simplex (``w . grad = 1``
because the mixture is linear in w), SQUAREM extrapolation speeds it up, and
``max(grad) - 1`` bounds how far the objective is below its optimum (concavity), so the
solver stops on a certificate, not a count. (Keys that are right under the same periods,
such as 11 and 22 back, are told apart only by collisions; the objective barely depends
on how mass is split between them, and neither does the evaluation loss, where both are
wrong.)

What the bound is not: a trained one-layer model sums its heads' outputs in *logit* space,
a different class from probability mixtures (when two candidates hold the same token it
adds their logits), and it is trained on finite data; so the bound is the reference for
the control, with a slack, not a theorem about it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mechscope.tasks.induction import training_periods

DTYPE = torch.float64


def repeated_half_queries(half_len: int) -> Tensor:
    """Query positions whose next token is scored by ``repeated_half_loss``: ``L + 1 .. 2L - 1``."""
    return torch.arange(half_len + 1, 2 * half_len)


@dataclass(frozen=True)
class PositionalMixture:
    """Optimal weights ``weights[t, k]`` over sequence positions k (BOS = 0, always 0) for query
    ``queries[t]``, the uniform component ``uniform[t]``, the optimum's expected training
    log-likelihood per query ``objective[t]``, the optimality certificate ``gap`` (the
    objective is within ``gap`` of its maximum at every query) and the dropped probability
    of collision patterns ``dropped_mass`` (0 when enumerated in full)."""

    queries: Tensor  # [T]
    weights: Tensor  # [T, 2L+1]
    uniform: Tensor  # [T]
    objective: Tensor  # [T]
    gap: float
    dropped_mass: float
    vocab: int


def _collision_patterns(m: int, max_k: int, p: float) -> tuple[Tensor, Tensor, float]:
    """Rows B in {0,1}^m with at most ``max_k`` ones ``[N, m]``, their probabilities under
    i.i.d. Bernoulli(p) ``[N]``, and the probability of the patterns left out."""
    rows, probs = [torch.zeros(1, m, dtype=DTYPE)], [torch.tensor([(1 - p) ** m], dtype=DTYPE)]
    for k in range(1, min(m, max_k) + 1):
        combos = torch.combinations(torch.arange(m), k).reshape(-1, k)  # [C, k]
        b = torch.zeros(len(combos), m, dtype=DTYPE).scatter_(1, combos, 1.0)
        rows.append(b)
        probs.append(torch.full((len(combos),), p ** k * (1 - p) ** (m - k), dtype=DTYPE))
    pr = torch.cat(probs)
    dropped = max(0.0, 1.0 - float(pr.sum()))
    return torch.cat(rows), pr / pr.sum(), dropped


def _objective_and_grad(w: Tensor, wu: Tensor, queries: Tensor, periods: Tensor, K: int,
                        patterns: dict[int, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Prior-averaged ``E log p(target)`` ``[T]`` and its gradient in w ``[T, n_pos]`` and in wu ``[T]``."""
    T, n_pos = w.shape
    obj = torch.zeros(T, dtype=DTYPE)
    gw, gu = torch.zeros_like(w), torch.zeros_like(wu)
    keys = torch.arange(n_pos)
    for P in periods.tolist():
        onehot = torch.zeros(n_pos, P, dtype=DTYPE)
        onehot[keys[1:], (keys[1:] - 1) % P] = 1.0  # key k (body k - 1) is of class (k - 1) mod P; BOS of none
        Wc = w @ onehot  # [T, P]
        cstar = queries % P  # target body index q -> class q mod P
        others = (cstar[:, None] + torch.arange(1, P)[None, :]) % P  # [T, P-1]: every other class
        a = Wc.gather(1, cstar[:, None])[:, 0] + wu / K  # [T]
        B, pr = patterns[P - 1]  # [N, P-1], [N]
        D = a[:, None] + Wc.gather(1, others) @ B.T  # [T, N]: mass on the target per collision pattern
        obj += (D.log() * pr).sum(1) / len(periods)
        inv = pr / D  # [T, N]
        g_c = torch.zeros(T, P, dtype=DTYPE)
        g_c.scatter_(1, cstar[:, None], inv.sum(1, keepdim=True))
        g_c.scatter_(1, others, inv @ B)
        gw += g_c @ onehot.T / len(periods)
        gu += inv.sum(1) / K / len(periods)
    return obj, gw, gu


def optimal_positional_mixture(half_len: int, vocab: int, queries: Tensor | None = None,
                               max_collisions: int | None = 4, tol: float = 1e-6,
                               max_iter: int = 5000) -> PositionalMixture:
    """Bayes-optimal position-only mixture weights under the training prior (module docstring).

    ``queries``: query positions (default: the repeated half, ``L + 1 .. 2L - 1``);
    ``max_collisions``: enumerate collision patterns with at most this many colliding
    classes (None: all of them, exact). Stops when the certificate ``max(grad) - 1`` is
    below ``tol`` at every query; raises if ``max_iter`` steps do not get there.
    """
    queries = repeated_half_queries(half_len) if queries is None else torch.as_tensor(queries)
    periods, K, n_pos = training_periods(half_len), vocab - 1, 2 * half_len + 1
    if K < 1 or int(queries.min()) < 1 or int(queries.max()) > n_pos - 2:
        raise ValueError(f"queries must lie in 1..{n_pos - 2} and vocab be >= 2; got {queries.tolist()}, {vocab}")
    patterns, dropped = {}, 0.0
    for P in periods.tolist():
        B, pr, lost = _collision_patterns(P - 1, P - 1 if max_collisions is None else max_collisions, 1.0 / K)
        patterns[P - 1], dropped = (B, pr), max(dropped, lost)
    valid = (torch.arange(n_pos)[None, :] >= 1) & (torch.arange(n_pos)[None, :] <= queries[:, None])  # [T, n_pos]
    theta = torch.cat([valid.to(DTYPE), torch.ones(len(queries), 1, dtype=DTYPE)], 1)  # [T, n_pos + 1]: w, then wu
    theta = theta / theta.sum(1, keepdim=True)

    def step(th: Tensor) -> tuple[Tensor, Tensor, float]:  # objective, EM image, certificate
        obj, gw, gu = _objective_and_grad(th[:, :-1], th[:, -1], queries, periods, K, patterns)
        g = torch.cat([gw.masked_fill(~valid, 0), gu[:, None]], 1)
        image = th * g
        return obj, image.masked_fill(image < 1e-30, 0.0), float(g.amax(1).max()) - 1.0  # no subnormals

    for _ in range(max_iter):
        obj0, th1, gap = step(theta)
        if gap < tol:
            return PositionalMixture(queries, theta[:, :-1].float(), theta[:, -1].float(), obj0, gap, dropped, vocab)
        theta = _squarem(theta, th1, obj0, step)
    raise RuntimeError(f"positional mixture did not converge in {max_iter} steps (certificate {gap:.2e} > {tol:g})")


def _squarem(th0: Tensor, th1: Tensor, obj0: Tensor, step) -> Tensor:
    """One SQUAREM step (Varadhan and Roland 2008) per row, falling back to two EM steps where
    the extrapolation leaves the simplex or lowers the objective (so the objective never drops)."""
    _, th2, _ = step(th1)
    r, v = th1 - th0, th2 - 2 * th1 + th0
    alpha = -(r.norm(dim=1) / v.norm(dim=1).clamp_min(1e-300)).clamp_min(1.0)[:, None]  # [T, 1], <= -1
    for _ in range(20):  # halve the extrapolation towards alpha = -1 (which gives th2) until feasible
        th = th0 - 2 * alpha * r + alpha ** 2 * v
        bad = (th < 0).any(1, keepdim=True)
        if not bool(bad.any()):
            break
        alpha = torch.where(bad, (alpha - 1) / 2, alpha)
    th = torch.where((th < 0).any(1, keepdim=True), th2, th).clamp_min(0.0)
    th = th / th.sum(1, keepdim=True)
    obj, image, _ = step(th)
    worse = ~(obj >= obj0) | ~image.isfinite().all(1)  # a lower (or NaN) objective: keep the EM steps
    return torch.where(worse[:, None], th2, image)


def mixture_losses(mix: PositionalMixture, tokens: Tensor) -> Tensor:  # [batch, T]
    """Log loss of the mixture on ``tokens`` ``[batch, 2L+1]``: at query q, ``-log p_q(tokens[:, q+1])``."""
    targets = tokens[:, mix.queries + 1]  # [batch, T]
    hits = (tokens[:, None, :] == targets[:, :, None]).to(DTYPE)  # [batch, T, n_pos]
    p = (hits * mix.weights.to(DTYPE)[None]).sum(-1) + mix.uniform.to(DTYPE)[None] / (mix.vocab - 1)
    return -p.log()


def positional_bound(tokens: Tensor, half_len: int, vocab: int, **kwargs) -> tuple[Tensor, PositionalMixture]:
    """Per-sequence repeated-half loss ``[batch]`` of the optimal position-only mixture on
    ``tokens`` (its mean is the bound the 1-layer control is held to), and the mixture."""
    mix = optimal_positional_mixture(half_len, vocab, **kwargs)
    return mixture_losses(mix, tokens).mean(1), mix
