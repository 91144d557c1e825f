"""Activation and path patching: batched cells equal one forward per cell and equal the
core's own interchange, scores are normalised as specified, and bad input is refused."""

import pytest
import torch

from mechscope.circuits.cells import auc, grid, head_cells, resid_cells
from mechscope.core.aliases import head_in, head_out
from mechscope.circuits.patching import Cell, normalised_score, patch_cells, patch_one_by_one, path_patch
from mechscope.core.intervene import Replace
from mechscope.core.run import cache, run
from mechscope.core.site import Site, SiteError
from mechscope.tasks import induction
from mechscope.zoo import build


@pytest.fixture(scope="module")
def setup():
    model = build("transformer", seed=0, n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, vocab=20, n_ctx=16)
    gen = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(0, 20, (3, 7), generator=gen), torch.randint(0, 20, (3, 7), generator=gen)
    target = torch.tensor([1, 2, 3])

    def metric(logits):
        return logits[:, -1].gather(1, target[:, None]).mean()
    return model, clean, corrupt, metric


def test_batched_cells_equal_one_forward_per_cell(setup):
    model, clean, corrupt, metric = setup
    cells = resid_cells(model, positions=range(7)) + head_cells(model) + head_cells(model, positions=[2, 6])
    for direction in ("denoise", "noise"):
        batched = patch_cells(model, clean, corrupt, cells, metric, direction, cells_per_forward=5)
        single = patch_one_by_one(model, clean, corrupt, cells, metric, direction)
        assert torch.allclose(batched.values, single.values, atol=1e-5)
        assert batched.direction == direction and "noising" in batched.ablation or "denoising" in batched.ablation


def test_tail_replay_and_readout_give_the_same_numbers(setup):
    model, clean, corrupt, metric = setup
    cells = resid_cells(model, positions=range(7))

    def last(logits):  # reads only the readout position it is given
        assert logits.shape[1] == 1
        return metric(logits)
    full = patch_one_by_one(model, clean, corrupt, cells, last, readout=[-1])
    for kwargs in ({}, {"cells_per_forward": 3}, {"replay_tail": False}):
        fast = patch_cells(model, clean, corrupt, cells, last, readout=[-1], **kwargs)
        assert torch.allclose(fast.values, full.values, atol=1e-5)


def test_a_cell_equals_the_cores_interchange(setup):
    model, clean, corrupt, metric = setup
    site = Site("blocks.1", io="input")
    res = patch_cells(model, clean, corrupt, [Cell(site, 4)], metric)
    at4 = site.replace(positions=[4])
    with torch.no_grad():
        src = cache(model, clean, [at4])[at4]
        out, _ = run(model, corrupt, {at4: Replace(src)})
    assert res.values[0].item() == pytest.approx(float(metric(out)), abs=1e-6)


def test_normalised_scores_at_the_extremes(setup):
    model, clean, corrupt, metric = setup
    # the whole stream before block 0 *is* the input: patching it restores clean exactly
    everything = Cell(Site("blocks.0", io="input"))
    res = patch_cells(model, clean, corrupt, [everything], metric, "denoise")
    assert res.scores[0].item() == pytest.approx(1.0, abs=1e-5)
    res = patch_cells(model, clean, corrupt, [everything], metric, "noise")
    assert res.effects[0].item() == pytest.approx(1.0, abs=1e-5)
    assert normalised_score(torch.tensor([2.0, 3.0]), clean=3.0, corrupt=1.0).tolist() == [0.5, 1.0]
    d = res.to_dict()
    assert d["ablation"] == res.ablation and d["direction"] == "noise"


def test_hand_set_circuit_is_recovered_by_patching_and_paths():
    model, truth = induction.hand_set_model()
    gen = torch.Generator().manual_seed(1)
    clean = induction.repeated_tokens(32, 6, 12, generator=gen)
    corrupt = induction.corrupt_first_copy(clean, 6, 12, gen)

    def metric(logits):
        return induction.induction_metric(logits, clean, 6)
    cells = [Cell(head_out(model, layer, h).replace(name=None), None, f"{layer}.{h}")
             for layer in range(2) for h in range(4)]
    res = patch_cells(model, clean, corrupt, cells, metric, "noise")
    labels = torch.tensor([(layer, h) in truth["heads"] for layer in range(2) for h in range(4)])
    assert auc(res.effects.abs(), labels) == 1.0
    assert res.effects[~labels].abs().max().item() < 1e-5  # decoys write nowhere that matters
    assert head_in(model, 1, 0, "k") == Site("blocks.1.attn.k", heads=[0], head_dim=model.cfg.d_head)
    real = path_patch(model, clean, corrupt, head_out(model, 0, 0), head_in(model, 1, 0, "k"), metric)
    decoy = path_patch(model, clean, corrupt, head_out(model, 0, 0), head_in(model, 1, 2, "k"), metric)
    assert 1 - real > 0.5 and abs(1 - decoy) < 1e-5


def test_auc_and_grid():
    assert auc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1, 0, 0])) == 1.0
    assert auc(torch.tensor([1.0, 1.0]), torch.tensor([1, 0])) == 0.5
    assert grid(torch.arange(6.0), 2).shape == (2, 3)
    with pytest.raises(ValueError, match="both circuit and non-circuit"):
        auc(torch.tensor([1.0]), torch.tensor([1]))


def test_bad_input(setup):
    model, clean, corrupt, metric = setup
    cell = Cell(Site("blocks.0", io="input"), 1)
    with pytest.raises(ValueError, match="same shapes"):
        patch_cells(model, clean, corrupt[:, :5], [cell], metric)
    with pytest.raises(ValueError, match="is the same on the clean"):
        patch_cells(model, clean, clean, [cell], metric)
    with pytest.raises(SiteError, match="must not select positions"):
        Cell(Site("blocks.0", positions=[1]))
    with pytest.raises(SiteError, match="position 9 is outside"):
        patch_cells(model, clean, corrupt, [Cell(Site("blocks.0", io="input"), 9)], metric)
    with pytest.raises(ValueError, match="must return a scalar"):
        patch_cells(model, clean, corrupt, [cell], lambda lg: lg[:, -1, 0])
    with pytest.raises(ValueError, match="direction must be"):
        patch_cells(model, clean, corrupt, [cell], metric, direction="sideways")
    with pytest.raises(ValueError, match="at least one cell"):
        patch_cells(model, clean, corrupt, [], metric)
