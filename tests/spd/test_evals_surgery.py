"""Evaluation measures on hand-built matrices and decompositions whose answers are known,
and surgery that removes exactly the chosen subcomponents."""

import pytest
import torch
from torch import nn

from mechscope.core.run import run
from mechscope.spd.components import SPDError
from mechscope.spd.config import SPDConfig
from mechscope.spd.decomposition import Decomposition
from mechscope.spd.evals import (
    ablation_effects,
    dense_report,
    identity_report,
    live_counts,
    mmcs_ml2r,
    reconstruction_losses,
    tms_mechanisms,
)
from mechscope.spd.surgery import (
    ablate_weights,
    ablation_interventions,
    feature_subcomponents,
    per_feature_error,
    single_feature_inputs,
)


def test_identity_report_matches_columns_and_counts_violations():
    perm = torch.eye(4)[:, [2, 0, 3, 1]]  # a permuted identity
    ci = torch.cat([perm, torch.zeros(4, 3)], dim=1)  # plus three dead columns
    rep = identity_report(ci)
    assert rep["n_alive"] == 4 and rep["violations"] == 0
    assert torch.equal(rep["matrix"], torch.eye(4, dtype=torch.float64))
    assert rep["columns"] == [1, 3, 0, 2]
    bad = perm.clone()
    bad[0, 1] = 0.85  # weak diagonal entry (feature 0 is column 1)
    bad[1, 2] = 0.3  # and an off-diagonal one
    rep = identity_report(bad)
    assert rep["violations"] == 2 and rep["diag_min"] == pytest.approx(0.85)
    assert rep["offdiag_max"] == pytest.approx(0.3)
    # two features sharing one subcomponent: one feature has no column left
    shared = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    rep = identity_report(shared)
    assert rep["violations"] == 2  # the unmatched feature, and its entry in the shared column


def test_dense_report_finds_a_block_used_by_every_input():
    ci = torch.zeros(5, 6)
    ci[:, [1, 4]] = 1.0
    rep = dense_report(ci, k=2)
    assert rep["violations"] == 0 and rep["n_alive"] == 2 and rep["block_min"] == 1.0
    ci[2, 0] = 0.5  # a third subcomponent used on one input
    assert dense_report(ci, k=2)["violations"] == 1
    assert dense_report(torch.cat([torch.ones(5, 1), torch.zeros(5, 5)], 1), k=2)["violations"] == 5


def test_dense_report_also_gives_the_reference_column_count():
    # the +ID pattern of a minimal decomposition: each identity subcomponent is unused on
    # the one feature whose hidden direction it does not read
    ci = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    rep = dense_report(ci, k=2)
    assert rep["violations"] == 2 and rep["block_min"] == 0.0 and rep["column_errors"] == 0
    weak = ci.clone()
    weak[:, 1] = 0.5  # a block column important on no input
    assert dense_report(weak, k=2)["column_errors"] == 1
    extra = torch.cat([ci, torch.tensor([[0.0], [0.3], [0.0], [0.0], [0.0]])], 1)  # a third column in use
    assert dense_report(extra, k=2)["column_errors"] == 1


