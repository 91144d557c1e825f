import pytest
import torch

import handbuilt as hb
from mechscope.causal.alignment import Alignment, AlignmentError, Place
from mechscope.causal.counterfactual import CounterfactualError, combine
from mechscope.causal.iia import iia
from mechscope.core.featurize import Identity, Subspace
from mechscope.core.site import Site

SITE = Site("acts.0")


def true_alignment() -> Alignment:
    basis = Subspace(2, 2, init=hb.R)  # column 0 = P's direction, column 1 = Q's
    return Alignment({"P": Place(SITE, basis, (0,)), "Q": Place(SITE, basis, (1,))})


@pytest.mark.parametrize("engine", ["tail", "full"])
def test_known_alignment_has_iia_one_and_a_wrong_one_is_visibly_lower(engine):
    net = hb.network()
    for variables in (["P"], ["Q"], ["P", "Q"]):
        d = hb.data(variables, n=400)
        right = iia(net, d, true_alignment().restrict(variables), engine=engine)
        assert right.value == 1.0 and right.kept == right.n_pairs == 400 and right.engine == engine
    # neurons mix P and Q: neuron 0 for P, neuron 1 for Q
    neurons = Identity(2)
    wrong = Alignment({"P": Place(SITE, neurons, (0,)), "Q": Place(SITE, neurons, (1,))})
    d = hb.data(["P"], n=400)
    assert iia(net, d, wrong.restrict(["P"]), engine=engine).value < 0.8
    swapped = Alignment({"P": true_alignment()["Q"]})
    assert iia(net, d, swapped, engine=engine).value <= 0.6


def test_tail_and_full_engines_agree_exactly_on_a_random_alignment():
    net = hb.network()
    d = hb.data(["P", "Q"], n=400)
    basis = Subspace(2, 2, seed=3)
    al = Alignment({"P": Place(SITE, basis, (0,)), "Q": Place(SITE, basis, (1,))})
    assert iia(net, d, al, engine="tail").value == iia(net, d, al, engine="full").value


def test_only_pairs_the_model_gets_right_are_kept():
    net = hb.network()
    with torch.no_grad():
        net.readout.bias[1] += 5.0  # now it says "true" for (0, 1) and (1, 0) as well
    d = hb.data(["P"], n=400)
    res = iia(net, d, true_alignment().restrict(["P"]))
    assert res.n_pairs == 400 and 0 < res.kept < 400
    assert not iia(net, d, true_alignment().restrict(["P"]), filter_correct=False).kept < 400


def test_empty_after_filtering_is_an_error():
    net = hb.network()
    with torch.no_grad():  # negated logits: always the wrong class
        net.readout.weight.neg_()
        net.readout.bias.neg_()
    with pytest.raises(CounterfactualError, match=r"no examples .* are left .*0 of 200; accuracy on the bases 0.00"):
        iia(net, hb.data(["P", "Q"], n=200), true_alignment())


def test_inputs_the_model_cannot_take_are_an_error():
    net = hb.network()
    d = hb.data(["P"], n=40)
    d.base = torch.zeros(40, 3)  # three features for a two-input network
    with pytest.raises(CounterfactualError, match=r"cannot take the counterfactual data's base inputs \(a tensor \[40, 3\]"):
        iia(net, d, true_alignment().restrict(["P"]))


def test_alignment_errors():
    basis = Subspace(2, 2, init=hb.R)
    with pytest.raises(AlignmentError, match=r"'P' and 'Q' overlap at site acts.0:output: both hold features \[0\]"):
        Alignment({"P": Place(SITE, basis, (0,)), "Q": Place(SITE, basis, (0, 1))})
    with pytest.raises(AlignmentError, match=r"overlap"):
        Alignment({"P": Place(SITE, Identity(2), (1,)), "Q": Place(SITE, Identity(2), None)})
    with pytest.raises(AlignmentError, match=r"feature indices \[2\] exceed the featurizer's 2 features"):
        Place(SITE, basis, (2,))
    net = hb.network()
    wide = Alignment({"P": Place(SITE, Subspace(4, 1))})
    with pytest.raises(AlignmentError, match=r"takes activations of width 4, but site acts.0:output has width 2"):
        iia(net, hb.data(["P"], n=40), wide)
    with pytest.raises(CounterfactualError, match=r"intervenes on \['Q'\], which the alignment does not place"):
        iia(net, combine([hb.data(["P"], n=20), hb.data(["Q"], n=20)]), true_alignment().restrict(["P"]))
