"""Attribution patching: exact where the model is linear after the site, one backward for
all cells, differentiable metric required, and it ranks the hand-set circuit perfectly."""

import pytest
import torch

from mechscope.circuits.attribution import attribution_patching
from mechscope.circuits.cells import auc
from mechscope.circuits.heads import head_site
from mechscope.circuits.patching import Cell, patch_cells
from mechscope.core.site import Site
from mechscope.tasks import induction
from mechscope.zoo import build


def test_exact_when_the_rest_of_the_model_is_linear():
    """The MLP's readout is linear in its last hidden layer, so the first-order estimate is exact."""
    model = build("mlp", seed=0)
    model.requires_grad_(False)  # frozen weights: the capture must still get gradients
    gen = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randn(16, 16, generator=gen), torch.randn(16, 16, generator=gen)

    def metric(out):
        return (out[:, 0] - out[:, 1]).mean()
    cells = [Cell(Site("acts.2", features=[i])) for i in range(16)] + [Cell(Site("acts.2"))]
    for direction in ("noise", "denoise"):
        est = attribution_patching(model, clean, corrupt, cells, metric, direction)
        real = patch_cells(model, clean, corrupt, cells, metric, direction)
        assert torch.allclose(est.values, real.values, atol=1e-5)
        assert est.clean == pytest.approx(real.clean) and est.corrupt == pytest.approx(real.corrupt)
        assert "attribution estimate" in est.ablation


def test_positions_of_a_sequence_site_sum_to_the_whole():
    model = build("transformer", seed=0, n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, vocab=20, n_ctx=16)
    gen = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(0, 20, (2, 6), generator=gen), torch.randint(0, 20, (2, 6), generator=gen)
    site = Site("blocks.1", io="input")
    res = attribution_patching(model, clean, corrupt, [Cell(site, p) for p in range(6)] + [Cell(site)],
                               lambda lg: lg[:, -1, 3].mean())
    per_position = res.values[:6] - res.clean
    assert per_position.sum().item() == pytest.approx(res.values[6].item() - res.clean, abs=1e-5)


def test_hand_set_circuit_ranked_perfectly():
    model, truth = induction.hand_set_model()
    gen = torch.Generator().manual_seed(2)
    clean = induction.repeated_tokens(32, 6, 12, generator=gen)
    corrupt = induction.corrupt_first_copy(clean, 6, 12, gen)
    cells = [Cell(head_site(layer, h, model.cfg.d_head).replace(name=None)) for layer in range(2) for h in range(4)]
    res = attribution_patching(model, clean, corrupt, cells, lambda lg: induction.induction_metric(lg, clean, 6))
    labels = torch.tensor([(layer, h) in truth["heads"] for layer in range(2) for h in range(4)])
    assert auc(res.effects.abs(), labels) == 1.0


def test_needs_a_differentiable_metric():
    model = build("mlp", seed=0)
    x, y = torch.randn(4, 16), torch.randn(4, 16)
    with pytest.raises(ValueError, match="differentiable scalar metric"):
        attribution_patching(model, x, y, [Cell(Site("acts.0"))], lambda out: out.sum().item())
    with pytest.raises(ValueError, match="direction must be"):
        attribution_patching(model, x, y, [Cell(Site("acts.0"))], lambda out: out.sum(), direction="both")
