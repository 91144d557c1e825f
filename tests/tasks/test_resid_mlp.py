"""The residual-MLP target of SPD (compressed computation): model, data, a short training run
that must beat the MLP-less baseline, checkpoints and bad input."""

import pytest
import torch

from mechscope.core.config import ConfigError
from mechscope.core.run import cache
from mechscope.core.site import Site
from mechscope.tasks import resid_mlp as rm


def test_model_shapes_sites_and_fixed_embedding():
    cfg = rm.ResidMLPConfig(n_features=10, d_embed=40, d_mlp=5)
    model = rm.ResidMLP(cfg)
    assert torch.allclose(model.W_E.norm(dim=-1), torch.ones(10))  # unit-norm rows
    assert torch.equal(model.embed.weight, model.W_E.T)  # unembedding is W_Eᵀ of the embedding
    assert not model.embed.weight.requires_grad and not model.unembed.weight.requires_grad
    assert model.mlp_in.bias is None and model.mlp_out.bias is None
    x = torch.randn(3, 10)
    acts = cache(model, x, [Site("act"), Site("mlp_in", io="input")])
    assert acts[Site("act")].shape == (3, 5)
    by_hand = model.unembed(model.embed(x) + model.mlp_out(torch.relu(model.mlp_in(model.embed(x)))))
    assert torch.allclose(model(x), by_hand)
    with pytest.raises(ValueError, match=r"inputs \[..., 10\]"):
        model(torch.randn(3, 9))


def test_labels_are_x_plus_relu_x():
    x = torch.tensor([[-0.5, 0.0, 0.25]])
    assert torch.equal(rm.labels(x), torch.tensor([[-0.5, 0.0, 0.5]]))


def test_sparse_features_condition_on_at_least_one_active():
    gen = torch.Generator().manual_seed(0)
    x = rm.sparse_features(20000, 5, 0.05, 0.0, 1.0, at_least_one=True, generator=gen)
    assert x.shape == (20000, 5)
    active = x != 0
    assert bool(active.any(-1).all())
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # P(feature active | at least one active) = p / (1 - (1 - p)^n)
    expected = 0.05 / (1 - 0.95 ** 5)
    assert float(active.float().mean()) == pytest.approx(expected, rel=0.03)
    y = rm.sparse_features(20000, 100, 0.01, generator=gen)  # U[-1, 1] by default
    assert float(y.min()) < -0.9 and float(y.max()) > 0.9
    plain = rm.sparse_features(5000, 4, 0.1, at_least_one=False, generator=gen)
    assert float((~(plain != 0).any(-1)).float().mean()) == pytest.approx(0.9 ** 4, abs=0.03)


def test_a_short_training_run_computes_relu_better_than_no_mlp():
    cfg = rm.ResidMLPConfig(n_features=20, d_embed=100, d_mlp=10, feature_probability=0.05, steps=300,
                            batch_size=256)
    model, history = rm.train_resid_mlp(cfg)
    metrics = rm.evaluate(model, cfg, n=4000)
    # without the MLP the model outputs ~x; the trained MLP must recover much of ReLU(x)
    assert metrics["loss"] < 0.7 * metrics["no_mlp_loss"]
    assert history["loss"][-1] < history["loss"][0]


def test_checkpoint_round_trip(tmp_path):
    cfg = rm.ResidMLPConfig(n_features=8, d_embed=20, d_mlp=4)
    model = rm.ResidMLP(cfg)
    rm.save_resid_mlp(tmp_path / "m.safetensors", model)
    back = rm.load_resid_mlp(tmp_path / "m.safetensors")
    x = torch.randn(4, 8)
    assert torch.equal(back(x), model(x)) and back.cfg == cfg


def test_bad_configs():
    with pytest.raises(ConfigError, match="d_mlp must be >= 1"):
        rm.ResidMLPConfig(d_mlp=0)
    with pytest.raises(ConfigError, match="feature_probability"):
        rm.ResidMLPConfig(feature_probability=0.0)
