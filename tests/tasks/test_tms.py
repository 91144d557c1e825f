"""Toy models of superposition: model shapes, instance views, measures on hand-set
geometries whose answer is known, a short training run, and bad input."""

import math

import pytest
import torch

from mechscope.core.config import ConfigError
from mechscope.core.run import cache
from mechscope.core.site import Site
from mechscope.tasks import tms


def _polygon(k: int, n_features: int | None = None) -> torch.Tensor:
    """W [2, n] whose first k columns are unit vectors at the corners of a regular k-gon."""
    n = n_features or k
    angles = torch.arange(k) * 2 * math.pi / k
    W = torch.zeros(2, n)
    W[0, :k], W[1, :k] = torch.cos(angles), torch.sin(angles)
    return W


def test_measures_on_known_geometries():
    pentagon = _polygon(5)
    assert tms.dimensions_per_feature(pentagon).item() == pytest.approx(2 / 5)
    assert torch.allclose(tms.feature_dimensionality(pentagon), torch.full((1, 5), 0.4, dtype=torch.float64))
    square = _polygon(4, 5)  # two antipodal pairs and one unused feature
    D = tms.feature_dimensionality(square)[0]
    assert torch.allclose(D[:4], torch.full((4,), 0.5, dtype=torch.float64))
    assert D[4].item() == 0.0
    assert tms.represented_features(square).item() == 4
    orth = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])  # two orthogonal features, one dropped
    assert tms.dimensions_per_feature(orth).item() == pytest.approx(1.0)
    assert tms.interference(orth)[0, :2].abs().max().item() == 0.0
    # in the pentagon each feature overlaps the others by cos²(72°)*2 + cos²(144°)*2 = 1.5
    assert torch.allclose(tms.interference(pentagon), torch.full((1, 5), 1.5, dtype=torch.float64))
    assert tms.near_fraction(torch.tensor([0.4, 0.45, 0.99]), 0.02).tolist() == [True, False, True]


def test_instance_view_matches_multi_instance_forward():
    for tied, identity in [(True, False), (False, True)]:
        cfg = tms.TMSConfig(n_features=6, n_hidden=3, n_instances=3, tied=tied, hidden_identity=identity)
        model = tms.TMS(cfg)
        with torch.no_grad():
            model.b.normal_()
        x = torch.rand(7, 3, 6)
        out = model(x)  # [7, 3, 6]
        for i in range(3):
            one = model.instance(i)
            assert torch.allclose(one(x[:, i]), out[:, i], atol=1e-6)
            assert one.tied is tied and (one.identity is not None) is identity
            names = {n for n, _ in one.named_modules()}
            assert {"encoder", "decoder", "relu"} <= names and ("identity" in names) is identity
        if tied:
            assert torch.equal(model.instance(1).decoder.weight, model.W[1].T)


def test_hidden_site_is_cacheable():
    model = tms.TMS(tms.TMSConfig(n_instances=2))
    x = torch.rand(4, 2, 5)
    h = cache(model, x, [Site("hidden")])[Site("hidden")]
    assert h.shape == (4, 2, 2)
    assert torch.allclose(h, torch.einsum("bin,imn->bim", x, model.W))


def test_sampling_sparsity_and_at_least_one():
    gen = torch.Generator().manual_seed(0)
    x = tms.sample_features(20000, torch.tensor([1.0, 0.1]), 5, generator=gen)
    active = (x > 0).double().mean(dim=(0, 2))
    assert active[0].item() > 0.999 and abs(active[1].item() - 0.1) < 0.01
    x = tms.sample_features(2000, torch.tensor([0.05]), 5, at_least_one=True, generator=gen)
    assert bool(((x > 0).any(-1)).all())


