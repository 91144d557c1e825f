"""Boundless DAS, DBM, the localist search and the controls on the hand-built network."""

import pytest
import torch

import handbuilt as hb
from mechscope.causal.alignment import AlignmentError
from mechscope.causal.baselines import full_vector, random_subspace
from mechscope.causal.boundless import BoundlessAlignment, boundless_das
from mechscope.causal.counterfactual import combine
from mechscope.causal.das import FitConfig
from mechscope.causal.dbm import MaskAlignment, dbm
from mechscope.causal.iia import iia
from mechscope.causal.search import all_assignments, count_assignments, search_alignments
from mechscope.core.featurize import Identity, Subspace
from mechscope.core.site import Site

SITE = Site("acts.0")


def sets(n=300, seed=0):
    return {"P": hb.data(["P"], n, seed), "Q": hb.data(["Q"], n, seed + 1), "both": hb.data(["P", "Q"], n, seed + 2)}


def test_search_in_the_right_basis_finds_the_exact_alignment_and_neurons_do_worse():
    net = hb.network()
    right = search_alignments(net, sets(), SITE, Subspace(2, 2, init=hb.R), ["P", "Q"], sizes=[1])
    assert right.score == 1.0 and right.alignment["P"].features == (0,) and right.alignment["Q"].features == (1,)
    assert right.sizes == {1: "exhaustive"} and right.evaluated == 2
    neurons = search_alignments(net, sets(), SITE, Identity(2), ["P", "Q"], sizes=[1])
    assert neurons.score < 0.85
    # the score is what iia() says for the same alignment on the same data
    d = sets()["P"]
    assert abs(iia(net, d, neurons.alignment.restrict(["P"])).value - neurons.scores["P"]) < 1e-9


def test_greedy_search_when_exhaustive_is_too_many():
    net = hb.network()
    res = search_alignments(net, sets(), SITE, Subspace(2, 2, init=hb.R), ["P", "Q"], sizes=[1], max_exhaustive=1)
    assert res.sizes == {1: "greedy"} and res.score == 1.0


def test_assignment_counts():
    assert count_assignments(16, 2, 8) == 12870 and count_assignments(16, 2, 1) == 240
    assert len(all_assignments(5, 2, 2)) == count_assignments(5, 2, 2) == 30
    assert count_assignments(4, 2, 3) == 0


def test_search_sizes_that_do_not_fit_are_an_error():
    with pytest.raises(AlignmentError, match=r"sizes \[2\] give 2 variables more than the featurizer's 2 features"):
        search_alignments(hb.network(), sets(50), SITE, Identity(2), ["P", "Q"], sizes=[2])


def test_boundless_das_finds_a_one_dimensional_variable():
    net = hb.network()
    data = combine([hb.data(["P"], 600, 1)])
    al, fit = boundless_das(net, data, SITE, cfg=FitConfig(epochs=40, batch_size=200, lr=0.05))
    assert al["P"].size == 1  # the boundary shrank to the one rotated coordinate that holds P
    assert iia(net, hb.data(["P"], 400, 9), al).value == 1.0
    with pytest.raises(ValueError, match="one variable per site"):
        boundless_das(net, hb.data(["P", "Q"], 40), SITE)


def test_boundless_mask_anneals_to_a_hard_boundary():
    b = BoundlessAlignment("P", SITE, 256)  # temperature relative to the width: 50/4096 of it at the start
    b.schedule(0.0)
    soft = b.mask().detach()
    b.schedule(1.0)
    hard = b.mask().detach()  # boundary 0.5 of 256: the coordinates centred below 128, i.e. 0..127
    assert torch.allclose(hard, (torch.arange(256) < 128).float(), atol=1e-3) and b.size == 128
    assert 0.3 < float(soft[127]) < 0.7 and 0.3 < float(soft[128]) < 0.7  # soft over a few coordinates
    assert float(soft[120]) > 0.9 and float(soft[136]) < 0.1


