"""Control tasks and selectivity (Hewitt & Liang), shuffled labels."""

import pytest
import torch

from mechscope.probe.control import control_labels, probe_with_controls, selectivity, shuffled_labels
from mechscope.probe.linear import ProbeError
from mechscope.tasks.planted import make_planted


def test_control_label_is_fixed_per_type_and_follows_the_label_distribution():
    types = torch.randint(0, 400, (20000,), generator=torch.Generator().manual_seed(0))
    labels = (torch.rand(20000, generator=torch.Generator().manual_seed(1)) < 0.25).long()
    ctrl = control_labels(types, labels, seed=3)
    for t in types.unique()[:50]:
        assert ctrl[types == t].unique().numel() == 1
    per_type = torch.stack([ctrl[types == t][0] for t in types.unique()]).double()
    assert abs(float(per_type.mean()) - 0.25) < 0.07  # drawn from the real distribution (400 draws)


def test_control_labels_for_several_tasks():
    types = torch.arange(30) % 6
    labels = torch.stack([torch.arange(30) % 2, torch.arange(30) % 3], 1)
    ctrl = control_labels(types, labels, seed=0)
    assert ctrl.shape == (30, 2)
    assert set(ctrl[:, 1].tolist()) <= {0, 1, 2}


def test_shuffled_is_a_permutation():
    y = torch.arange(100) % 3
    s = shuffled_labels(y, seed=1)
    assert sorted(s.tolist()) == sorted(y.tolist()) and not torch.equal(s, y)


def test_selectivity_is_task_minus_control():
    assert selectivity(0.9, 0.6) == pytest.approx(0.3)


def test_invisible_types_keep_the_control_at_chance():
    data = make_planted(n=1500, d=64, k=4, shift=1.5, seed=0)
    c = probe_with_controls(data.x, data.y, data.types, seed=0)
    assert c.control_accuracy - c.majority_accuracy < 0.06
    assert c.accuracy - c.majority_accuracy > 0.2
    assert c.selectivity > 0.15
    assert abs(c.shuffled_accuracy - c.majority_accuracy) < 0.06


def test_visible_types_are_memorised_and_selectivity_drops():
    # activations carry each example's type: a probe can learn the control task by memorising types
    data = make_planted(n=1500, d=64, k=4, shift=1.5, n_types=20, type_strength=0.95, seed=0)
    c = probe_with_controls(data.x, data.y, data.types, seed=0)
    assert c.control_accuracy > 0.8
    assert c.selectivity < 0.1


def test_types_of_wrong_length():
    with pytest.raises(ProbeError, match="one type id per example"):
        control_labels(torch.arange(5), torch.arange(6) % 2)


def test_constant_control_labels_count_as_solved():
    # two types only: the control draw may give both the same label; a constant predictor is then right
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    y = (x[:, 0] > 0).long()
    types = torch.zeros(200, dtype=torch.long)  # one type: the control labels are constant
    c = probe_with_controls(x, y, types)
    assert c.control_accuracy == 1.0 and c.selectivity < 0.1


def test_balanced_selectivity_speaks_where_one_class_dominates():
    """A property of 4 % of rows, readable from feature 0: plain accuracy is ~0.96 for any probe,
    task or control, so plain selectivity is near 0; balanced selectivity shows the gap."""
    from mechscope.probe.control import probe_with_controls
    from mechscope.probe.linear import split_indices

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=gen)
    labels = (x[:, 0] > 1.75).long()  # ~4 % positives
    types = torch.randint(0, 400, (1000,), generator=gen)  # token types: the control task's key
    c = probe_with_controls(x, labels, types, seed=0)
    assert c.balanced_selectivity is not None and c.balanced_selectivity > c.selectivity + 0.2
    assert c.summary()["balanced_selectivity"] == c.balanced_selectivity
    assert all(torch.equal(a, b) for a, b in zip(c.split, split_indices(1000, (0.6, 0.2, 0.2), 0, None)))
