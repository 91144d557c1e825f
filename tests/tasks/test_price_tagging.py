import torch

from mechscope.causal.iia import correct_mask
from mechscope.core.checkpoint import load_module_state
from mechscope.tasks import price_tagging as pt


def test_causal_model_and_answer_tokens():
    m = pt.causal_model()
    v = {"X": torch.tensor([2, 2, 2]), "Y": torch.tensor([5, 5, 5]), "Z": torch.tensor([3, 1, 7])}
    s = m.solve(v)
    assert s["L"].tolist() == [True, False, True] and s["R"].tolist() == [True, True, False]
    assert pt.answer_token(s["O"]).tolist() == [pt.YES, pt.NO, pt.NO]
    assert pt.to_model_inputs(v).tolist()[0] == [2, 5, 3, pt.QUERY]


def test_sampler_keeps_x_below_y_and_balances_the_cases():
    v = pt.sample(20_000, torch.Generator().manual_seed(0))
    assert bool((v["X"] <= v["Y"]).all()) and int(v["Z"].min()) == 0 and int(v["Z"].max()) == 9
    s = pt.causal_model().solve(v)
    assert 0.55 < float(s["O"].float().mean()) < 0.65  # 1/2 in range, plus fall-backs where below/above is empty
    assert float((~s["L"]).float().mean()) > 0.15 and float((~s["R"]).float().mean()) > 0.15


def test_counterfactuals_for_the_left_boundary():
    d = pt.counterfactuals(400, 0, "L")
    hl = d.meta["high_level"]
    want = (hl["L"]["Z"] >= hl["L"]["X"]) & (hl["base"]["Z"] <= hl["base"]["Y"])
    assert torch.equal(d.labels, pt.answer_token(want))
    assert set(d.labels.unique().tolist()) == {pt.NO, pt.YES} and 0.4 < float(d.changed.float().mean()) < 0.6


def test_shipped_network_answers_every_input():
    model = pt.load_model()
    assert pt.accuracy(model) == 1.0
    assert bool(correct_mask(model, pt.counterfactuals(200, 1, "L"), pt.readout).all())


def test_recipe_ships_a_loadable_checkpoint(tmp_path):
    [path] = pt.train_and_ship(tmp_path, log=lambda *a: None, cfg=pt.TrainConfig(steps=40, batch_size=64))
    model = pt.build_model()
    meta = load_module_state(path, model)
    assert meta["config"]["task"] == "price_tagging" and 0.0 <= meta["config"]["accuracy"] <= 1.0
    assert pt.accuracy(model) == meta["config"]["accuracy"]
