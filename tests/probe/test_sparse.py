"""k-sparse probes recover planted neurons; rankings equal their textbook definitions."""

import pytest
import torch

from mechscope.probe.linear import ProbeError
from mechscope.probe.sparse import (
    RANKINGS,
    f1_score,
    f_stat_scores,
    mean_diff_scores,
    mutual_info_scores,
    rank_neurons,
    sparse_probe,
)
from mechscope.tasks.planted import make_planted


@pytest.mark.parametrize("method", RANKINGS)
def test_every_ranking_recovers_the_planted_support(method):
    data = make_planted(n=1200, d=128, k=5, shift=1.0, seed=3)
    sp = sparse_probe(data.x, data.y, 5, method, seed=0)
    assert sp.overlap(data.support.tolist()) == 1.0
    assert sorted(sp.neurons) == data.support.tolist()
    assert sp.f1 > 0.75


def test_f1_grows_with_the_shift():
    f1 = [sparse_probe(make_planted(n=1200, d=128, k=5, shift=s, seed=1).x,
                       make_planted(n=1200, d=128, k=5, shift=s, seed=1).y, 5).f1 for s in (0.1, 0.5, 2.0)]
    assert f1[0] < f1[1] < f1[2]


def test_f_statistic_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 5, generator=g).double(), (torch.rand(200, generator=g) < 0.3).long()
    ours = f_stat_scores(x, y)
    ref = scipy_stats.f_oneway(x[y == 0].numpy(), x[y == 1].numpy()).statistic
    assert torch.allclose(ours, torch.as_tensor(ref), rtol=1e-9)


def test_mean_difference_and_mutual_information_by_hand():
    x = torch.tensor([[0.0, 1.0], [0.0, 2.0], [1.0, 3.0], [1.0, 4.0]]).double()
    y = torch.tensor([0, 0, 1, 1])
    assert mean_diff_scores(x, y).tolist() == [1.0, 2.0]
    # 2 bins: neuron 0 and neuron 1 each split exactly by the label -> I = H(y) = 1 bit
    mi = mutual_info_scores(x, y, bins=2)
    assert torch.allclose(mi, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert float(mutual_info_scores(x, torch.tensor([0, 1, 0, 1]), bins=2)[1]) == pytest.approx(0.0)


def test_f1_by_hand():
    assert f1_score(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.5)
    assert f1_score(torch.tensor([0, 0]), torch.tensor([1, 0])) == 0.0


def test_bad_inputs():
    x = torch.randn(30, 4)
    with pytest.raises(ProbeError, match="binary labels"):
        sparse_probe(x, torch.arange(30) % 3, 2)
    with pytest.raises(ProbeError, match="k must be an int in 1..4"):
        sparse_probe(x, torch.arange(30) % 2, 5)
    with pytest.raises(ProbeError, match="unknown neuron ranking"):
        rank_neurons(x, torch.arange(30) % 2, "gini")
