"""Attribution patching: exact where the model is linear after the site, one backward for
all cells, differentiable metric required, and it ranks the hand-set circuit perfectly."""

import pytest
import torch

from mechscope.circuits.attribution import attribution_patching
from mechscope.circuits.cells import auc
from mechscope.core.aliases import head_out
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
    cells = [Cell(head_out(model, layer, h).replace(name=None)) for layer in range(2) for h in range(4)]
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


class _Doubled(type(build("transformer", seed=0, n_layers=1, vocab=8, n_ctx=4))):
    """Does something after its unembedding that a head replay would miss."""

    def forward(self, *args, **kwargs):
        return 2 * super().forward(*args, **kwargs)


def test_readout_gives_the_same_estimates():
    """Logits at the readout only (the last block and unembedding run there, checked against
    the model's own logits) give the estimates of the full forward, with padding too."""
    from mechscope.circuits.cells import resid_cells
    from mechscope.circuits.readout import find_head
    from mechscope.zoo.transformer import TransformerConfig

    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, vocab=20, n_ctx=16)
    zoo = build("transformer", seed=0, **cfg)
    doubled = _Doubled(TransformerConfig(**cfg))
    doubled.load_state_dict(zoo.state_dict())
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 20, (2, 7), generator=gen), torch.randint(0, 20, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    target = torch.tensor([4, 5])
    cells = resid_cells(zoo, positions=range(7))
    sites = [c.site for c in cells]
    assert find_head(zoo, sites).last_block is zoo.blocks[1]  # the last block at the readout only
    assert find_head(zoo, sites + [Site("blocks.1")]).anchor == Site("blocks.1")  # after it: the head only
    assert find_head(zoo, [Site("ln_final")]) is None
    for model, cells in ((zoo, cells), (zoo, cells + [Cell(Site("blocks.1"), 6)]), (doubled, cells)):
        for inputs in (ids, tuple({"input_ids": x, "attention_mask": mask} for x in ids)):
            for readout in ([-1], [3, -1]):
                def metric(logits):  # the last readout position
                    return logits[:, -1].gather(1, target[:, None]).mean()
                full = attribution_patching(model, *inputs, cells, lambda lg: metric(lg[:, readout]))
                fast = attribution_patching(model, *inputs, cells, metric, readout=readout)
                assert torch.allclose(fast.values, full.values, atol=1e-5)
                assert fast.clean == pytest.approx(full.clean, abs=1e-6)


def test_non_finite_estimates_are_refused():
    model = build("mlp", seed=0)
    x, y = torch.randn(4, 16), torch.randn(4, 16)
    y[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        attribution_patching(model, x, y, [Cell(Site("acts.0"))], lambda out: out[:, 0].nan_to_num().mean())
