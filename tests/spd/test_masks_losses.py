"""Hard sigmoids, stochastic masks, losses and schedules: values worked out by hand."""

import math

import pytest
import torch

from mechscope.spd import losses, masks


def test_hard_sigmoids_match_their_definitions():
    z = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 1.5, 3.0])
    assert masks.hard_sigmoid(z).tolist() == pytest.approx([0, 0, 0, 0.3, 1, 1, 1])
    assert masks.lower_leaky_hard_sigmoid(z).tolist() == pytest.approx([-0.02, -0.005, 0, 0.3, 1, 1, 1])
    assert masks.upper_leaky_hard_sigmoid(z).tolist() == pytest.approx([0, 0, 0, 0.3, 1, 1.005, 1.02])


def test_leaky_parts_keep_gradients_where_the_clamp_kills_them():
    z = torch.tensor([-1.0, 2.0], requires_grad=True)
    masks.lower_leaky_hard_sigmoid(z).sum().backward()
    assert z.grad.tolist() == pytest.approx([0.01, 0.0])  # below 0: leak; above 1: flat
    z.grad = None
    masks.upper_leaky_hard_sigmoid(z).sum().backward()
    assert z.grad.tolist() == pytest.approx([0.0, 0.01])  # below 0: flat; above 1: leak


def test_stochastic_masks_keep_important_and_scale_unimportant():
    gen = torch.Generator().manual_seed(0)
    g = torch.tensor([[1.0, 0.0, 0.5]]).expand(20000, 3)
    m = masks.stochastic_mask(g, "continuous", gen)
    assert torch.all(m[:, 0] == 1.0)  # important: always kept
    assert 0.0 <= float(m[:, 1].min()) and float(m[:, 1].max()) <= 1.0
    assert float(m[:, 1].mean()) == pytest.approx(0.5, abs=0.02)  # unimportant: U(0, 1)
    assert float(m[:, 2].min()) >= 0.5 and float(m[:, 2].mean()) == pytest.approx(0.75, abs=0.02)
    b = masks.stochastic_mask(g, "binomial", gen)
    assert set(b[:, 1].unique().tolist()) == {0.0, 1.0}
    assert float(b[:, 1].mean()) == pytest.approx(0.5, abs=0.02)


def test_masks_pass_gradients_to_importances():
    g = torch.full((4, 3), 0.2, requires_grad=True)
    r = masks.stochastic_source(g, "continuous", torch.Generator().manual_seed(1))
    m = masks.stochastic_mask(g, "continuous", torch.Generator().manual_seed(1))
    m.sum().backward()
    assert torch.allclose(g.grad, 1.0 - r)  # dm/dg = 1 - r


def test_unknown_mask_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="continuous.*binomial"):
        masks.stochastic_mask(torch.zeros(2), "gaussian")


def test_importance_minimality_by_hand():
    g = {"a": torch.tensor([[0.5, 0.0], [1.0, 0.25]]), "b": torch.tensor([[2.0], [0.0]])}
    # p = 1: sum over C, mean over batch, summed over layers: (0.5 + 1.25)/2 + 2/2
    assert float(losses.importance_minimality(g, 1.0)) == pytest.approx(0.875 + 1.0, rel=1e-6)
    # p = 2: (0.25 + 1.0625)/2 + 4/2
    assert float(losses.importance_minimality(g, 2.0)) == pytest.approx(0.65625 + 2.0, rel=1e-6)


def test_reconstruction_distances():
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert float(losses.mse(a, b)) == 1.0
    logits = torch.randn(2, 5, 7)
    assert float(losses.kl(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 5, 7)
    p, q = torch.softmax(logits, -1), torch.softmax(other, -1)
    by_hand = (p * (p.log() - q.log())).sum(-1)  # KL(target = logits || masked = other)
    assert float(losses.kl(other, logits)) == pytest.approx(float(by_hand.mean()), rel=1e-5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert float(losses.kl(other, logits, mask)) == pytest.approx(float(by_hand[mask.bool()].mean()), rel=1e-5)
    with pytest.raises(ValueError, match="mse.*kl"):
        losses.reconstruction("l1", a, b)


def test_schedules():
    assert losses.annealed_p(0.5, 2.0, None, 0.0, 1.0) == 2.0
    assert losses.annealed_p(0.0, 2.0, 0.4, 0.0, 1.0) == 2.0
    assert losses.annealed_p(0.5, 2.0, 0.4, 0.0, 1.0) == pytest.approx(1.2)
    assert losses.annealed_p(0.9, 2.0, 0.4, 0.2, 0.6) == pytest.approx(0.4)
    assert losses.lr_factor(0, 100, "constant") == 1.0
    assert losses.lr_factor(0, 101, "cosine") == pytest.approx(1.0)
    assert losses.lr_factor(50, 101, "cosine") == pytest.approx(0.5)
    assert losses.lr_factor(100, 101, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert losses.lr_factor(4, 100, "cosine", warmup_frac=0.1) == pytest.approx(0.5)
    assert losses.lr_factor(10, 100, "cosine", warmup_frac=0.1) == pytest.approx(1.0)
    assert math.isclose(losses.lr_factor(3, 10, "constant", 0.5), 0.8)
    with pytest.raises(ValueError, match="cosine"):
        losses.lr_factor(0, 10, "linear")
