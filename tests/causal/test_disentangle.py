"""Cause, Isolate and Disentangle on a network whose attributes live in known orthogonal subspaces
(``handbuilt_attributes``), every featurizer under one interface, and the learned assignment of the
featurizer trained on interventions."""

import handbuilt_attributes as hb
import pytest
import torch

from mechscope.causal import disentangle_methods as dm
from mechscope.causal.alignment import Place
from mechscope.causal.das import FitConfig
from mechscope.causal.disentangle import (
    DisentangleData,
    DisentangleError,
    contrast,
    disentangle,
    stratified_interval,
)
from mechscope.causal.interventional import DictionaryConfig, InterventionalDictionary
from mechscope.causal.stiefel import StiefelSubspace
from mechscope.core.featurize import Identity


@pytest.fixture(scope="module")
def world():
    return hb.network(), hb.data(300, 0), hb.data(300, 50)


def _basis():
    return StiefelSubspace(8, 8, init=hb.R, trainable=False)


def test_the_true_subspaces_cause_and_isolate_exactly(world):
    net, _, test = world
    b = _basis()
    r = disentangle(net, test, {"colour": Place(hb.SITE, b, (0, 1, 2)), "shape": Place(hb.SITE, b, (3, 4, 5))})
    assert r.cause.value == 1.0 and r.isolate.value == 1.0 and r.disentangle.value == 1.0
    assert r.cause.n == 600 and r.disentangle.n == 1200 and r.per_cause["shape"].interval[0] > 0.98


def test_a_featurizer_mixing_the_attributes_fails_isolate(world):
    net, _, test = world
    b = _basis()
    mixed = {"colour": Place(hb.SITE, b, (0, 1, 2, 3, 4, 5)), "shape": Place(hb.SITE, b, (3, 4, 5))}
    r = disentangle(net, test, mixed)
    assert r.cause.value == 1.0
    assert r.per_isolate[("colour", "shape")].value == 0.0  # moving colour's features moves shape
    assert r.per_isolate[("shape", "colour")].value == 1.0 and r.isolate.value == 0.5
    full = disentangle(net, test, {a: Place(hb.SITE, Identity(8)) for a in hb.ATTRS})
    assert full.cause.value == 1.0 and full.isolate.value == 0.0 and full.disentangle.value == 0.5


def test_contrast_is_paired_and_zero_against_itself(world):
    net, _, test = world
    b = _basis()
    good = disentangle(net, test, {"colour": Place(hb.SITE, b, (0, 1, 2)), "shape": Place(hb.SITE, b, (3, 4, 5))})
    bad = disentangle(net, test, {a: Place(hb.SITE, Identity(8)) for a in hb.ATTRS})
    c = contrast(good, bad)
    assert c.value == pytest.approx(0.5) and c.interval[0] > 0.45 and (c.iia_a, c.iia_b) == (1.0, 0.5)
    same = contrast(good, good, "cause")
    assert same.value == 0.0 and same.interval == (0.0, 0.0)
    other = disentangle(net, hb.data(200, 9), {a: Place(hb.SITE, Identity(8)) for a in hb.ATTRS})
    with pytest.raises(DisentangleError, match="different pairs"):
        contrast(good, other)


def test_stratified_interval_of_a_weighted_mean():
    lo, hi = stratified_interval([torch.ones(50), torch.zeros(50)], [0.5, 0.5])
    assert lo == hi == 0.5
    lo, hi = stratified_interval([torch.rand(400, generator=torch.Generator().manual_seed(0)) > 0.5], [1.0])
    assert 0.4 < lo < 0.5 < hi < 0.6


def test_multitask_das_isolates_where_das_on_cause_alone_need_not(world):
    net, train, test = world
    s = dm.Setup(net, hb.SITE, train, dims=3, fit=FitConfig(epochs=30, batch_size=64))
    mdas = disentangle(net, test, dm.multitask_das(s))
    assert mdas.cause.value >= 0.99 and mdas.isolate.value >= 0.99
    das = disentangle(net, test, dm.das_cause(s))
    assert das.cause.value >= 0.99  # trained on Cause only: nothing holds its isolate up
    assert set(s.info) == {"multitask_das", "das"}


