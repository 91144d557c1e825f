"""The position-only bound of the 1-layer induction control, against brute force."""

import itertools
import math

import pytest
import torch

from mechscope.tasks import induction
from mechscope.tasks import induction_bound as ib


def _all_training_sequences(L: int, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training sequence of a tiny world (every period, every r) and its probability."""
    periods = induction.training_periods(L)
    seqs, probs = [], []
    for P in periods.tolist():
        for r in itertools.product(range(1, V), repeat=L):
            seqs.append(torch.cat([torch.tensor([induction.BOS]), torch.tensor(r)[torch.arange(2 * L) % P]]))
            probs.append(1.0 / len(periods) / (V - 1) ** L)
    return torch.stack(seqs), torch.tensor(probs, dtype=torch.float64)


def _brute_objective(theta: torch.Tensor, queries: torch.Tensor, seqs, probs, V: int) -> torch.Tensor:
    """E log p_q(next token) over every training sequence, per query ``[T]`` (theta: [T, n_pos + 1])."""
    w, wu = theta[:, :-1], theta[:, -1]
    targets = seqs[:, queries + 1]  # [S, T]
    hits = (seqs[:, None, :] == targets[:, :, None]).to(torch.float64)  # [S, T, n_pos]
    p = (hits * w[None]).sum(-1) + wu[None] / (V - 1)
    return (p.log() * probs[:, None]).sum(0)


@pytest.mark.parametrize("queries", [None, torch.arange(1, 8)])
def test_optimal_mixture_matches_brute_force_on_a_tiny_world(queries):
    L, V = 4, 4  # periods 2..4, three tokens: 3 * 81 sequences
    mix = ib.optimal_positional_mixture(L, V, queries=queries, max_collisions=None, tol=1e-9)
    seqs, probs = _all_training_sequences(L, V)
    theta = torch.cat([mix.weights.double(), mix.uniform.double()[:, None]], 1).requires_grad_(True)
    brute = _brute_objective(theta, mix.queries, seqs, probs, V)
    # the collision enumeration is the exact expectation
    assert torch.allclose(brute.detach(), mix.objective, atol=1e-6)
    # optimal: by concavity, max_j dG/dtheta_j - 1 bounds the distance to the optimum
    grad, = torch.autograd.grad(brute.sum(), theta)
    n_pos = 2 * L + 1
    valid = torch.cat([(torch.arange(n_pos)[None] >= 1) & (torch.arange(n_pos)[None] <= mix.queries[:, None]),
                       torch.ones(len(mix.queries), 1, dtype=torch.bool)], 1)
    assert float(grad.masked_fill(~valid, 0).amax(1).max()) - 1.0 < 1e-5
    assert torch.allclose(theta.detach().sum(1), torch.ones(len(mix.queries), dtype=torch.float64), atol=1e-6)
    # and no random mixture over the same positions does better
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        rand = torch.rand(theta.shape, generator=gen, dtype=torch.float64) * valid
        rand = rand / rand.sum(1, keepdim=True)
        assert bool((_brute_objective(rand, mix.queries, seqs, probs, V) <= brute.detach() + 1e-9).all())


def test_mixture_loss_is_the_brute_force_log_loss():
    L, V = 4, 4
    mix = ib.optimal_positional_mixture(L, V, max_collisions=None)
    toks = induction.eval_batch(induction.InductionConfig(half_len=L, vocab=V), n=16)
    w, wu = mix.weights.tolist(), mix.uniform.tolist()
    direct = [[-math.log(sum(w[t][k] for k in range(2 * L + 1) if s[k] == s[q + 1]) + wu[t] / (V - 1))
               for t, q in enumerate(mix.queries.tolist())] for s in toks.tolist()]
    assert torch.allclose(ib.mixture_losses(mix, toks), torch.tensor(direct, dtype=torch.float64), atol=1e-6)


def test_without_collisions_the_optimum_shares_mass_onto_keys_right_under_two_periods():
    # L = 20, first query of the repeat (q = 21): the key 20 back (sequence position 2) is right under
    # P = 10 and P = 20, every other key from 11 to 19 back under one period: max 2 log a + 9 log b
    # on a + 9 b = 1 gives a = 2/11, b = 1/11 (the prior's weights would be 1/11 each).
    mix = ib.optimal_positional_mixture(20, 10 ** 6, queries=torch.tensor([21]), max_collisions=1)
    w = mix.weights[0].double()
    assert float(w[2]) == pytest.approx(2 / 11, abs=1e-4)
    assert torch.allclose(w[3:12], torch.full((9,), 1 / 11, dtype=torch.float64), atol=1e-4)
    assert float(w.sum() - w[2:12].sum()) + float(mix.uniform[0]) < 1e-4


def test_bound_is_at_most_the_even_guess_on_the_bench_batch_and_in_training():
    cfg = induction.InductionConfig()
    toks = induction.eval_batch(cfg)
    per_seq, mix = ib.positional_bound(toks, cfg.half_len, cfg.vocab)
    assert per_seq.shape == (256,) and mix.gap < 1e-6 and mix.dropped_mass < 2e-5
    assert float(per_seq.mean()) <= induction.position_only_loss(toks, cfg.half_len)
    # in expectation over the training distribution the optimum beats the even guess too
    L, q = cfg.half_len, mix.queries
    even = torch.zeros(len(q), 2 * L + 1, dtype=torch.float64)
    for t, qq in enumerate(q.tolist()):
        src = qq + 1 - induction.training_periods(L)
        even[t].index_add_(0, src, torch.full((len(src),), 1.0 / len(src), dtype=torch.float64))
    periods, K = induction.training_periods(L), cfg.vocab - 1
    pats = {P - 1: ib._collision_patterns(P - 1, 4, 1 / K)[:2] for P in periods.tolist()}
    obj_even, _, _ = ib._objective_and_grad(even, torch.zeros(len(q), dtype=torch.float64), q, periods, K, pats)
    assert bool((mix.objective >= obj_even - 1e-9).all())
    assert float(mix.objective.mean()) > float(obj_even.mean()) + 0.05


def test_bad_queries_are_refused():
    with pytest.raises(ValueError, match="queries must lie"):
        ib.optimal_positional_mixture(4, 4, queries=torch.tensor([8]))
    assert math.isclose(float(induction.training_periods(20)[0]), 10) and len(induction.training_periods(20)) == 11
