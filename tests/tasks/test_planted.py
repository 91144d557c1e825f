"""Planted-neuron data: the planted neurons and only they separate the classes."""

import pytest
import torch

from mechscope.tasks.planted import make_planted


def test_shapes_support_and_shift_direction():
    data = make_planted(n=4000, d=50, k=4, shift=1.0, seed=0)
    assert data.x.shape == (4000, 50) and data.y.shape == (4000,) and data.support.shape == (4,)
    pre_diff = data.x[data.y == 1].mean(0) - data.x[data.y == 0].mean(0)
    others = torch.ones(50, dtype=torch.bool)
    others[data.support] = False
    assert bool((pre_diff[data.support].sign() == data.signs).all())  # GELU is monotone: the sign survives
    assert float(pre_diff[data.support].abs().min()) > 0.2  # E[GELU(z - 1)] - E[GELU(z)] is about -0.31
    assert float(pre_diff[others].abs().max()) < 0.1


def test_seeded_and_class_balance():
    a, b = make_planted(n=500, seed=3), make_planted(n=500, seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.support, b.support)
    assert 0.05 < float(make_planted(n=4000, pos_frac=0.1).y.double().mean()) < 0.15


def test_bad_arguments():
    with pytest.raises(ValueError, match="1 <= k <= d"):
        make_planted(d=4, k=5)
    with pytest.raises(ValueError, match="pos_frac"):
        make_planted(pos_frac=1.0)
