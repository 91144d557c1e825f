"""Confidence intervals: Wilson's for proportions, a seeded percentile bootstrap for means."""

from __future__ import annotations

import math

import pytest
import torch

from mechscope.core.stats import bootstrap_interval, wilson_interval


def test_wilson_matches_the_closed_form_and_stays_in_the_unit_interval():
    lo, hi = wilson_interval(0.5, 100)
    half = 1.959963984540054 * math.sqrt(0.25 / 100 + 1.959963984540054 ** 2 / 40000) / (1 + 1.959963984540054 ** 2 / 100)
    assert lo == pytest.approx(0.5 - half) and hi == pytest.approx(0.5 + half)
    assert wilson_interval(1.0, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    assert wilson_interval(0.0, 5)[0] == 0.0
    assert wilson_interval(0.93, 2000)[1] - wilson_interval(0.93, 2000)[0] < 0.025


def test_wilson_covers_about_95_percent():
    gen = torch.Generator().manual_seed(0)
    p, n, trials = 0.9, 200, 2000
    hits = torch.bernoulli(torch.full((trials, n), p), generator=gen).mean(1)
    covered = sum(lo <= p <= hi for lo, hi in (wilson_interval(float(h), n) for h in hits))
    assert 0.93 <= covered / trials <= 0.97


@pytest.mark.parametrize("p,n", [(1.2, 10), (0.5, 0), (0.5, 2.5), (0.5, True)])
def test_wilson_refuses_what_is_not_a_proportion(p, n):
    with pytest.raises(ValueError):
        wilson_interval(p, n)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    x = torch.randn(500, generator=torch.Generator().manual_seed(1)) + 3.0
    a, b = bootstrap_interval(x), bootstrap_interval(x)
    assert a == b and a[0] < float(x.mean()) < a[1]
    assert a[1] - a[0] == pytest.approx(2 * 1.96 * float(x.std()) / math.sqrt(500), rel=0.15)
    custom = bootstrap_interval(x, lambda v: v.median())
    assert custom[0] < float(x.median()) < custom[1]


def test_bootstrap_refuses_too_few_examples_and_a_bad_level():
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_interval([1.0])
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval([1.0, 2.0], level=1.5)


def test_auc_null_distribution_is_exact_against_enumeration():
    import itertools

    from mechscope.core.stats import auc_permutation_p, auc_random_quantile

    n_pos, n_neg = 3, 4
    aucs = []
    for members in itertools.combinations(range(n_pos + n_neg), n_pos):  # every ranking, up to ties
        others = [i for i in range(n_pos + n_neg) if i not in members]
        aucs.append(sum(m > o for m in members for o in others) / (n_pos * n_neg))
    for a in sorted(set(aucs)):
        assert auc_permutation_p(a, n_pos, n_neg) == pytest.approx(sum(x >= a for x in aucs) / len(aucs))
    q = auc_random_quantile(0.95, n_pos, n_neg)
    assert sum(x <= q for x in aucs) / len(aucs) >= 0.95 > sum(x < q for x in aucs) / len(aucs)
