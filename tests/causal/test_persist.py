import pytest
import torch

import handbuilt as hb
from mechscope.causal.alignment import Alignment, AlignmentError, Place
from mechscope.causal.baselines import pca_basis
from mechscope.causal.iia import iia
from mechscope.causal.persist import load_alignment, save_alignment
from mechscope.causal.stiefel import StiefelSubspace
from mechscope.core.featurize import Identity, Rotation, Subspace
from mechscope.core.site import Site
from mechscope.zoo.mlp import MLP

SITE = Site("acts.0", name="hidden.0")


@pytest.mark.parametrize("make", [lambda: StiefelSubspace(2, 2, seed=1), lambda: Subspace(2, 2, seed=1),
                                  lambda: Rotation(2, seed=1), lambda: Identity(2)])
def test_round_trip_keeps_sites_features_and_numbers(tmp_path, make):
    net = hb.network()
    shared = make()
    al = Alignment({"P": Place(SITE, shared, (0,)), "Q": Place(SITE, shared, (1,))})
    save_alignment(tmp_path / "al", al, net, meta={"task": "handbuilt"})
    back = load_alignment(tmp_path / "al", net)
    assert back["P"].featurizer is back["Q"].featurizer  # still one shared basis
    assert back["P"].site == SITE and back["P"].features == (0,) and back["Q"].features == (1,)
    x = torch.randn(5, 2)
    f0, f1 = shared.encode(x)[0], back["P"].featurizer.encode(x)[0]
    assert torch.allclose(f0, f1, atol=1e-6)
    d = hb.data(["P", "Q"], 200)
    assert iia(net, d, back).value == iia(net, d, al).value


def test_pca_round_trip(tmp_path):
    net = hb.network()
    pca = pca_basis(net, hb.data(["P"], 200), SITE)
    al = Alignment({"P": Place(SITE, pca, (1,))})
    back = load_alignment(save_alignment(tmp_path / "pca", al, net), net)
    x = torch.randn(4, 2)
    assert torch.allclose(back["P"].featurizer.encode(x)[0], pca.encode(x)[0])


def test_loading_onto_a_model_of_another_shape_is_an_error(tmp_path):
    net = hb.network()
    save_alignment(tmp_path / "al", Alignment({"P": Place(SITE, Identity(2), (0,))}), net)
    with pytest.raises(AlignmentError, match=r"learnt on a mechscope.zoo.mlp.MLP whose parameters have other names or shapes"):
        load_alignment(tmp_path / "al", MLP((2, 3, 2)))
    (tmp_path / "al" / "alignment.json").write_text("{")
    with pytest.raises(Exception, match="not valid JSON"):
        load_alignment(tmp_path / "al", net)
