"""Hypotheses as values (issue 21): tested and compared on the hand-built network, whose
alignment is known exactly (P on the hidden direction R[:, 0], Q on R[:, 1])."""

import re
from pathlib import Path

import pytest
import torch

import handbuilt as hb
from mechscope.causal import hypothesis as hyp
from mechscope.causal.alignment import Alignment, Place
from mechscope.causal.counterfactual import CounterfactualData, combine
from mechscope.causal.iia import iia
from mechscope.causal.model import CausalModel, Variable
from mechscope.core.featurize import Identity, Subspace
from mechscope.core.site import Site

SITE = Site("acts.0")
README = Path(__file__).resolve().parents[2] / "README.md"


def rotated(name="rotated", variables=("P", "Q")) -> hyp.Hypothesis:
    basis = Subspace(2, 2, init=hb.R)  # column 0 = P's direction, column 1 = Q's
    places = {"P": Place(SITE, basis, (0,)), "Q": Place(SITE, basis, (1,))}
    return hyp.Hypothesis(name, hb.causal_model(), {v: places[v] for v in variables})


def neurons(name="neurons") -> hyp.Hypothesis:  # the wrong dimensions: each neuron mixes P and Q
    units = Identity(2)
    return hyp.Hypothesis(name, hb.causal_model(), {"P": Place(SITE, units, (0,)), "Q": Place(SITE, units, (1,))})


@pytest.fixture(scope="module")
def data():
    return rotated().counterfactuals(hb.sample, 400, hb.to_inputs, seed=0)


def test_the_true_hypothesis_scores_one_alone_and_together(data):
    res = hyp.test(rotated(), hb.network(), data)
    assert res.kept == res.n_pairs == 400
    assert [s.label for s in res.scores()] == ["P", "Q", "P+Q together"]
    for s in res.scores():
        assert s.iia == 1.0 and s.interval[1] == 1.0 and 0.98 < s.interval[0] < 1.0 and s.hits.shape == (400,)
    assert "P+Q together  1.000  [0.990, 1.000]" in res.table() and "400/400 pairs kept" in res.summary()
    assert res.to_dict()["joint"]["iia"] == 1.0


def test_a_rival_on_the_wrong_dimensions_scores_markedly_less_and_matches_iia(data):
    net, wrong = hb.network(), neurons()
    res = hyp.test(wrong, net, data)
    assert res.variables["P"].iia < 0.8 and res.variables["Q"].iia < 0.8 and res.joint.iia < 0.8
    assert res.joint.interval[1] < 0.8  # the whole interval, not only the estimate
    # all together is iia() over both variables on the same pairs
    assert res.joint.iia == pytest.approx(iia(net, data, wrong.alignment).value)
    # one variable alone: its labels recomputed from the same high-level inputs
    high = data.meta["high_level"]
    labels = hb.causal_model().interchange(high["base"], {"P": high["P"]})["O"].long()
    only_p = CounterfactualData(("P",), data.base, {"P": data.sources["P"]}, labels, data.base_labels,
                                {"P": data.source_labels["P"]}, {"P": data.active["P"]}, "P alone")
    assert res.variables["P"].iia == pytest.approx(iia(net, only_p, wrong.alignment.restrict(["P"])).value)


def test_compare_says_the_true_hypothesis_wins_with_an_interval_excluding_zero(data):
    net = hb.network()
    c = hyp.compare(rotated(), neurons(), net, data, seed=3)
    assert c.winner == "rotated" and c.joint.interval[0] > 0.2 and c.joint.n == 400
    assert c.joint.iia_a == 1.0 and c.joint.value == pytest.approx(1.0 - c.b.joint.iia)
    assert set(c.per_variable) == {"P vs P", "Q vs Q"} and all(k.interval[0] > 0 for k in c.per_variable.values())
    assert "'rotated' beats 'neurons' on the same 400 pairs" in c.summary() and "all together" in c.table()
    assert hyp.compare(rotated(), neurons(), net, data, seed=3).joint.interval == c.joint.interval  # seeded
    flipped = hyp.compare(neurons(), rotated(), net, data, seed=3)
    assert flipped.winner == "rotated" and flipped.joint.interval[1] < 0
    same = hyp.compare(rotated(), rotated("copy"), net, data)
    assert same.winner is None and same.joint.value == 0.0 and "neither" in same.summary()


def test_rivals_with_different_causal_models_are_scored_on_the_same_pairs():
    # the rival claims the hidden direction R[:, 0] carries S := B (not P := A), feeding O := A and S
    rival_model = CausalModel([
        Variable("A", (0, 1)), Variable("B", (0, 1)), Variable("S", (0, 1), ("B",), lambda b: b),
        Variable("O", (False, True), ("A", "S"), lambda a, s: (a + s) == 2)], output="O")
    truth = rotated("P at R0", ("P",))
    rival = hyp.Hypothesis("S at R0", rival_model, {"S": truth.alignment["P"]})
    data = truth.counterfactuals(hb.sample, 400, hb.to_inputs, seed=1)
    c = hyp.compare(rival, truth, hb.network(), data)  # S takes P's source (by position)
    assert c.winner == "P at R0" and c.joint.interval[1] < 0 and c.a.joint.iia < 0.8 and not c.per_variable


