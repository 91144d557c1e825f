import pytest
import torch

import handbuilt as hb
from mechscope.causal.alignment import AlignmentError
from mechscope.causal.counterfactual import combine
from mechscope.causal.das import FitConfig, das
from mechscope.causal.iia import iia
from mechscope.causal.stiefel import StiefelSubspace
from mechscope.core.site import Site

SITE = Site("acts.0")


def training_data():
    return combine([hb.data(["P"], 400, seed=1), hb.data(["Q"], 400, seed=2), hb.data(["P", "Q"], 400, seed=3)])


@pytest.mark.parametrize("orthogonality", ["retraction", "parametrization"])
def test_das_finds_the_rotated_variables(orthogonality):
    net = hb.network()
    al, fit = das(net, training_data(), SITE, 1, cfg=FitConfig(epochs=60, batch_size=256, lr=0.05),
                  orthogonality=orthogonality)
    assert fit.engine == "tail" and fit.losses[-1] < fit.losses[0]
    for variables in (["P"], ["Q"], ["P", "Q"]):
        assert iia(net, hb.data(variables, 400, seed=9), al.restrict(variables)).value == 1.0
    # the learnt directions are the planted ones (up to sign)
    basis = al["P"].featurizer.basis().detach()
    assert torch.allclose(basis.abs(), hb.R.abs(), atol=0.05)
    # the model is left as it was: eval mode, its parameters trainable again
    assert not net.training and all(p.requires_grad for p in net.parameters())


def test_full_rotation_and_full_engine_train_the_same_way():
    net = hb.network()
    cfg = FitConfig(epochs=3, batch_size=300, lr=0.05, engine="full")
    al_full, fit_full = das(net, training_data(), SITE, 1, kind="rotation", cfg=cfg)
    al_tail, fit_tail = das(net, training_data(), SITE, 1, kind="rotation", cfg=cfg.replace(engine="tail"))
    assert fit_full.engine == "full" and fit_tail.engine == "tail"
    assert torch.allclose(torch.tensor(fit_full.losses), torch.tensor(fit_tail.losses), rtol=1e-4)
    w_full, w_tail = al_full["P"].featurizer.basis(), al_tail["P"].featurizer.basis()
    assert w_full.shape == (2, 2) and torch.allclose(w_full, w_tail, atol=1e-5)


@pytest.mark.parametrize("kind,dims", [("subspace", {"A": 2, "B": 3}), ("rotation", {"A": 3, "B": 1})])
def test_fused_site_mix_equals_variable_by_variable(kind, dims):
    from mechscope.causal.das import SubspaceAlignment

    torch.manual_seed(0)
    site = Site("acts.0")
    al = SubspaceAlignment({"A": site, "B": site}, dims, {site: 8}, kind=kind, seed=3)
    with torch.no_grad():  # a basis away from its initialisation, still orthonormal
        al.featurizers[0].weight.add_(0.5 * torch.randn(al.featurizers[0].weight.shape))
    al.after_step()
    base, sa, sb = torch.randn(3, 10, 8).unbind(0)
    fused = al.mix_site(["A", "B"], base, [sa, sb])
    assert torch.allclose(fused, al.mix("B", al.mix("A", base, sa), sb), atol=1e-5)
    # a variable whose source is the base itself (not intervened in this example) changes nothing
    assert torch.allclose(al.mix_site(["A", "B"], base, [sa, base]), al.mix("A", base, sa), atol=1e-5)


def test_stiefel_basis_stays_orthonormal():
    f = StiefelSubspace(8, 3, seed=0)
    with torch.no_grad():
        f.weight.add_(0.3 * torch.randn(8, 3))
    f.retract()
    w = f.basis()
    assert torch.allclose(w.T @ w, torch.eye(3), atol=1e-5)
    x = torch.randn(5, 8)
    assert torch.allclose(f.decode(*f.encode(x)), x, atol=1e-5)


def test_dimensions_beyond_the_site_are_an_error():
    net = hb.network()
    with pytest.raises(AlignmentError, match=r"ask for 4 dimensions in all \(P: 2, Q: 2\) at site .* only 2 wide"):
        das(net, training_data(), SITE, 2)
    with pytest.raises(AlignmentError, match=r"no site or no dims"):
        das(net, training_data(), SITE, {"P": 1})
