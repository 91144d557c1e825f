import pytest
import torch

from mechscope.core.featurize import PCA, FeaturizerError, Identity, Rotation, Subspace


@pytest.mark.parametrize("make", [lambda: Identity(12), lambda: Subspace(12, 5, seed=0), lambda: Rotation(12, seed=0),
                                  lambda: PCA.fit(torch.randn(200, 12) * torch.arange(1, 13), k=6)])
def test_round_trip_is_exact(make):
    f = make()
    x = torch.randn(7, 3, 12)
    feats, err = f(x)
    assert feats.shape == (7, 3, f.n_features) and err.shape == x.shape
    assert torch.allclose(f.decode(feats, err), x, atol=1e-5)


def test_bases_are_orthonormal_and_pca_is_standardised():
    for f in (Subspace(10, 4, seed=0), Rotation(10, seed=1)):
        b = f.basis()
        assert torch.allclose(b.T @ b, torch.eye(b.shape[1]), atol=1e-5)
    acts = torch.randn(5000, 8) @ torch.randn(8, 8)
    pca = PCA.fit(acts)
    feats, _ = pca.encode(acts)
    assert torch.allclose(feats.var(0), torch.ones(8), atol=1e-3)
    assert torch.all(feats.var(0)[:-1] > 0.99) and (feats.mean(0).abs() < 1e-3).all()
    # components are ordered by explained variance
    raw = (acts - acts.mean(0)) @ pca.components
    assert torch.all(raw.var(0)[:-1] >= raw.var(0)[1:])


def test_subspace_from_init_and_errors():
    init = torch.randn(6, 2)
    s = Subspace(6, 2, init=init)
    q = torch.linalg.qr(init)[0]
    assert torch.allclose((s.basis() @ s.basis().T), q @ q.T, atol=1e-5)  # same span
    with pytest.raises(FeaturizerError, match="1 <= k <= 6"):
        Subspace(6, 7)
    with pytest.raises(FeaturizerError, match="init must have shape"):
        Subspace(6, 2, init=torch.randn(2, 6))
    with pytest.raises(FeaturizerError, match="expects activations of width 6"):
        s(torch.randn(3, 5))
    with pytest.raises(FeaturizerError, match="at least 2"):
        PCA.fit(torch.randn(1, 4))
    with pytest.raises(FeaturizerError, match="NaN"):
        PCA.fit(torch.full((5, 4), float("nan")))


def test_orthonormal_bases_share_the_public_linear_featurizer():
    from mechscope.causal.stiefel import StiefelSubspace
    from mechscope.core.featurize import LinearFeaturizer

    for f in (Subspace(6, 2, seed=0), Rotation(6, seed=0), StiefelSubspace(6, 3, seed=0)):
        assert isinstance(f, LinearFeaturizer)
        x = torch.randn(4, 6)
        feats, err = f.encode(x)
        assert torch.allclose(feats, x @ f.basis()) and torch.allclose(f.decode(feats, err), x, atol=1e-5)
    assert not isinstance(Identity(6), LinearFeaturizer)
