"""Suffix replays: patching a residual-stream cell recomputes only the positions at and
after it, from the base run's keys and values, and gives the numbers of one full forward
per cell (zoo transformer, with padding masks, every readout); anything it cannot replay
falls back to the general paths with the same numbers."""

import pytest
import torch

from mechscope.circuits import suffix
from mechscope.circuits.cells import head_cells, resid_cells
from mechscope.circuits.patching import Cell, patch_cells, patch_one_by_one
from mechscope.core.run import cache
from mechscope.core.site import Site
from mechscope.core.structure import structure
from mechscope.core.suffix import plan_suffix, start_block
from mechscope.zoo import build

V, T = 23, 9


@pytest.fixture(scope="module")
def setup():
    model = build("transformer", seed=0, n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, vocab=V, n_ctx=16)
    gen = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(0, V, (3, T), generator=gen), torch.randint(0, V, (3, T), generator=gen)
    target = torch.tensor([1, 2, 3])

    def metric(logits):  # reads the last of the positions it is given
        return logits[:, -1].gather(1, target[:, None]).mean()
    return model, clean, corrupt, metric


def _cells(model):
    """Block inputs and outputs (the last block's output too) at every position, and -1."""
    outs = [Cell(Site(f"blocks.{j}"), p) for j in (0, 2) for p in (0, 4, T - 1)]
    return resid_cells(model, positions=range(T)) + outs + [Cell(Site("blocks.1", io="input"), -1)]