def test_dbm_selects_the_neuron_that_holds_a_localist_variable():
    net = hb.network()
    with torch.no_grad():  # an unrotated variant: P in neuron 0, Q in neuron 1
        net.layers[0].weight.copy_(torch.eye(2))
        net.readout.weight[1] = hb.SCALE * torch.ones(2)
        net.readout.bias[1] = -hb.SCALE * (4 + 1.5)
    data = combine([hb.data(["P"], 300, 1), hb.data(["Q"], 300, 2), hb.data(["P", "Q"], 300, 3)])
    al, fit = dbm(net, data, SITE, cfg=FitConfig(epochs=30, batch_size=300, lr=0.1))
    assert al["P"].features == (0,) and al["Q"].features == (1,)
    assert iia(net, hb.data(["P", "Q"], 300, 9), al).value == 1.0


def test_dbm_resolves_contested_features_to_the_larger_logit():
    m = MaskAlignment({"P": SITE, "Q": SITE}, {"P": (f := Identity(3)), "Q": f})
    with torch.no_grad():
        m.logits["P"].copy_(torch.tensor([2.0, 1.0, -1.0]))
        m.logits["Q"].copy_(torch.tensor([1.0, 3.0, -2.0]))
    assert m.hard_features() == {"P": (0,), "Q": (1,)}


def test_controls():
    net = hb.network()
    rand = random_subspace({"P": SITE, "Q": SITE}, {"P": 1, "Q": 1}, {SITE: 2}, seed=0)
    assert rand["P"].featurizer is rand["Q"].featurizer and not any(p.requires_grad for p in rand["P"].featurizer.parameters())
    full = iia(net, hb.data(["P"], 300), full_vector(SITE, "P", 2))
    # the whole vector carries P *and* Q from the source: right only when the source's Q equals the base's
    assert 0.3 < full.value < 0.8


def test_compare_runs_every_method_with_its_controls_and_pca_finds_the_stretched_directions():
    from mechscope.causal.compare import SearchSettings, compare, table

    net = hb.network(q_scale=2.0)
    train = {"P": hb.data(["P"], 300, 1), "Q": hb.data(["Q"], 300, 2), "both": hb.data(["P", "Q"], 300, 3)}
    tests = {"P": hb.data(["P"], 300, 4), "Q": hb.data(["Q"], 300, 5), "both": hb.data(["P", "Q"], 300, 6)}
    res = compare(net, train, tests, SITE, ["P", "Q"], 1, ("das", "neurons", "pca", "dbm", "boundless"),
                  fit=FitConfig(epochs=40, batch_size=300, lr=0.05), search=SearchSettings(n=200, sizes=(1,)))
    assert {r.value for r in res["pca"].iia.values()} == {1.0}  # PCA's axes are P's and Q's directions
    assert {r.value for r in res["das"].iia.values()} == {1.0}
    assert res["neurons"].mean() < 0.9 and res["dbm"].mean() < 0.9  # a neuron mixes P and Q
    assert res["boundless"].iia["P"].value == 1.0 and res["boundless"].alignment["P"].size == 1
    assert set(res["full_vector"].iia) == {"P", "Q"} and "both" in res["random_subspace"].iia
    text = table(res, list(tests))
    assert text.splitlines()[0].split() == ["METHOD", "P", "Q", "both", "SECONDS"] and "300/300" in text


def test_dbm_gives_an_empty_variable_its_best_free_feature():
    f = Identity(3)
    m = MaskAlignment({"P": SITE, "Q": SITE}, {"P": f, "Q": f})
    with torch.no_grad():
        m.logits["P"].copy_(torch.tensor([-1.0, -0.5, -3.0]))  # wants nothing; its best, 1, is Q's
        m.logits["Q"].copy_(torch.tensor([-1.0, 2.0, -2.0]))
    assert m.hard_features() == {"P": (0,), "Q": (1,)}
