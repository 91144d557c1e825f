"""The RAVEL world: its table, causal model, counterfactual pairs and shipped network."""

import pytest
import torch

from mechscope.causal.iia import correct_mask
from mechscope.tasks import ravel, registry


def test_table_balances_values_and_the_causal_model_answers_the_query():
    for a in ravel.ATTRIBUTES:
        counts = torch.bincount(ravel.TABLE[a], minlength=ravel.N_VALUES[a])
        assert counts.tolist() == [ravel.N_ENTITIES // ravel.N_VALUES[a]] * ravel.N_VALUES[a]
    v = {"T": torch.tensor([0, 3]), "E": torch.tensor([5, 5]), "Q": torch.tensor([0, 1])}
    out = ravel.causal_model().run(v)
    assert out.tolist() == [ravel.VALUE0["colour"] + int(ravel.TABLE["colour"][5]),
                            ravel.VALUE0["shape"] + int(ravel.TABLE["shape"][5])]
    assert ravel.to_model_inputs(v).tolist()[1] == [3, ravel.ENTITY0 + 5, ravel.QUERY0 + 1]


def test_splits_are_disjoint_and_cover_every_entity():
    train, test = set(ravel.SPLITS["train"].tolist()), set(ravel.SPLITS["test"].tolist())
    assert not train & test and len(train | test) == ravel.N_ENTITIES


def test_cause_pairs_take_the_source_value_and_isolate_pairs_keep_the_base_value():
    cause = ravel.counterfactuals("colour", "colour", 200, 0, "train")
    hl = cause.meta["high_level"]
    src, base = ravel.TABLE["colour"][hl["colour"]["E"]], ravel.TABLE["colour"][hl["base"]["E"]]
    assert torch.equal(cause.labels, ravel.VALUE0["colour"] + src) and bool((src != base).all())
    iso = ravel.counterfactuals("colour", "shape", 200, 1, "test")
    hl = iso.meta["high_level"]
    assert torch.equal(iso.labels, iso.base_labels)
    assert bool((ravel.TABLE["shape"][hl["colour"]["E"]] != ravel.TABLE["shape"][hl["base"]["E"]]).all())
    assert set(hl["base"]["E"].tolist()) <= set(ravel.SPLITS["test"].tolist())
    assert iso.name == "isolate:colour|shape" and cause.name == "cause:colour"


def test_bad_queries_are_clear_errors():
    with pytest.raises(ravel.RavelError, match="unknown attribute 'size'.*colour"):
        ravel.counterfactuals("size", "colour", 10, 0)
    with pytest.raises(ravel.RavelError, match="unknown entity split"):
        ravel.counterfactuals("colour", "shape", 10, 0, split="dev")
    with pytest.raises(ravel.RavelError, match="layer must be in 0..2"):
        ravel.site(3)


def test_shipped_network_answers_every_prompt_and_is_registered():
    task = registry.get("ravel")
    model = task.load()
    assert ravel.accuracy(model) == 1.0
    assert bool(correct_mask(model, ravel.counterfactuals("shape", "colour", 100, 2), ravel.readout).all())
    assert task.checkpoint.stat().st_size < 2 * 1024 * 1024 and task.causal_model is ravel.causal_model


def test_recipe_is_seeded_and_ships_a_loadable_checkpoint(tmp_path):
    recipe = ravel.Recipe(steps=5, batch=16, seed=3)
    a, b = ravel.train(recipe), ravel.train(recipe)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    [path] = ravel.train_and_ship(tmp_path, recipe=recipe)
    loaded = ravel.load(path)
    assert path.name == ravel.CHECKPOINT.name
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), loaded.parameters()))