def test_forward_from_equals_forward_at_the_suffix():
    model = build("transformer", seed=1, n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, vocab=V, n_ctx=16)
    ids = torch.randint(0, V, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    block = Site("blocks.1", io="input")
    sites = [block, Site("blocks.1"), Site("blocks.1.attn.k"), Site("blocks.1.attn.v")]
    for key_mask in (None, mask):
        inputs = ids if key_mask is None else {"input_ids": ids, "attention_mask": key_mask}
        with torch.no_grad():
            a = cache(model, inputs, sites)
            for s in (0, 1, 5, T - 1):
                past = (a[sites[2]][:, :s], a[sites[3]][:, :s])
                x = a[block][:, s:]
                out = model.blocks[1].forward_from(x, past, key_mask)
                assert torch.allclose(out, a[sites[1]][:, s:], atol=1e-5)
                # three copies of the batch share the past; a subset of queries, in any order
                q = torch.tensor([T - 1 - s, 0])
                m3 = None if key_mask is None else key_mask.repeat(3, 1)
                out = model.blocks[1].forward_from(x.repeat(3, 1, 1), past, m3, q)
                assert torch.allclose(out, a[sites[1]][:, s:][:, q].repeat(3, 1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="not a multiple"):
        model.blocks[1].forward_from(torch.zeros(3, 2, 32), (torch.zeros(2, 1, 32), torch.zeros(2, 1, 32)))


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("readout", [None, [-1], [-1, 2]])
def test_suffix_patching_equals_one_forward_per_cell(setup, direction, readout):
    model, clean, corrupt, metric = setup
    cells = _cells(model)
    ref = patch_one_by_one(model, clean, corrupt, cells, metric, direction, readout=readout)
    for kwargs in ({}, {"cells_per_forward": 2}):
        fast = patch_cells(model, clean, corrupt, cells, metric, direction, readout=readout, **kwargs)
        assert torch.allclose(fast.values, ref.values, atol=1e-5), (fast.values - ref.values).abs().max()
        assert fast.clean == pytest.approx(ref.clean, abs=1e-6) and fast.corrupt == pytest.approx(ref.corrupt, abs=1e-6)


def test_suffix_patching_with_padding_masks(setup):
    model, clean, corrupt, metric = setup
    mask = torch.ones(3, T, dtype=torch.long)
    mask[0, :2] = 0
    mask[2, :4] = 0
    pos = torch.arange(T).expand(3, T)
    clean_in = {"input_ids": clean, "attention_mask": mask, "position_ids": pos}
    corrupt_in = {"input_ids": corrupt, "attention_mask": mask, "position_ids": pos}
    cells = _cells(model) + head_cells(model, positions=[T - 1])  # heads: the general path, same call
    for readout in (None, [-1]):
        ref = patch_one_by_one(model, clean_in, corrupt_in, cells, metric, readout=readout)
        fast = patch_cells(model, clean_in, corrupt_in, cells, metric, readout=readout)
        assert torch.allclose(fast.values, ref.values, atol=1e-5)


def test_the_suffix_path_is_taken(setup, monkeypatch):
    model, clean, corrupt, metric = setup
    seen = []
    real = suffix.patch
    monkeypatch.setattr(suffix, "patch", lambda state, cells, *a: seen.extend(cells) or real(state, cells, *a))
    cells = _cells(model)
    got = patch_cells(model, clean, corrupt, cells, metric, readout=[-1])
    assert len(seen) == len(cells) and got.extra["paths"]["suffix"] == len(cells) and "fallback" not in got.extra
    seen.clear()
    patch_cells(model, clean, corrupt, cells, metric, readout=[-1], replay_tail=False)
    assert not seen


def test_chunks_group_nearby_positions():
    cells = [(i, 0, p) for i, p in enumerate([0, 2, 4, 28, 29, 30, 31])]
    got = suffix.chunks(cells, k_max=64, t=32, width=32)
    assert [[p for _, _, p in c] for c in got] == [[0], [2], [4], [28, 29, 30, 31]]
    assert [len(c) for c in suffix.chunks(cells, k_max=2, t=32, width=32)] == [1, 1, 1, 2, 2]


def test_a_model_the_replay_does_not_know_falls_back(setup):
    """A hook on a block (which the replay would skip) fails the check: slower paths, the
    same numbers, the reason recorded in the result and warned about."""
    model, clean, corrupt, metric = setup
    cells = resid_cells(model, positions=range(0, T, 2))
    anchor = (0, Site("blocks.0", io="input"))
    handle = model.blocks[1].register_forward_hook(lambda m, args, out: out.roll(1, dims=-1))
    try:
        ref = patch_one_by_one(model, clean, corrupt, cells, metric, readout=[-1])
        with pytest.warns(UserWarning, match="did not use the suffix replay"):
            fast = patch_cells(model, clean, corrupt, cells, metric, readout=[-1])
        based = plan_suffix(model, corrupt, [anchor[1]], [anchor], [-1])
        assert based.suffix is None and "differs from the model's own logits" in based.reason
    finally:
        handle.remove()
    assert torch.allclose(fast.values, ref.values, atol=1e-5)
    assert fast.extra["paths"]["suffix"] == 0 and "differs" in fast.extra["fallback"]["suffix"]
    assert ref.extra["paths"] == {"suffix": 0, "tail": 0, "forwards": len(cells)}
    based = plan_suffix(model, corrupt, [anchor[1]], [anchor], [-1])  # without the hook the same check passes
    assert based.suffix is not None and based.reason is None and based.suffix.kind == "forward_from"
    s = structure(model)
    assert start_block(s, Site("blocks.1.attn")) is None
    assert start_block(s, Site("blocks.1", io="input", heads=[0], head_dim=8)) is None
    assert start_block(s, Site("blocks.2")) == 3 and start_block(s, Site("blocks.2", io="input")) == 2


def test_attention_only_models_without_layer_norm():
    """The induction world's shape: no MLPs, no LayerNorm."""
    model = build("transformer", seed=2, n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=None, layer_norm=False,
                  vocab=V, n_ctx=16)
    gen = torch.Generator().manual_seed(4)
    clean, corrupt = torch.randint(0, V, (2, T), generator=gen), torch.randint(0, V, (2, T), generator=gen)

    def metric(logits):
        return logits[:, -1, 5].mean()
    cells = resid_cells(model, positions=range(T)) + [Cell(Site("blocks.1"), p) for p in (0, T - 1)]
    ref = patch_one_by_one(model, clean, corrupt, cells, metric, readout=[-1])
    fast = patch_cells(model, clean, corrupt, cells, metric, readout=[-1])
    assert torch.allclose(fast.values, ref.values, atol=1e-5)


@pytest.mark.parametrize("readout", [None, [-1], [2, -1]])
def test_head_cells_replay_their_block_from_the_position_on(setup, readout):
    """A head cell starts at its block from the block's residual input and writes the head's
    slice of the output projection's input while the block is replayed (the last block too,
    which then runs every position): the numbers of one forward per cell."""
    model, clean, corrupt, metric = setup
    cells = head_cells(model, positions=[0, 3, T - 1]) + resid_cells(model, positions=[3])
    for kw in ({}, {"cells_per_forward": 4}):
        fast = patch_cells(model, clean, corrupt, cells, metric, readout=readout, **kw)
        ref = patch_one_by_one(model, clean, corrupt, cells, metric, readout=readout)
        assert torch.allclose(fast.values, ref.values, atol=1e-5), (fast.values - ref.values).abs().max()
        assert fast.extra["paths"] == {"suffix": len(cells), "tail": 0, "forwards": 0}
        assert "fallback" not in fast.extra
        heads = fast.values[:len(cells) - len(resid_cells(model, positions=[3]))]
        assert (heads - fast.corrupt).abs().max() > 1e-3  # the head patches move the metric
    assert suffix.feeds(structure(model), cells[0].site) == (0, Site("blocks.0", io="input"))
    assert suffix.feeds(structure(model), Site("blocks.0.attn.o", io="input", heads=[0], head_dim=8,
                                                features=[1])) is None  # part of a head: whole forwards


def test_a_head_write_the_replay_gets_wrong_is_caught_and_falls_back(setup, monkeypatch):
    """The head writes are checked once against a whole forward; a write that lands wrong (here
    on the wrong head) sends head cells to whole forwards, with the same numbers and the reason."""
    model, clean, corrupt, metric = setup
    real = suffix._head_writes

    def wrong(writes, b):
        return real([(j, q, site.replace(heads=[(site.heads[0] + 1) % 4]), v) for j, q, site, v in writes], b)
    monkeypatch.setattr(suffix, "_head_writes", wrong)
    cells = head_cells(model, positions=[2]) + resid_cells(model, positions=[2])
    fast = patch_cells(model, clean, corrupt, cells, metric, readout=[-1])
    ref = patch_one_by_one(model, clean, corrupt, cells, metric, readout=[-1])
    assert torch.allclose(fast.values, ref.values, atol=1e-5)
    n_heads = len(cells) - 3
    assert fast.extra["paths"] == {"suffix": 3, "tail": 0, "forwards": n_heads}
    assert "head write" in fast.extra["fallback"]["suffix heads"]
