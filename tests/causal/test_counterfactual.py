import pytest
import torch

from handbuilt import causal_model, data, sample, to_inputs
from mechscope.causal.counterfactual import CounterfactualError, combine, make_counterfactuals


def test_labels_are_the_causal_models_counterfactuals():
    d = data("P", n=200)
    hl = d.meta["high_level"]
    expected = (hl["P"]["A"] + hl["base"]["B"]) == 2  # P from the source, Q from the base
    assert torch.equal(d.labels, expected.long())
    assert torch.equal(d.base_labels, ((hl["base"]["A"] + hl["base"]["B"]) == 2).long())
    assert torch.equal(d.base, to_inputs(hl["base"])) and torch.equal(d.sources["P"], to_inputs(hl["P"]))


def test_a_subset_keeps_the_high_level_inputs_of_its_rows():
    """subset() (here a reversal, the same size) carries the high-level values with the rows,
    so the labels still are the causal model's on them."""
    d = data("P", n=200).subset(torch.arange(199, -1, -1)[:150])
    hl = d.meta["high_level"]
    assert len(hl["base"]["A"]) == len(d) == 150
    assert torch.equal(d.labels, ((hl["P"]["A"] + hl["base"]["B"]) == 2).long())
    assert torch.equal(d.base, to_inputs(hl["base"])) and torch.equal(d.sources["P"], to_inputs(hl["P"]))


def test_balanced_over_class_and_change():
    d = data(["P", "Q"], n=400)
    for c in (0, 1):
        for changed in (False, True):
            assert int(((d.labels == c) & (d.changed == changed)).sum()) == 100


def test_deterministic_given_a_seed():
    a, b, c = data("P", seed=3), data("P", seed=3), data("P", seed=4)
    assert torch.equal(a.base, b.base) and torch.equal(a.sources["P"], b.sources["P"]) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.base, c.base)


def test_combine_fills_missing_sources_with_the_base():
    p, q = data("P", n=40), data("Q", n=40)
    both = combine([p, q])
    assert both.variables == ("P", "Q") and len(both) == 80
    assert torch.equal(both.sources["Q"][:40], p.base) and not bool(both.active["Q"][:40].any())
    assert bool(both.active["Q"][40:].all())


def test_impossible_bucket_is_an_error_unless_unbalanced():
    # intervening on A when the output ignores it: the output never changes
    from mechscope.causal.model import CausalModel, Variable
    m = CausalModel([Variable("A", (0, 1)), Variable("B", (0, 1)),
                     Variable("O", (False, True), ("B",), lambda b: b == 1)], output="O")
    with pytest.raises(CounterfactualError, match="could not fill every bucket.*changed"):
        make_counterfactuals(m, "A", sample, 20, to_inputs, max_rounds=3)
    assert len(make_counterfactuals(m, "A", sample, 20, to_inputs, balance=False)) == 20


def test_bad_requests_are_errors():
    with pytest.raises(Exception, match="unknown variable 'R'"):
        make_counterfactuals(causal_model(), "R", sample, 10, to_inputs)
    with pytest.raises(CounterfactualError, match="n must be >= 1"):
        make_counterfactuals(causal_model(), "P", sample, 0, to_inputs)