def test_interventional_dictionary_scores_like_the_truth(world):
    net, train, test = world
    s = dm.Setup(net, hb.SITE, train, fit=FitConfig(epochs=30, batch_size=64))
    r = disentangle(net, test, dm.interventional(s))
    assert r.cause.value >= 0.99 and r.isolate.value >= 0.99
    assignment = s.info["interventional"]["assignment"]
    assert not set(assignment["colour"]) & set(assignment["shape"]) and s.info["interventional"]["n_features"] == 8


@pytest.mark.parametrize("seed", [0, 1])
def test_interventional_dictionary_recovers_the_known_split(seed):
    """On a network that notices any mix (each attribute one scalar read by its nearest value), the
    learned assignment puts all of colour's true direction in colour's features and none in shape's."""
    net, train, test = hb.ScalarAttributes().eval(), hb.scalar_data(300, 0), hb.scalar_data(300, 50)
    s = dm.Setup(net, hb.SCALAR_SITE, train, dims=1, fit=FitConfig(epochs=30, batch_size=64, seed=seed))
    places = dm.interventional(s)
    r = disentangle(net, test, places)
    assert r.cause.value == 1.0 and r.isolate.value == 1.0
    basis = places["colour"].featurizer.basis().detach()  # [6, 6]: one dictionary for both attributes
    assignment = s.info["interventional"]["assignment"]
    for i, (a, other) in enumerate((("colour", "shape"), ("shape", "colour"))):
        truth = hb.R6[:, i]  # the attribute's true direction
        assert float((truth @ basis[:, assignment[a]]).pow(2).sum()) > 0.99
        assert float((truth @ basis[:, assignment[other]]).pow(2).sum()) < 0.01
    if seed == 0:  # DAS and multi-task DAS with one dimension per attribute find the same directions
        for method in (dm.das_cause, dm.multitask_das):
            r = disentangle(net, test, method(s))
            assert r.cause.value >= 0.99 and r.isolate.value >= 0.99


def test_interventional_penalty_counts_shared_features():
    d = InterventionalDictionary(hb.SITE, hb.ATTRS, 8, DictionaryConfig(l1=0.0, exclusivity=1.0))
    with torch.no_grad():
        d.logits["colour"].fill_(50.0)
        d.logits["shape"].fill_(-50.0)
    assert float(d.penalty().detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        d.logits["shape"].fill_(50.0)
    assert float(d.penalty().detach()) == pytest.approx(8.0, abs=1e-4)  # every feature claimed by both
    with pytest.raises(Exception, match="at most 8 features"):
        InterventionalDictionary(hb.SITE, hb.ATTRS, 8, DictionaryConfig(n_features=9))


def test_select_by_effect_finds_the_true_features_of_a_fixed_basis(world):
    net, train, _ = world
    s = dm.Setup(net, hb.SITE, train, validation=hb.data(150, 70))
    places = dm.select_by_effect(s, _basis(), "true_basis", sizes=(1, 2, 3, 4))
    assert places["colour"].features == (0, 1, 2) and places["shape"].features == (3, 4, 5)
    with pytest.raises(DisentangleError, match="validation split"):
        dm.select_by_effect(dm.Setup(net, hb.SITE, train), _basis())


def test_bad_input_is_a_clear_error(world):
    net, _, test = world
    b = _basis()
    with pytest.raises(DisentangleError, match="not attribute 'shape'"):
        disentangle(net, test, {"colour": Place(hb.SITE, b, (0, 1, 2))})
    with pytest.raises(DisentangleError, match="no cause set"):
        DisentangleData({"colour": test.cause["colour"]}, {("colour", "size"): test.isolate[("colour", "shape")]})
    with pytest.raises(DisentangleError, match="must intervene on \\['shape'\\]"):
        DisentangleData({"colour": test.cause["colour"], "shape": test.cause["colour"]}, {})
    with pytest.raises(DisentangleError, match="only cause sets"):
        disentangle(net, DisentangleData(dict(test.cause), {}), {a: Place(hb.SITE, b) for a in hb.ATTRS})
    with pytest.raises(DisentangleError, match="unknown attribute 'size'"):
        test.for_attribute("size")
    broken = hb.network(scale=-10.0)  # the readout's sign flipped: wrong on every input
    with pytest.raises(DisentangleError, match="no examples of .* are left"):
        disentangle(broken, test, {a: Place(hb.SITE, b) for a in hb.ATTRS})
