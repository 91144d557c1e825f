"""Adding and ablating directions: exact effects, the weight edit's equivalence, clear errors."""

import pytest
import torch

from mechscope.core.run import cache, run
from mechscope.core.site import Site
from mechscope.steer.apply import (
    SteeringError,
    Steer,
    ablate,
    ablation_interventions,
    residual_writers,
    steer,
    steering_interventions,
)
from mechscope.steer.orthogonalize import orthogonalize_weights, weight_writers
from mechscope.zoo import build


@pytest.fixture
def model():
    return build("transformer", seed=0)


def test_addition_equals_the_hand_computed_forward(model):
    ids = torch.randint(0, 64, (3, 9))
    v = torch.randn(64)
    with torch.no_grad():
        got = steer(model, ids, v, Site("blocks.0"), 2.5, positions=[4])
        x = model.embed(ids) + model.pos_embed(torch.arange(9))
        x = model.blocks[0](x)
        x[:, 4] += 2.5 * v
        want = model.unembed(model.ln_final(model.blocks[1](x)))
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, model(ids), atol=1e-3)


def test_mask_adds_only_where_asked(model):
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    v = torch.randn(64)
    site = Site("embed")
    with torch.no_grad():
        _, acts = run(model, ids, [(site, Steer(v, 1.0, mask))], cache=[site])
        clean = cache(model, ids, [site])[site]
    delta = acts[site] - clean
    assert torch.allclose(delta[mask], v.expand(int(mask.sum()), 64), atol=1e-6)
    assert float(delta[~mask].abs().max()) == 0.0


def test_ablation_removes_the_direction_everywhere(model):
    ids = torch.randint(0, 64, (4, 10))
    r = torch.randn(64)
    sites = [Site(f"blocks.{l}") for l in range(2)]
    with torch.no_grad():
        _, acts = run(model, ids, ablation_interventions(model, r), cache=sites)
        _, clean = run(model, ids, cache=sites)
    for s in sites:
        assert float((acts[s] @ (r / r.norm())).abs().max()) < 1e-4  # every layer, every position
        assert float((clean[s] @ (r / r.norm())).abs().max()) > 0.1


def test_weight_edit_equals_hook_ablation(model):
    ids = torch.randint(0, 64, (4, 12))
    r = torch.randn(64)
    with torch.no_grad():
        hooked = ablate(model, ids, r)
        edited = orthogonalize_weights(model, r)
        assert float((edited(ids) - hooked).abs().max()) < 1e-4
        assert float((model(ids) - hooked).abs().max()) > 0.05  # the edit matters
    assert torch.equal(model.embed.weight, build("transformer", seed=0).embed.weight)  # original untouched


def test_residual_writers_of_the_zoo_transformer(model):
    # the hook form projects at what each block adds (the attention and MLP outputs, which are
    # their projections' own outputs here); the weight edit edits those projections
    assert [s.path for s in residual_writers(model)] == ["embed", "pos_embed", "blocks.0.attn", "blocks.0.mlp",
                                                         "blocks.1.attn", "blocks.1.mlp"]
    assert weight_writers(model) == ["embed", "pos_embed", "blocks.0.attn.o", "blocks.0.mlp.fc_out",
                                     "blocks.1.attn.o", "blocks.1.mlp.fc_out"]


def test_width_mismatch_is_a_clear_error(model):
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(SteeringError, match="dimension 32 but site blocks.0:output has width 64"):
        steer(model, ids, torch.randn(32), Site("blocks.0"), 1.0)
    with pytest.raises(SteeringError, match="dimension 10 but the residual stream"):
        ablation_interventions(model, torch.randn(10))
    with pytest.raises(SteeringError, match="dimension 10"):
        orthogonalize_weights(model, torch.randn(10))


def test_overflowing_coefficient_is_refused(model):
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(SteeringError, match="overflows torch.float32.*lower the coefficient"):
        steer(model, ids, torch.ones(64), Site("blocks.0"), 1e39)
    with pytest.raises(SteeringError, match="finite number"):
        steering_interventions(torch.ones(64), Site("blocks.0"), float("inf"))


def test_bad_directions(model):
    with pytest.raises(SteeringError, match="zero vector"):
        Steer(torch.zeros(64))
    with pytest.raises(SteeringError, match="NaN or inf"):
        Steer(torch.full((64,), float("nan")))
    with pytest.raises(SteeringError, match="vector \\[d\\]"):
        Steer(torch.ones(2, 3, 4))


def test_mask_shape_error(model):
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(SteeringError, match="mask has shape"):
        run(model, ids, [(Site("embed"), Steer(torch.ones(64), 1.0, torch.ones(2, 4, dtype=torch.bool)))])
