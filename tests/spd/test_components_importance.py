"""Subcomponents (linear, embedding, tied) and importance functions (fast path == plain graph)."""

import pytest
import torch

from mechscope.spd.components import EmbeddingComponents, LinearComponents, SPDError, TiedComponents, layer_kind
from mechscope.spd.importance import ScalarMLPImportance, VectorMLPImportance, make_importance


def test_linear_components_compute_u_mask_v():
    comps = LinearComponents(C=6, d_in=4, d_out=3, generator=torch.Generator().manual_seed(0))
    a = torch.randn(5, 4)
    h = comps.inner(a)
    assert h.shape == (5, 6)
    assert torch.allclose(h, a @ comps.V.T)
    m = torch.rand(5, 6)
    by_hand = sum((m[:, c:c + 1] * (a @ comps.V[c])[:, None]) * comps.U[:, c] for c in range(6))
    assert torch.allclose(comps.expand(h * m), by_hand, atol=1e-6)
    assert torch.allclose(comps.expand(h), a @ comps.weight().T, atol=1e-6)  # no mask: U V
    W = torch.randn(3, 4)
    assert torch.allclose(comps.delta_out(a, W), a @ (W - comps.weight()).T, atol=1e-6)
    sub = comps.subcomponent_weights()
    assert torch.allclose(sub.sum(0), comps.weight(), atol=1e-6)
    assert torch.allclose(comps.subcomponent_norms(), sub.flatten(1).norm(dim=1), atol=1e-6)


def test_initialisation_scales_follow_the_spec():
    comps = LinearComponents(C=200, d_in=400, d_out=300, generator=torch.Generator().manual_seed(0))
    assert float(comps.V.detach().std()) == pytest.approx(1 / 400 ** 0.5, rel=0.02)  # V ~ N(0, 1/d_in)
    assert float(comps.U.detach().std()) == pytest.approx(1 / 200 ** 0.5, rel=0.02)  # U ~ N(0, 1/C)


def test_embedding_components_index_v_by_token():
    comps = EmbeddingComponents(C=4, d_in=10, d_out=3, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 7, 7], [0, 9, 2]])
    one_hot = torch.nn.functional.one_hot(ids, 10).float()
    assert torch.allclose(comps.inner(ids), one_hot @ comps.V.T)
    W = torch.randn(3, 10)
    assert torch.allclose(comps.delta_out(ids, W), one_hot @ (W - comps.weight()).T, atol=1e-6)
    with pytest.raises(SPDError, match="token ids"):
        comps.inner(one_hot)


def test_tied_components_are_the_transpose_and_share_gradients():
    src = LinearComponents(C=5, d_in=4, d_out=2, generator=torch.Generator().manual_seed(0))
    tied = TiedComponents(src)
    assert torch.equal(tied.weight(), src.weight().T)
    assert list(tied.parameters()) == []  # nothing duplicated
    (tied.weight().sum() + src.weight().sum()).backward()
    assert src.U_param.grad is not None and src.V_param.grad is not None


def test_bad_component_counts_and_layers():
    with pytest.raises(SPDError, match="C .* >= 1"):
        LinearComponents(C=0, d_in=3, d_out=3)
    assert layer_kind(torch.nn.Linear(2, 2)) == "linear"
    assert layer_kind(torch.nn.Embedding(4, 2)) == "embedding"
    assert layer_kind(torch.nn.Identity()) == "identity"
    assert layer_kind(torch.nn.ReLU()) is None


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_fused_scalar_importance_equals_the_plain_graph(n):
    imp = ScalarMLPImportance(C=12, hidden=(16,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # non-zero biases so that every parameter's gradient is exercised
        imp.b_in.normal_()
        imp.b_out.normal_()
    h = torch.randn(n, 12, requires_grad=True)
    fast = imp(h)
    grads_fast = torch.autograd.grad((fast ** 2).sum(), [h, *imp.parameters()])
    slow = imp.reference(h)
    grads_slow = torch.autograd.grad((slow ** 2).sum(), [h, *imp.parameters()])
    assert torch.allclose(fast, slow, atol=1e-5)
    for a, b in zip(grads_fast, grads_slow):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_scalar_importance_keeps_leading_dims_and_depth():
    imp = ScalarMLPImportance(C=3, hidden=(8, 4), generator=torch.Generator().manual_seed(0))
    h = torch.randn(2, 5, 3)
    z = imp(h)
    assert z.shape == (2, 5, 3)
    # each subcomponent's importance depends only on its own inner activation
    h2 = h.clone()
    h2[..., 0] += 1.0
    assert torch.equal(imp(h2)[..., 1:], z[..., 1:])


def test_vector_importance_reads_the_whole_input():
    imp = VectorMLPImportance(C=4, d_in=6, hidden=(8,), generator=torch.Generator().manual_seed(0))
    a = torch.randn(3, 2, 6)
    z = imp(torch.zeros(3, 2, 4), a)
    assert z.shape == (3, 2, 4)
    with pytest.raises(SPDError, match="vector input"):
        imp(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))


def test_make_importance_rejects_unknown_kinds_and_empty_hidden():
    with pytest.raises(SPDError, match="mlp.*vector_mlp"):
        make_importance("attention", 3, 4, (8,))
    with pytest.raises(SPDError, match="hidden layer"):
        ScalarMLPImportance(3, hidden=())