def test_short_training_dense_vs_sparse():
    """Dense features: m of them kept orthogonally (D* ≈ 1); sparse: superposition (> m)."""
    cfg = tms.TMSConfig(n_instances=2, feature_probability=(1.0, 0.03), steps=1500, batch_size=512, lr=1e-2, seed=0)
    model, hist = tms.train_tms(cfg)
    W = model.W
    dense, sparse = 0, 1
    assert tms.represented_features(W)[dense].item() == 2
    assert tms.dimensions_per_feature(W)[dense].item() == pytest.approx(1.0, abs=0.05)
    assert tms.represented_features(W)[sparse].item() > 2
    assert tms.dimensions_per_feature(W)[sparse].item() < 0.6
    assert hist["loss"][-1][dense] < hist["loss"][0][dense]


def test_save_load_round_trip(tmp_path):
    model = tms.TMS(tms.spd_config("5-2", identity=True, n_instances=2))
    tms.save_tms(tmp_path / "t.safetensors", model)
    back = tms.load_tms(tmp_path / "t.safetensors")
    assert back.cfg == model.cfg and torch.equal(back.W, model.W)


def test_spd_presets():
    cfg = tms.spd_config("40-10")
    assert (cfg.n_features, cfg.n_hidden, cfg.batch_size, cfg.lr) == (40, 10, 8192, 5e-3)
    assert cfg.probabilities().tolist() == pytest.approx([0.05] * cfg.n_instances)
    assert cfg.importance().tolist() == [1.0] * 40
    with pytest.raises(ConfigError, match="valid: 5-2, 40-10"):
        tms.spd_config("3-1")


def test_best_instance_picks_complete_one_or_explains():
    model = tms.TMS(tms.TMSConfig(n_instances=3, n_features=3, n_hidden=2))
    with torch.no_grad():
        model.W.copy_(torch.stack([_polygon(2, 3), _polygon(3), _polygon(3) * 0.8]))
    assert tms.best_instance(model) == 1
    with torch.no_grad():
        model.W[1:] = 0.1
    with pytest.raises(RuntimeError, match="no instance represents all 3 features"):
        tms.best_instance(model)


def test_bad_input_errors():
    with pytest.raises(ConfigError, match="one per instance"):
        tms.TMSConfig(n_instances=3, feature_probability=(0.1, 0.2))
    with pytest.raises(ConfigError, match=r"in \(0, 1\]"):
        tms.TMSConfig(feature_probability=(0.0,))
    with pytest.raises(ConfigError, match="n_hidden must be >= 1"):
        tms.TMSConfig(n_hidden=0)
    with pytest.raises(ConfigError, match="no field"):
        tms.TMSConfig.from_dict({"n_feature": 3})
    model = tms.TMS(tms.TMSConfig(n_instances=2))
    with pytest.raises(ValueError, match=r"expects inputs \[batch, n_instances=2, n_features=5\]"):
        model(torch.rand(4, 5))
    with pytest.raises(IndexError, match="has 2 instances"):
        model.instance(2)
    with pytest.raises(ValueError, match="expected W as"):
        tms.feature_norms(torch.rand(5))


def test_initial_model_is_where_training_starts():
    """The untrained baseline is the trained model's own initialisation: one step of training
    from initial_model's weights gives the trained model's first step; the global random
    state is left alone; the draws of initial_weight_draws follow the same distribution."""
    cfg = tms.intro_config(n_instances=3, steps=1, seed=7)
    state = torch.random.get_rng_state()
    start = tms.initial_model(cfg).W.detach()
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(cfg.seed)
    assert torch.equal(start, tms.TMS(cfg).W.detach())
    trained, _ = tms.train_tms(cfg)
    assert 0 < (trained.W.detach() - start).abs().max() < 0.01  # one AdamW step of lr 1e-3 away
    draws = tms.initial_weight_draws(tms.intro_config(), 4000, torch.Generator().manual_seed(0))
    assert draws.shape == (4000, 10, 2, 5)
    assert draws.std().item() == pytest.approx(math.sqrt(2 / 7), rel=0.02)
