import torch

from mechscope.causal.das import FitConfig, das
from mechscope.causal.iia import iia
from mechscope.tasks import hierarchical_equality as he


def test_causal_model_on_hand_examples():
    m = he.causal_model()
    a, b = torch.tensor([[0.1, 0.2, 0.3, 0.4]]), torch.tensor([[0.5, 0.6, 0.7, 0.8]])
    assert m.run({"W": a, "X": a, "Y": b, "Z": b}).tolist() == [True]  # equal == equal
    assert m.run({"W": a, "X": b, "Y": a, "Z": b}).tolist() == [True]  # unequal == unequal
    assert m.run({"W": a, "X": a, "Y": a, "Z": b}).tolist() == [False]


def test_sampler_balances_the_four_cases_with_fresh_vectors():
    v = he.sample(8000, torch.Generator().manual_seed(0))
    s = he.causal_model().solve(v)
    for wx in (False, True):
        for yz in (False, True):
            frac = float(((s["WX"] == wx) & (s["YZ"] == yz)).float().mean())
            assert 0.22 < frac < 0.28
    assert v["W"].min() >= -1 and v["W"].max() <= 1 and he.to_model_inputs(v).shape == (8000, 16)
    # training and test streams do not share vectors
    test = he.sample(1000, torch.Generator().manual_seed(10_000))
    assert not bool((torch.cdist(v["W"][:1000], test["W"]) == 0).any())


def test_shipped_network_is_accurate_on_unseen_vectors():
    model = he.load_model()
    assert he.accuracy(model, 4000, seed=3) >= 0.99


def test_recipe_trains_and_ships_a_loadable_network(tmp_path):
    [path] = he.train_and_ship(tmp_path, log=lambda *a: None, cfg=he.QUICK)  # 1/8 of the recipe's examples
    model = he.load_model(path)
    assert he.accuracy(model, 2000, seed=1) > 0.7  # well above chance (0.5) already; the full recipe reaches 0.999


def test_das_on_the_shipped_network_beats_a_random_subspace():
    from mechscope.causal.baselines import random_subspace

    model = he.load_model()
    train = he.training_counterfactuals(1500, seed=0)
    test = he.counterfactuals(500, 100, "both")
    al, fit = das(model, train, he.site(0), 8, cfg=FitConfig(epochs=4, batch_size=512))
    rand = random_subspace({v: he.site(0) for v in he.VARIABLES}, {v: 8 for v in he.VARIABLES}, {he.site(0): 16})
    assert fit.engine == "tail"
    assert iia(model, test, al).value > iia(model, test, rand).value + 0.15
