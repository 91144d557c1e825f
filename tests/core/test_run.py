import pytest
import torch
from torch import nn

from mechscope.core.batch import collate
from mechscope.core.intervene import Replace, Zero
from mechscope.core.run import NonFiniteActivationError, cache, hooked, interchange, run
from mechscope.core.site import Site, SiteError
from mechscope.zoo import build


def _all_sites(model):
    return [Site(name) for name, m in model.named_modules() if name and not isinstance(m, (nn.ModuleList, nn.Identity))]


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_nothing_intervened_is_bit_identical(name):
    model = build(name)
    x = torch.randn(4, 16) if name == "mlp" else torch.randint(0, 64, (3, 10))
    plain = model(x)
    out, acts = run(model, x, cache=_all_sites(model))
    assert torch.equal(out, plain)
    assert len(acts) == len(_all_sites(model))
    with torch.no_grad():
        assert torch.equal(run(model, x, cache=_all_sites(model))[0], plain)


def test_hooks_are_removed_also_when_the_body_or_a_hook_raises():
    model = build("mlp")
    with pytest.raises(RuntimeError):
        with hooked(model, cache=[Site("layers.0")]):
            assert model.layers[0]._forward_hooks
            raise RuntimeError("boom")
    assert not model.layers[0]._forward_hooks

    def bad(view, call):
        raise ValueError("inside hook")

    with pytest.raises(ValueError, match="inside hook"):
        run(model, torch.randn(2, 16), {Site("acts.1"): bad})
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_patched_run_equals_hand_computed_result():
    model = build("mlp")
    base, source = torch.randn(5, 16), torch.randn(5, 16)
    feats = [0, 3, 7]
    out, _ = run(model, base, {Site("acts.0", features=feats): Replace(cache(model, source, [Site("acts.0", features=feats)])[Site("acts.0", features=feats)])})
    l0, l1, l2, ro = model.layers[0], model.layers[1], model.layers[2], model.readout
    h = torch.relu(l0(base))
    h[:, feats] = torch.relu(l0(source))[:, feats]
    expected = ro(torch.relu(l2(torch.relu(l1(h)))))
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, model(base))


def test_backward_flows_through_patched_activations():
    model = build("mlp")
    for p in model.parameters():
        p.requires_grad_(False)
    source = torch.randn(4, 16, requires_grad=True)
    src = cache(model, source, [Site("acts.0")], detach=False)[Site("acts.0")]
    out, _ = run(model, torch.randn(4, 16), {Site("acts.0"): Replace(src)})
    out.sum().backward()
    assert source.grad is not None and source.grad.abs().sum() > 0


def test_output_kind_is_checked_tuple_vs_tensor():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, x.sum()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(self.pair(x)[0])

    model, x = Wrap(), torch.randn(2, 3)
    with pytest.raises(SiteError, match="not a tensor; choose the element"):
        run(model, x, cache=[Site("pair")])
    with pytest.raises(SiteError, match="not a tuple"):
        run(model, x, cache=[Site("lin", element=0)])
    out, acts = run(model, x, {Site("pair", element=0): Zero()}, cache=[Site("pair", element=0)])
    assert torch.equal(acts[Site("pair", element=0)], torch.zeros(2, 3))
    assert torch.allclose(out, model.lin.bias.expand(2, 3))


def test_input_sites_positional_and_keyword():
    model = build("transformer")
    ids = torch.randint(0, 64, (2, 6))
    z = Site("blocks.0.attn.o", io="input")
    by_kw = Site("blocks.1", io="input", element="x")  # Block.forward(x, key_mask) gets x positionally
    acts = cache(model, ids, [z, by_kw])
    assert acts[z].shape == (2, 6, 64)
    assert torch.equal(acts[by_kw], cache(model, ids, [Site("blocks.0")])[Site("blocks.0")])
    with pytest.raises(SiteError, match="no argument 'y'"):
        cache(model, ids, [Site("blocks.1", io="input", element="y")])


def test_wrong_path_suggests_nearest():
    with pytest.raises(SiteError, match="did you mean 'blocks.1.attn'"):
        cache(build("transformer"), torch.zeros(1, 3, dtype=torch.long), [Site("blocks.1.atn")])


def test_source_shape_mismatch_is_an_error():
    model = build("transformer")
    base, source = torch.randint(0, 64, (3, 6)), torch.randint(0, 64, (2, 6))
    with pytest.raises(SiteError, match="same batch size"):
        interchange(model, base, source, [Site("blocks.0")])


def test_nan_at_a_site_names_the_site():
    model = build("mlp")
    model.layers[1].weight.data[0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError, match="acts.1"):
        run(model, torch.randn(2, 16), cache=[Site("acts.0"), Site("acts.1")])
    model = build("mlp")
    with pytest.raises(NonFiniteActivationError, match="written by the intervention at site acts.0"):
        run(model, torch.randn(2, 16), {Site("acts.0"): lambda v, c: v * float("inf")})


def test_cache_stops_after_the_deepest_site():
    model = build("transformer")
    calls = []
    model.unembed.register_forward_hook(lambda *a: calls.append(1))
    cache(model, torch.randint(0, 64, (2, 5)), [Site("blocks.0")])
    assert calls == []
    run(model, torch.randint(0, 64, (2, 5)), cache=[Site("blocks.0")])
    assert calls == [1]


def test_head_ablation_zeroes_exactly_one_head():
    model = build("transformer")
    ids = torch.randint(0, 64, (2, 7))
    site = Site("blocks.1.attn.o", io="input", heads=[2], head_dim=16)
    z_site = Site("blocks.1.attn.o", io="input")
    out, acts = run(model, ids, {site: Zero()}, cache=[z_site])
    z = acts[z_site]
    assert torch.equal(z[..., 32:48], torch.zeros(2, 7, 16))
    clean = cache(model, ids, [z_site])[z_site]
    assert torch.equal(z[..., :32], clean[..., :32]) and torch.equal(z[..., 48:], clean[..., 48:])
    assert not torch.allclose(out, model(ids))


def test_padding_side_does_not_move_positions():
    model = build("transformer")
    seqs = [[5, 6, 7], [1, 2, 3, 4, 9, 8], [3, 3]]
    site = Site("blocks.1", positions="last")
    right = cache(model, collate(seqs, side="right"), [site])[site]
    left = cache(model, collate(seqs, side="left"), [site])[site]
    alone = torch.cat([cache(model, collate([s]), [site])[site] for s in seqs])
    assert right.shape == (3, 1, 64)
    assert torch.allclose(right, left, atol=1e-5) and torch.allclose(right, alone, atol=1e-5)


def test_interchange_with_separately_padded_batches():
    """Patching the last token's residual from a differently padded source equals
    patching it from the source run alone."""
    model = build("transformer")
    base = collate([[1, 2, 3], [4, 5, 6, 7]], side="left")
    source = collate([[9, 9, 9, 9, 9], [8]], side="right")
    site = Site("blocks.0", positions="last")
    out = interchange(model, base, source, [site])
    # reference: each pair alone, unpadded
    for i, (b, s) in enumerate([([1, 2, 3], [9, 9, 9, 9, 9]), ([4, 5, 6, 7], [8])]):
        ref = interchange(model, torch.tensor([b]), torch.tensor([s]), [site])
        assert torch.allclose(out[i, -1], ref[0, -1], atol=1e-5)


def test_cache_is_not_rewritten_by_later_in_place_ops():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4))
    x = torch.randn(64, 4)
    acts = cache(model, x, [Site("0"), Site("2")])
    assert torch.equal(acts[Site("0")], model[0](x))
    assert (acts[Site("0")] < 0).any()