def test_ablation_effects_are_zero_where_a_subcomponent_reads_nothing():
    # features enter a 2-d hidden space along (1, 0), (0, 1) and (1, 1); the identity is
    # decomposed along the axes, and the decoder is an isometry
    W = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # [hidden 2, features 3]
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Identity(), nn.Linear(2, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(W)
        model[2].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    dec = Decomposition(model, SPDConfig(sites=("1",), C=3), example_inputs=torch.zeros(1, 3))
    with torch.no_grad():
        comps = dec.comps("1")
        comps.U_param.zero_()
        comps.V_param.zero_()
        comps.U_param[:, :2] = torch.eye(2)
        comps.V_param[:2] = torch.eye(2)
    effect = ablation_effects(model, dec, "1", torch.eye(3) * 0.75, [0, 1])
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    assert torch.allclose(effect, expected, atol=1e-6)
    with pytest.raises(SPDError, match="out of range"):
        ablation_effects(model, dec, "1", torch.eye(3), [3])
    with pytest.raises(SPDError, match="not a decomposed layer"):
        ablation_effects(model, dec, "0", torch.eye(3), [0])


def _exact_tms_decomposition(W: torch.Tensor, C: int = 8):
    """A linear TMS-like encoder whose decomposition is exactly its five mechanisms, plus dead ones."""
    m, n = W.shape
    model = nn.Sequential(nn.Linear(n, m, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(W)
    dec = Decomposition(model, SPDConfig(sites=("0",), C=C))
    with torch.no_grad():
        comps = dec.comps("0")
        comps.U_param.zero_()
        comps.V_param.zero_()
        comps.U_param[:, :n] = W
        comps.V_param[:n] = torch.eye(n)
        comps.U_param[:, n] = 1e-3  # a dead subcomponent: tiny norm
        comps.V_param[n, 0] = 1e-3
    return model, dec


def test_mmcs_and_ml2r_of_an_exact_decomposition_are_one():
    W = torch.randn(2, 5)
    model, dec = _exact_tms_decomposition(W)
    res = mmcs_ml2r(dec, "0", tms_mechanisms(W))
    assert res["mmcs"] == pytest.approx(1.0) and res["ml2r"] == pytest.approx(1.0)
    assert res["match"] == [0, 1, 2, 3, 4]
    assert live_counts(dec) == {"0": (5, 8)}
    with torch.no_grad():
        dec.comps("0").U_param[:, :5] *= 2.0  # twice too long: cosines stay 1, ML2R doubles
    res = mmcs_ml2r(dec, "0", tms_mechanisms(W))
    assert res["mmcs"] == pytest.approx(1.0) and res["ml2r"] == pytest.approx(2.0)


def test_reconstruction_losses_under_the_four_masks():
    W = torch.randn(2, 5)
    model, dec = _exact_tms_decomposition(W)
    x = torch.rand(64, 5)
    losses = reconstruction_losses(model, dec, x)
    assert losses["unmasked"] == pytest.approx(0.0, abs=1e-10)  # U V == W exactly
    assert losses["zero"] == pytest.approx(float((x @ W.T).pow(2).mean()), rel=1e-5)
    assert set(losses) == {"ci", "stochastic", "unmasked", "zero"}


def test_feature_subcomponents_skip_shared_mechanisms():
    ci = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])  # column 2 used by everyone
    assert feature_subcomponents(ci, 0) == [0]
    assert feature_subcomponents(ci, 2) == []
    with pytest.raises(SPDError, match="out of range"):
        feature_subcomponents(ci, 3)


def test_surgery_removes_exactly_the_chosen_mechanism():
    W = torch.randn(2, 5)
    model, dec = _exact_tms_decomposition(W)
    edited = ablate_weights(model, dec, {"0": [3]})
    expected = W.clone()
    expected[:, 3] = 0.0  # feature 3's column is its mechanism
    assert torch.allclose(edited[0].weight, expected, atol=1e-6)
    assert torch.equal(model[0].weight, W)  # the original is untouched
    x = torch.randn(7, 5)
    hooked, _ = run(model, x, ablation_interventions(dec, {"0": [3]}))
    assert torch.allclose(hooked, edited(x), atol=1e-6)  # the same edit through hooks
    with pytest.raises(SPDError, match="not a decomposed site"):
        ablate_weights(model, dec, {"1": [0]})


def test_single_feature_inputs_and_errors():
    x = single_feature_inputs(3, 4, torch.Generator().manual_seed(0))
    assert x.shape == (3, 4, 3)
    assert torch.all((x > 0).sum(-1) == 1) and torch.all(x[torch.arange(3), :, torch.arange(3)] > 0)
    identity = nn.Identity()
    err = per_feature_error(identity, x, lambda v: 2 * v)  # error (x - 2x)² on the active feature
    assert torch.allclose(err, x[torch.arange(3), :, torch.arange(3)].pow(2).mean(-1))


def test_unlearning_table_on_a_hand_built_residual_mlp():
    """A residual MLP with one neuron per feature and an exact decomposition of W_in: removing
    feature 2's subcomponent must remove its ReLU and leave the others as they were."""
    from mechscope.core.site import Site
    from mechscope.spd.surgery import unlearning_table
    from mechscope.tasks.resid_mlp import ResidMLP, ResidMLPConfig, labels

    model = ResidMLP(ResidMLPConfig(n_features=6, d_embed=400, d_mlp=6))
    with torch.no_grad():
        model.mlp_in.weight.copy_(model.W_E)  # neuron i reads feature i
        model.mlp_out.weight.copy_(model.W_E.T)  # and writes it back: the MLP computes ReLU(x)
    dec = Decomposition(model, SPDConfig(sites=("mlp_in",), C=6))
    with torch.no_grad():
        dec.comps("mlp_in").U_param.copy_(torch.eye(6))
        dec.comps("mlp_in").V_param.copy_(model.W_E)
    ci = torch.eye(6)  # each feature needs its own subcomponent
    table = unlearning_table(model, dec, ci, "mlp_in", 2, labels, Site("mlp_out"), per_feature=64)
    assert table["subcomponents"] == [2]
    assert table["lost_fraction"] == pytest.approx(1.0, abs=0.02)
    # the other features keep their computation: their error moves by < 2 % of the way to the
    # zero-ablation level (their own errors are tiny cross-talk, so a ratio would be noisy)
    per = table["per_feature"]
    for k in (0, 1, 3, 4, 5):
        gap = per["zero"][k] - per["unablated"][k]
        assert abs(per["ablated"][k] - per["unablated"][k]) < 0.02 * gap
    assert [r["features"] for r in table["rows"]] == ["feature 2 (ablated)", "other 5 (mean)"]