def test_pairs_the_model_gets_wrong_are_dropped_from_every_score(data):
    net = hb.network()
    with torch.no_grad():
        net.readout.bias[1] += 5.0  # now it says "true" for (0, 1) and (1, 0) as well
    res = hyp.test(rotated(), net, data)
    assert res.n_pairs == 400 and 0 < res.kept < 400
    assert all(s.hits.shape == (res.kept,) for s in res.scores())


# -- bad input: each a one-line error saying what was wrong --------------------------------
def test_variables_that_do_not_match_the_causal_model(data):
    basis = Subspace(2, 2, init=hb.R)
    with pytest.raises(hyp.HypothesisError, match=r"aligns variable 'PP', which its causal model does not have "
                                                  r"\(did you mean 'P'\?\)"):
        hyp.Hypothesis("typo", hb.causal_model(), {"PP": Place(SITE, basis, (0,))})
    with pytest.raises(hyp.HypothesisError, match=r"places \['P'\] but the data intervenes on \['P', 'Q'\]"):
        hyp.test(rotated("P only", ("P",)), hb.network(), data)
    with pytest.raises(hyp.HypothesisError, match=r"causal_model must be a CausalModel"):
        hyp.Hypothesis("no model", {"P": None}, {"P": Place(SITE, basis, (0,))})


def test_an_alignment_at_a_site_the_model_does_not_have(data):
    basis = Subspace(2, 2, init=hb.R)
    far = hyp.Hypothesis("far", hb.causal_model(), {"P": Place(Site("acts.7"), basis, (0,)), "Q": Place(SITE, basis, (1,))})
    with pytest.raises(hyp.HypothesisError, match=r"places 'P' at acts.7:output, a site MLP does not have: no module "
                                                  r"at path 'acts.7'.*did you mean 'acts.0'"):
        hyp.test(far, hb.network(), data)
    with pytest.raises(hyp.HypothesisError, match=r"a site MLP does not have"):
        hyp.compare(rotated(), far, hb.network(), data)


def test_overlapping_features_for_two_variables_at_one_site():
    basis = Subspace(2, 2, init=hb.R)
    with pytest.raises(hyp.HypothesisError, match=r"hypothesis 'both on 0': variables 'P' and 'Q' overlap at site "
                                                  r"acts.0:output: both hold features \[0\]"):
        hyp.Hypothesis("both on 0", hb.causal_model(), {"P": Place(SITE, basis, (0,)), "Q": Place(SITE, basis, (0, 1))})


def test_no_pair_left_after_filtering(data):
    net = hb.network()
    with torch.no_grad():  # negated logits: always the wrong class
        net.readout.weight.neg_()
        net.readout.bias.neg_()
    with pytest.raises(hyp.HypothesisError, match=r"no pair of 'rotated pairs' is left .*\(0 of 400; 0 under 'rotated'\)"):
        hyp.test(rotated(), net, data)
    with pytest.raises(hyp.HypothesisError, match=r"0 under 'rotated', 0 under 'neurons'"):
        hyp.compare(rotated(), neurons(), net, data)


def test_data_a_hypothesis_cannot_label(data):
    net = hb.network()
    bare = data.subset(torch.arange(100))  # a subset keeps its rows' high-level inputs (tested with make_counterfactuals)
    bare.meta.pop("high_level")  # data built without them cannot be labelled
    with pytest.raises(hyp.HypothesisError, match=r"carries no high-level inputs for its 100 pairs"):
        hyp.test(rotated(), net, bare)
    parts = combine([hb.data(["P"], n=20), hb.data(["Q"], n=20)])
    with pytest.raises(hyp.HypothesisError, match=r"leaves \['P', 'Q'\] unintervened on some pairs"):
        hyp.test(rotated(), net, parts)
    relabelled = data.subset(torch.arange(len(data)))
    relabelled.labels = 1 - relabelled.labels
    with pytest.raises(hyp.HypothesisError, match=r"labels of 'rotated pairs' are not those the causal model of 'rotated' gives"):
        hyp.test(rotated(), net, relabelled)
    with pytest.raises(hyp.HypothesisError, match=r"both hypotheses are named 'rotated'"):
        hyp.compare(rotated(), rotated(), net, data)


def test_readme_hypothesis_example_runs():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Hypotheses as values"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    scope: dict = {}
    exec(compile(code, "README.md (Hypotheses as values)", "exec"), scope)  # noqa: S102 - the README's own example
    assert scope["result"].joint.iia == 1.0 and scope["comparison"].winner == "built"


def test_an_alignment_object_is_taken_as_is():
    al = Alignment({"P": Place(SITE, Identity(2), (0,))})
    h = hyp.Hypothesis("as is", hb.causal_model(), al)
    assert h.alignment is al and h.variables == ("P",) and "P -> acts.0" in h.describe()
