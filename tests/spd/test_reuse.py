"""What the batched passes take from the target forward: the frozen prefix does not run, the
layers' own outputs on unchanged rows are the target's, and every loss and gradient stays
the straightforward version's."""

import pytest
import torch
from torch import nn

from mechscope.spd.config import SPDConfig
from mechscope.spd.decomposition import Decomposition
from mechscope.spd.objective import SPDObjective
from mechscope.spd.passes import batched_masked_passes, sequential_masked_passes, target_pass_keeping
from mechscope.spd.reuse import reuse_plan
from mechscope.zoo.transformer import Transformer, TransformerConfig


class Counting(nn.Linear):
    """A linear layer that counts the times its own forward computes."""

    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


class ResidToy(nn.Module):
    """The residual MLP's shape: a frozen embedding, one residual MLP, an unembedding."""

    def __init__(self, shared_twice: bool = False):
        super().__init__()
        self.embed = Counting(5, 8, bias=False)
        self.mlp_in = nn.Linear(8, 6)
        self.mlp_out = nn.Linear(6, 8)
        self.unembed = nn.Linear(8, 5, bias=False)
        self.shared_twice = shared_twice

    def forward(self, x):
        r = self.embed(x)
        if self.shared_twice:  # a module called twice is never taken from the target forward
            r = r + self.mlp_out(torch.relu(self.mlp_in(r))) + self.embed(x)
            return self.unembed(r)
        return self.unembed(r + self.mlp_out(torch.relu(self.mlp_in(r))))


def _toy(**kw):
    torch.manual_seed(0)
    return ResidToy(**kw).eval().requires_grad_(False)


def _masks(dec, inner, rows):
    gen = torch.Generator().manual_seed(0)
    masks = {p: torch.rand(*inner[p].shape, generator=gen) for p in dec.paths}
    deltas = {p: torch.rand(rows, generator=gen) for p in dec.paths}
    return masks, deltas


@pytest.mark.parametrize("faithfulness", ["delta", "loss"])
def test_the_frozen_prefix_runs_once_per_step_and_the_outputs_are_unchanged(faithfulness):
    model, x = _toy(), torch.randn(16, 5)
    dec = Decomposition(model, SPDConfig(sites=("mlp_in", "mlp_out"), C=4, faithfulness=faithfulness),
                        example_inputs=x)
    target, acts, known = target_pass_keeping(model, dec, x)
    assert reuse_plan(model, dec.paths, x, 16, dec).prefix == ("embed",)
    assert set(known) == {"embed", "mlp_in", "mlp_out"}
    inner = {p: dec.comps(p).inner(acts[p]) for p in dec.paths}
    masks, deltas = _masks(dec, inner, 16)
    if faithfulness == "loss":
        deltas = {p: None for p in dec.paths}
    batched_masked_passes(model, dec, x, acts, inner, masks, deltas, known=known)  # first use: checked once
    before = model.embed.calls
    reused = batched_masked_passes(model, dec, x, acts, inner, masks, deltas, known=known)
    assert model.embed.calls == before  # the embedding did not run: its output came from the target pass
    plain = batched_masked_passes(model, dec, x, acts, inner, masks, deltas)
    assert model.embed.calls == before + 1
    straight = sequential_masked_passes(model, dec, x, masks, deltas)
    assert len(reused) == len(straight) == 3
    for y1, y2, y3 in zip(reused, plain, straight):
        assert torch.allclose(y1, y3, atol=1e-6) and torch.allclose(y2, y3, atol=1e-6)


def test_losses_and_gradients_with_reuse_equal_the_straightforward_ones():
    model, x = _toy(), torch.randn(32, 5)
    dec = Decomposition(model, SPDConfig(sites=("mlp_in", "mlp_out"), C=4), example_inputs=x)
    results = []
    for batched in (True, False):
        out = SPDObjective(dec, batched=batched)(x, 0.3, torch.Generator().manual_seed(3))
        results.append((out, torch.autograd.grad(out["total"], list(dec.parameters()))))
    (a, ga), (b, gb) = results
    for key in ("total", "stochastic", "layerwise", "importance"):
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), key
    for g1, g2 in zip(ga, gb):
        assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-6)


def test_a_module_called_twice_or_a_model_in_training_mode_has_no_prefix():
    model, x = _toy(shared_twice=True), torch.randn(8, 5)
    dec = Decomposition(model, SPDConfig(sites=("mlp_in",), C=3), example_inputs=x)
    assert reuse_plan(model, dec.paths, x, 8, dec).prefix == ()
    target, acts, known = target_pass_keeping(model, dec, x)
    inner = {p: dec.comps(p).inner(acts[p]) for p in dec.paths}
    masks, deltas = _masks(dec, inner, 8)
    for y1, y2 in zip(batched_masked_passes(model, dec, x, acts, inner, masks, deltas, known=known),
                      sequential_masked_passes(model, dec, x, masks, deltas)):
        assert torch.allclose(y1, y2, atol=1e-6)
    training = _toy().train()
    dec = Decomposition(training, SPDConfig(sites=("mlp_out",), C=3), example_inputs=x)
    assert reuse_plan(training, dec.paths, x, 8, dec).prefix == ()


def test_a_transformer_decomposed_in_its_last_block_skips_the_blocks_before():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab=20, n_ctx=8, d_model=16, n_layers=3, n_heads=2, d_head=8, d_mlp=32))
    model.eval().requires_grad_(False)
    ids = torch.randint(0, 20, (3, 8))
    dec = Decomposition(model, SPDConfig(sites=("blocks.2.attn.q", "blocks.2.mlp.fc_in"), C=6, recon="kl"))
    target, acts, known = target_pass_keeping(model, dec, ids)
    prefix = reuse_plan(model, dec.paths, ids, 3, dec).prefix
    assert {"blocks.0", "blocks.1"} <= set(prefix)
    assert not any(p.startswith("blocks.0.") for p in prefix)  # only the outermost modules
    inner = {p: dec.comps(p).inner(acts[p]) for p in dec.paths}
    masks, deltas = _masks(dec, inner, 3)
    deltas = {p: d[:, None].expand(3, 8).contiguous() for p, d in deltas.items()}
    for y1, y2 in zip(batched_masked_passes(model, dec, ids, acts, inner, masks, deltas, known=known),
                      sequential_masked_passes(model, dec, ids, masks, deltas)):
        assert torch.allclose(y1, y2, atol=1e-5)


def test_a_prefix_that_does_not_reproduce_the_forward_is_dropped_with_a_warning():
    model, x = _toy(), torch.randn(16, 5)
    dec = Decomposition(model, SPDConfig(sites=("mlp_in", "mlp_out"), C=4), example_inputs=x)
    target, acts, known = target_pass_keeping(model, dec, x)
    inner = {p: dec.comps(p).inner(acts[p]) for p in dec.paths}
    masks, deltas = _masks(dec, inner, 16)
    wrong = {**known, "embed": known["embed"] + 1.0}  # as if the probe had misread a module's output
    with pytest.warns(RuntimeWarning, match="did not reproduce"):
        outs = batched_masked_passes(model, dec, x, acts, inner, masks, deltas, known=wrong)
    assert reuse_plan(model, dec.paths, x, 16, dec).prefix == ()
    for y1, y2 in zip(outs, sequential_masked_passes(model, dec, x, masks, deltas)):
        assert torch.allclose(y1, y2, atol=1e-6)
