"""The one registry of tasks: `mechscope train`, the bench and `--model NAME` read it."""

import pytest
import torch

from mechscope import zoo
from mechscope.tasks import price_tagging, registry, steering_toy
from mechscope.tasks.registry import Task

# the names `mechscope train --list` printed before the registries were merged
TRAIN_NAMES = {
    "grokking", "grokking_quick", "induction", "induction_1l", "hierarchical_equality", "price_tagging",
    "spd_tms_5_2", "spd_tms_40_10", "spd_tms_5_2_id", "spd_resid_mlp", "spd_tms_5_2_decomposition",
    "spd_tms_40_10_decomposition", "spd_tms_5_2_id_decomposition", "spd_resid_mlp_decomposition",
    "sae_synthetic", "sae_toy_worlds", "sae_induction", "sae_grokking", "steering_toy", "instructions", "othello",
    "ravel", "rival_variables",
}


def test_every_train_name_is_one_task_and_the_list_prints_them(capsys):
    from mechscope.cli import main

    assert set(registry.names()) == TRAIN_NAMES
    assert all(isinstance(t, Task) and callable(t.ship) for t in registry.TASKS.values())
    assert main(["train", "--list"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert listed == TRAIN_NAMES


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(registry.UnknownTaskError, match="did you mean 'othello'"):
        registry.get("othelo")
    with pytest.raises(registry.UnknownTaskError, match="unknown built-in model 'sae_synthetic'"):
        registry.build_model("sae_synthetic")  # trainable, but no model of its own


def test_models_are_the_zoo_architectures_and_the_worlds_trained_models():
    names = registry.model_names()
    assert set(zoo.names()) <= set(names)
    assert {"steering_toy", "instructions", "othello"} <= set(names)  # the zoo's former trained entries
    a, b = registry.build_model("transformer", seed=3), zoo.build("transformer", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    toy = registry.build_model("steering_toy")
    shipped = steering_toy.load()
    assert not toy.training and all(torch.equal(p, q) for p, q in zip(toy.parameters(), shipped.parameters()))


def test_worlds_follow_the_task_protocol():
    for name in ("steering_toy", "instructions", "othello", "grokking", "grokking_quick", "induction", "induction_1l",
                 "hierarchical_equality", "price_tagging"):
        t = registry.get(name)
        assert t.Recipe is not None and t.train is not None and t.checkpoint.exists(), name
        assert t.Recipe(seed=5).seed == 5
    assert registry.get("induction_1l").Recipe(seed=1).n_layers == 1
    he = registry.get("hierarchical_equality")
    assert he.causal_model is not None and he.sample is not None
    with pytest.raises(ValueError, match="no seeded recipe"):
        registry.get("sae_synthetic").retrain(0)


def test_retrain_is_the_recipe_at_a_seed():
    t = registry.get("price_tagging")
    cfg = t.Recipe(seed=3, steps=5, batch_size=16)
    a, b = t.train(cfg), price_tagging.train(cfg, log=lambda *_: None)[0]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
