"""Linear probes: exact fits on data whose answer is known, and clear errors for bad input."""

import pytest
import torch

from mechscope.probe.linear import ProbeError, fit_probe, split_indices, train_probe


def _separable(n=600, d=16, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 3.0, d)  # anisotropic scales
    w = torch.randn(d, generator=g)
    y = (x @ w + noise * torch.randn(n, generator=g) > 0).long()
    return x, y, w


def test_binary_probe_recovers_direction_and_decodes():
    x, y, w = _separable(n=1000)
    fit = train_probe(x, y, seed=0)
    _, _, test = split_indices(1000, (0.6, 0.2, 0.2), seed=0)
    bayes = float(((x[test] @ w > 0).long() == y[test]).double().mean())  # the true rule, noise-free
    assert fit.accuracy >= bayes - 0.04
    assert fit.probe.converged
    v = fit.probe.direction()
    assert torch.nn.functional.cosine_similarity(v.float(), w, dim=0) > 0.95
    assert float(fit.majority_accuracy) < 0.7  # the probe is far above the trivial predictor


def test_original_label_values_are_kept():
    x, y, _ = _separable()
    labels = torch.where(y == 1, 7, 3)
    fit = train_probe(x, labels)
    pred = fit.probe.predict(x)
    assert set(pred.unique().tolist()) <= {3, 7}
    assert float((pred == labels).double().mean()) > 0.95


def test_multiclass_and_multitask():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(900, 8, generator=g)
    three = torch.bucketize(x[:, 0].contiguous(), torch.tensor([-0.5, 0.5]))  # 3 classes from feature 0
    other = (x[:, 1] > 0).long()  # binary task from feature 1 (shares the 3-class label space)
    fit = train_probe(x, torch.stack([three, other], 1))
    assert fit.test_accuracy.shape == (2,)
    assert bool((fit.test_accuracy > 0.9).all())
    assert fit.probe.predict(x).shape == (900, 2)
    # per-task direction: the 3-class task reads feature 0, the other task feature 1
    d0 = fit.probe.directions()[0]  # [d, 3]
    assert d0[0].abs().max() > 5 * d0[2:].abs().max()


def test_penalty_is_chosen_on_validation():
    # few examples, many noise features: a weak penalty overfits, so validation picks a stronger one
    g = torch.Generator().manual_seed(2)
    x = torch.randn(120, 200, generator=g)
    y = (x[:, 0] > 0).long()
    fit = train_probe(x, y, l2_grid=(1.0, 1e-5))
    assert set(fit.val_curve) == {1.0, 1e-5}
    assert float(fit.probe.l2[0]) == 1.0
    assert fit.val_curve[1.0] >= fit.val_curve[1e-5]


def test_fit_converges_to_the_optimum():
    x, y, _ = _separable(n=300, d=6)
    probe = fit_probe(x, y, l2=0.1)
    # gradient of the objective at the returned point is ~0 (checked in float64)
    from mechscope.probe.linear import _loss
    z = ((x.double() - probe.mean) / probe.std)
    w, b = probe.weight.clone().requires_grad_(True), probe.bias.clone().requires_grad_(True)
    gw, gb = torch.autograd.grad(_loss(z, w, b, y[:, None], probe.l2), [w, b])
    assert float(gw.abs().max()) < 1e-5 and float(gb.abs().max()) < 1e-5


def test_works_inside_no_grad():
    x, y, _ = _separable(n=200, d=4)
    with torch.no_grad():
        assert train_probe(x, y).accuracy > 0.9


def test_group_split_keeps_groups_together():
    groups = torch.arange(100).repeat_interleave(5)
    parts = split_indices(500, (0.6, 0.2, 0.2), seed=0, groups=groups)
    owners = [set(groups[p].tolist()) for p in parts]
    assert not (owners[0] & owners[1]) and not (owners[0] & owners[2]) and not (owners[1] & owners[2])
    assert sum(len(p) for p in parts) == 500


@pytest.mark.parametrize("labels, match", [
    (torch.zeros(50, dtype=torch.long), "single class"),
    (torch.arange(49) % 2, "49 entries but the activations have 50 rows"),
    (torch.rand(50), "integer class ids"),
])
def test_bad_labels(labels, match):
    with pytest.raises(ProbeError, match=match):
        train_probe(torch.randn(50, 3), labels)


def test_single_class_task_column_is_named():
    y = torch.stack([torch.arange(60) % 2, torch.ones(60, dtype=torch.long)], 1)
    with pytest.raises(ProbeError, match=r"column\(s\) \[1\] hold a single class"):
        train_probe(torch.randn(60, 3), y)


def test_nan_activations_are_refused():
    x = torch.randn(40, 3)
    x[5, 1] = float("nan")
    with pytest.raises(ProbeError, match=r"1 NaN .*first rows: \[5\]"):
        train_probe(x, torch.arange(40) % 2)


def test_activations_must_be_rows():
    with pytest.raises(ProbeError, match="2-D tensor"):
        train_probe(torch.randn(10, 2, 3), torch.arange(10) % 2)


def test_unknown_label_at_scoring_time():
    x, y, _ = _separable(n=100, d=3)
    probe = fit_probe(x, y)
    with pytest.raises(ProbeError, match="never saw"):
        probe.accuracy(x, torch.full((100,), 5))


def test_balanced_accuracy_and_when_it_is_reported():
    from mechscope.probe.linear import balanced_accuracy, is_imbalanced

    target = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    always_zero = torch.zeros(10, dtype=torch.long)
    assert float(balanced_accuracy(always_zero, target)) == 0.5  # accuracy 0.8, but chance per class
    assert float(balanced_accuracy(target, target)) == 1.0
    two_tasks = torch.stack([target, 1 - target], 1)
    assert balanced_accuracy(two_tasks, two_tasks).tolist() == [1.0, 1.0]
    assert is_imbalanced(target) and not is_imbalanced(torch.tensor([0, 1] * 5))
    assert not is_imbalanced(torch.tensor([0] * 11 + [1] * 9))  # 55 %: within 1.1x the even share
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    skewed = (x[:, 0] > 1.0).long()  # about 16 % ones
    fit = train_probe(x, skewed, seed=0)
    assert fit.imbalanced and fit.balanced_accuracy is not None and fit.summary()["balanced_accuracy"] is not None
    even = train_probe(x, (x[:, 0] > 0).long(), seed=0)
    assert not even.imbalanced and even.balanced_accuracy is None
