"""The rival-variables world (issue 21): S = X + Y exists by construction, its rival T = Y + Z does not."""

import pytest
import torch

from mechscope.causal import hypothesis as hyp
from mechscope.core.run import cache
from mechscope.tasks import registry
from mechscope.tasks import rival_variables as rv


@pytest.fixture(scope="module")
def model():
    return rv.load()


def pairs(seed=0, n=400):
    return rv.hypothesis("S").counterfactuals(rv.sample, n, rv.to_model_inputs, seed=seed, balance=False)


def test_the_shipped_network_is_small_accurate_and_keeps_its_block_structure(model):
    assert rv.CHECKPOINT.stat().st_size < 2_000_000
    assert rv.accuracy(model) == 1.0
    # the XY block of layers 0 and 1 does not move when z changes; the Z block does
    v = rv.all_inputs()
    moved = dict(v, Z=(v["Z"] + 3) % rv.K)
    sites = [rv.site(0), rv.site(1)]
    a, b = cache(model, rv.to_model_inputs(v), sites), cache(model, rv.to_model_inputs(moved), sites)
    for s in sites:
        assert torch.equal(a[s][:, :rv.BLOCK], b[s][:, :rv.BLOCK]) and not torch.equal(a[s], b[s])


def test_the_right_hypothesis_wins_with_an_interval_excluding_zero(model):
    for layer in (0, 1):
        c = hyp.compare(rv.hypothesis("S", layer), rv.hypothesis("T", layer), model, pairs(), seed=1)
        assert c.winner == f"S at hidden.{layer}" and c.joint.interval[0] > 0.5
        assert c.a.joint.iia == 1.0 and c.b.joint.iia < 0.3 and c.joint.n == 400
        flipped = hyp.compare(rv.hypothesis("T", layer), rv.hypothesis("S", layer), model, pairs(), seed=1)
        assert flipped.winner == f"S at hidden.{layer}" and flipped.joint.interval[1] < 0  # the wrong one never wins


def test_where_the_blocks_are_mixed_neither_fits(model):
    c = hyp.compare(rv.hypothesis("S", 2), rv.hypothesis("T", 2), model, pairs())
    assert c.winner is None and c.a.joint.iia < 0.3 and c.b.joint.iia < 0.3


def test_the_constraint_is_what_makes_s_true():
    # the same recipe without the mask: nothing keeps z out of the first units, so S need not be there
    net = rv.build_model(0)
    assert all(float(net.get_parameter(n).detach().mul(1 - m).abs().max()) == 0 for n, m in rv.masks().items())
    with torch.no_grad():
        net.layers[0].weight[0, -1] = 0.5
    with pytest.raises(ValueError, match=r"layers.0.weight has weight 0.5 where the block structure needs 0"):
        rv.check_constraint(net)


def test_registered_and_retrainable(tmp_path):
    task = registry.get("rival_variables")
    assert task.checkpoint == rv.CHECKPOINT and task.causal_model("T").order[-2] == "T"
    retrained = task.train(task.Recipe(seed=0, steps=300))
    assert rv.accuracy(retrained) > 0.9
    with pytest.raises(ValueError, match=r"intermediates 'S' \(X \+ Y\) and 'T' \(Y \+ Z\)"):
        rv.causal_model("U")
    with pytest.raises(FileNotFoundError, match="mechscope train rival_variables"):
        rv.load(tmp_path / "missing.safetensors")
