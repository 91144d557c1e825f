"""The forwards of an SPD step: exact factorisations reproduce the target, the batched passes
equal the straightforward ones, and the core hook gives interventions the module's input."""

import pytest
import torch
from torch import nn

from mechscope.core.run import run
from mechscope.core.site import Site
from mechscope.spd.components import SPDError
from mechscope.spd.config import SPDConfig
from mechscope.spd.decomposition import Decomposition
from mechscope.spd.objective import SPDObjective
from mechscope.spd.passes import batched_masked_passes, masked_forward, sequential_masked_passes, target_pass
from mechscope.tasks.tms import TMSInstance
from mechscope.zoo.transformer import Transformer, TransformerConfig


def test_output_interventions_see_the_module_input():
    lin = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    x = torch.randn(5, 3)
    seen = {}

    def fn(view, call):
        seen["args"] = call.args
        return view

    run(lin, x, [(Site("0"), fn)])
    assert torch.equal(seen["args"][0], x)
    run(lin, x, [(Site("0", io="input"), fn)])
    assert seen["args"] is None  # input sites have no module call yet


def _tms(identity=True):
    torch.manual_seed(0)
    m = TMSInstance(5, 2, hidden_identity=identity)
    with torch.no_grad():
        m.decoder.weight.copy_(m.encoder.weight.T)
        m.decoder.bias.normal_()
    return m


def _exact(dec: Decomposition, model) -> None:
    """Set every untied layer's U V to its target W exactly (C = d_in, U = W, V = I)."""
    with torch.no_grad():
        for info in dec.layers:
            if info.tied_to is None and info.kind != "embedding":
                comps = dec.comps(info.path)
                comps.U_param.zero_()
                comps.V_param.zero_()
                W = dec.target_weight(info.path)
                comps.U_param[:, : W.shape[1]] = W
                comps.V_param[: W.shape[1]] = torch.eye(W.shape[1])


def test_unmasked_exact_factorisation_reproduces_the_target():
    m = _tms(identity=False)
    cfg = SPDConfig(sites=("encoder", "decoder"), C=5)
    dec = Decomposition(m, cfg)
    _exact(dec, m)
    x = torch.rand(16, 5)
    target, acts = target_pass(m, dec, x)
    assert torch.allclose(target, m(x))
    assert torch.equal(acts["encoder"], x)
    out = masked_forward(m, dec, x, {"encoder": None, "decoder": None})
    assert torch.allclose(out, target, atol=1e-6)
    ones = {p: torch.ones(16, 5) for p in dec.paths}
    assert torch.allclose(masked_forward(m, dec, x, ones), target, atol=1e-6)
    # the delta component is exactly what the subcomponents miss: UV = 0 plus delta 1 is the target
    with torch.no_grad():
        for p in dec.paths:
            dec.comps(p).U_param.zero_()
    deltas = {p: torch.ones(16) for p in dec.paths}
    assert torch.allclose(masked_forward(m, dec, x, ones, deltas), target, atol=1e-6)


def test_zero_masks_ablate_every_subcomponent():
    m = _tms(identity=False)
    dec = Decomposition(m, SPDConfig(sites=("encoder",), C=5))
    x = torch.rand(8, 5)
    out = masked_forward(m, dec, x, {"encoder": torch.zeros(8, 5)})
    assert torch.allclose(out, torch.relu(m.decoder.bias).expand(8, 5))  # hidden = 0


@pytest.mark.parametrize("faithfulness", ["delta", "loss"])
def test_batched_passes_equal_the_straightforward_ones_on_tms_with_identity(faithfulness):
    m = _tms(identity=True)
    cfg = SPDConfig(sites=("encoder", "identity", "decoder"), tied=("decoder=encoder",), C=7,
                    faithfulness=faithfulness)
    x = torch.rand(32, 5) * (torch.rand(32, 5) < 0.4)
    dec = Decomposition(m, cfg, example_inputs=x)
    results = []
    for batched in (True, False):
        out = SPDObjective(dec, batched=batched)(x, 0.3, torch.Generator().manual_seed(3))
        grads = torch.autograd.grad(out["total"], list(dec.parameters()))
        results.append((out, grads))
    (a, ga), (b, gb) = results
    for key in ("total", "stochastic", "layerwise", "importance", "faithfulness"):
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), key
    for x1, x2 in zip(ga, gb):
        assert torch.allclose(x1, x2, rtol=1e-4, atol=1e-6)


def test_batched_passes_on_a_transformer_with_embedding_and_positions():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab=20, n_ctx=8, d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32)).eval()
    model.requires_grad_(False)
    cfg = SPDConfig(sites=("embed", "blocks.0.mlp.fc_in", "blocks.1.attn.q"), C=6, recon="kl")
    ids = torch.randint(0, 20, (3, 8))
    dec = Decomposition(model, cfg)
    target, acts = target_pass(model, dec, ids)
    inner = {p: dec.comps(p).inner(acts[p]) for p in dec.paths}
    gen = torch.Generator().manual_seed(0)
    masks = {p: torch.rand(*inner[p].shape, generator=gen) for p in dec.paths}
    deltas = {p: torch.rand(*inner[p].shape[:-1], generator=gen) for p in dec.paths}
    batched = batched_masked_passes(model, dec, ids, acts, inner, masks, deltas)
    straight = sequential_masked_passes(model, dec, ids, masks, deltas)
    assert len(batched) == len(straight) == 4
    for y1, y2 in zip(batched, straight):
        assert torch.allclose(y1, y2, atol=1e-5)


def test_a_module_used_twice_per_forward_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(self.lin(x))

    model = Twice()
    dec = Decomposition(model, SPDConfig(sites=("lin",), C=3))
    with pytest.raises(SPDError, match="more than once"):
        masked_forward(model, dec, torch.randn(2, 3), {"lin": None})


def test_nan_target_output_is_a_clear_error():
    m = _tms(identity=False)
    with torch.no_grad():
        m.decoder.bias[0] = float("nan")
    dec = Decomposition(m, SPDConfig(sites=("encoder",), C=3))
    with pytest.raises(SPDError, match="NaN.*finite target"):
        target_pass(m, dec, torch.rand(4, 5))


def test_an_inserted_identity_is_decomposed_like_a_matrix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Identity(), nn.ReLU(), nn.Linear(4, 2))
    model.requires_grad_(False)
    x = torch.randn(6, 3)
    dec = Decomposition(model, SPDConfig(sites=("0", "1", "3"), C=5), example_inputs=x)
    target, acts = target_pass(model, dec, x)
    inner = {p: dec.comps(p).inner(acts[p]) for p in dec.paths}
    gen = torch.Generator().manual_seed(0)
    masks = {p: torch.rand(*inner[p].shape, generator=gen) for p in dec.paths}
    deltas = {p: torch.rand(6, generator=gen) for p in dec.paths}
    for y1, y2 in zip(batched_masked_passes(model, dec, x, acts, inner, masks, deltas),
                      sequential_masked_passes(model, dec, x, masks, deltas)):
        assert torch.allclose(y1, y2, atol=1e-6)
    # with U V = I on the identity and the delta at 1, the identity's replacement is exact
    with torch.no_grad():
        comps = dec.comps("1")
        comps.U_param.zero_()
        comps.V_param.zero_()
        comps.U_param[:, :4] = torch.eye(4)
        comps.V_param[:4] = torch.eye(4)
    assert torch.allclose(masked_forward(model, dec, x, {"1": None}), target, atol=1e-6)
