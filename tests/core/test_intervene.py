import pytest
import torch

from mechscope.core.featurize import Identity, Subspace
from mechscope.core.intervene import Add, Apply, FeatureInterchange, Mean, ProjectOut, Replace, Resample, Zero
from mechscope.core.run import cache, run
from mechscope.core.site import Site, SiteError
from mechscope.zoo import build

H = Site("acts.0")


def _hidden(model, x, **kw):
    return run(model, x, cache=[H], **kw)[1][H]


def test_zero_mean_and_add():
    model, x = build("mlp"), torch.randn(6, 16)
    assert torch.equal(_hidden(model, x, interventions={H: Zero()}), torch.zeros(6, 16))
    mu = torch.randn(16)
    assert torch.equal(_hidden(model, x, interventions={H: Mean(mu)}), mu.expand(6, 16))
    v = torch.randn(16)
    assert torch.allclose(_hidden(model, x, interventions={H: Add(v, 2.5)}), _hidden(model, x) + 2.5 * v)
    with pytest.raises(SiteError, match="does not match the site"):
        run(model, x, {H: Add(torch.randn(5))})
    with pytest.raises(SiteError, match="does not broadcast"):
        run(model, x, {H: Mean(torch.randn(3))})


def test_resample_draws_rows_of_the_pool_reproducibly():
    model, x = build("mlp"), torch.randn(8, 16)
    pool = torch.randn(5, 16)
    a = _hidden(model, x, interventions={H: Resample(pool, seed=3)})
    b = _hidden(model, x, interventions={H: Resample(pool, seed=3)})
    assert torch.equal(a, b)
    assert all(any(torch.equal(row, p) for p in pool) for row in a)
    with pytest.raises(ValueError, match="non-empty"):
        Resample(torch.zeros(0, 16))


def test_project_out_removes_the_span_and_keeps_the_rest():
    model, x = build("mlp"), torch.randn(6, 16)
    dirs = torch.randn(2, 16)
    dirs = torch.cat([dirs, dirs[:1] * 3])  # a repeated direction must not break it
    h = _hidden(model, x, interventions={H: ProjectOut(dirs)})
    assert torch.allclose(h @ dirs.T, torch.zeros(6, 3), atol=1e-5)
    clean = _hidden(model, x)
    q = torch.linalg.qr(dirs[:2].T)[0]
    assert torch.allclose(h, clean - clean @ q @ q.T, atol=1e-5)


def test_apply_and_shape_check():
    model, x = build("mlp"), torch.randn(3, 16)
    assert torch.equal(_hidden(model, x, interventions={H: Apply(lambda v: v * 0 + 1)}), torch.ones(3, 16))
    with pytest.raises(SiteError, match="same shape"):
        run(model, x, {H: Apply(lambda v: v[:, :4])})
    with pytest.raises(SiteError, match="same batch size"):
        run(model, x, {H: Replace(torch.zeros(2, 16))})


def test_feature_interchange_in_a_subspace_is_the_das_formula():
    model, base, source = build("mlp"), torch.randn(6, 16), torch.randn(6, 16)
    w = Subspace(16, 4, seed=1)
    hb, hs = _hidden(model, base), _hidden(model, source)
    got = _hidden(model, base, interventions={H: FeatureInterchange(w, hs, features=range(4))})
    W = w.basis()
    assert torch.allclose(got, hb + (hs - hb) @ W @ W.T, atol=1e-5)
    # only some features: the other subspace directions keep the base's value
    part = _hidden(model, base, interventions={H: FeatureInterchange(w, hs, features=[0])})
    assert torch.allclose(part @ W[:, 1:], hb @ W[:, 1:], atol=1e-5)
    assert torch.allclose(part @ W[:, :1], hs @ W[:, :1], atol=1e-5)


def test_neuron_interchange_equals_patching_those_neurons():
    model, base, source = build("mlp"), torch.randn(6, 16), torch.randn(6, 16)
    hs = _hidden(model, source)
    a = run(model, base, {H: FeatureInterchange(Identity(16), hs, features=[2, 5])})[0]
    site = Site("acts.0", features=[2, 5])
    b = run(model, base, {site: Replace(cache(model, source, [site])[site])})[0]
    assert torch.allclose(a, b, atol=1e-6)


def test_gradients_reach_a_trainable_featurizer_through_the_frozen_model():
    model = build("mlp").requires_grad_(False)
    base, source = torch.randn(16, 16), torch.randn(16, 16)
    w = Subspace(16, 3, seed=0)
    hs = cache(model, source, [H])[H]
    opt = torch.optim.Adam(w.parameters(), lr=1e-2)
    for _ in range(3):
        out, _ = run(model, base, {H: FeatureInterchange(w, hs, range(3))})
        loss = out.logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in w.parameters()]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
        opt.step()
    W = w.basis()
    assert torch.allclose(W.T @ W, torch.eye(3), atol=1e-5)  # still orthonormal after steps
    assert all(p.grad is None for p in model.parameters())


def test_featurizer_width_mismatch_is_an_error():
    model = build("mlp")
    with pytest.raises(ValueError, match="expects activations of width 8, but acts.0:output has width 16"):
        run(model, torch.randn(2, 16), {H: FeatureInterchange(Subspace(8, 2), torch.randn(2, 16), [0])})
    with pytest.raises(SiteError, match="outside the featurizer's 2 features"):
        FeatureInterchange(Subspace(16, 2), torch.randn(2, 16), [0, 5])
