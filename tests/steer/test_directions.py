"""Steering directions on activations whose concept direction is planted."""

import pytest
import torch

from mechscope.steer.directions import (
    DirectionError,
    actadd,
    cosine,
    diff_of_means,
    paired_mean_difference,
    pca_of_differences,
    unit,
)
from mechscope.probe.linear import probe_direction


def _planted(n=400, d=32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    u = unit(torch.randn(d, generator=g))
    base = torch.randn(n, d, generator=g)
    strength = 1.0 + torch.rand(n, generator=g)  # how strongly each pair shows the concept
    return base + scale * strength[:, None] * u, base, u


def test_difference_of_means_recovers_the_planted_direction():
    pos, _, u = _planted()
    neg = torch.randn(400, 32, generator=torch.Generator().manual_seed(9))  # unpaired
    assert cosine(diff_of_means(pos, neg), u) > 0.95


def test_paired_directions_are_exact_for_paired_data():
    pos, neg, u = _planted()
    assert cosine(paired_mean_difference(pos, neg), u) == pytest.approx(1.0, abs=1e-6)
    assert cosine(actadd(pos[0], neg[0]), u) == pytest.approx(1.0, abs=1e-6)  # one pair suffices here
    v = pca_of_differences(pos, neg)
    assert cosine(v, u) == pytest.approx(1.0, abs=1e-4)  # points from - to +
    assert float(v.norm()) == pytest.approx(1.0)


def test_pca_sign_follows_the_pairs():
    pos, neg, u = _planted()
    assert cosine(pca_of_differences(neg, pos), u) == pytest.approx(-1.0, abs=1e-4)


def test_probe_direction_separates_the_classes():
    pos, neg, u = _planted(scale=1.0)
    x = torch.cat([pos, neg])
    y = torch.cat([torch.ones(400), torch.zeros(400)]).long()
    v = probe_direction(x, y)
    assert cosine(v, u) > 0.8

    def acc(w):  # split at the median score: the classes are balanced
        return float(((x @ w) > (x @ w).median()).long().eq(y).double().mean())
    assert acc(v) >= acc(u) - 0.03  # as good as the planted direction itself


def test_errors():
    with pytest.raises(DirectionError, match="widths 4 and 5"):
        diff_of_means(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(DirectionError, match="as many positive as negative"):
        paired_mean_difference(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(DirectionError, match="one prompt pair"):
        actadd(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(DirectionError, match="norm 0"):
        unit(torch.zeros(4))
    with pytest.raises(DirectionError, match="NaN"):
        diff_of_means(torch.full((2, 3), float("nan")), torch.randn(2, 3))
