"""Every fast path of an SPD step computes what the plain autograd version computes.

The hand-written importance-MLP kernel, the fused mask/penalty function and the fused
optimizer are speed-ups only: on small cases their values and the gradients of every
parameter equal the straightforward composition of the spec's definitions to float
rounding (the speed itself is measured in benchmarks/bench_spd.py, not here).
"""

import pytest
import torch
from torch import nn

from mechscope.spd.config import SPDConfig
from mechscope.spd.decomposition import Decomposition, module_key
from mechscope.spd.importance import ScalarMLPImportance
from mechscope.spd.losses import annealed_p, importance_minimality, mean_over_layers, mse
from mechscope.spd.masks import (
    delta_mask,
    lower_leaky_hard_sigmoid,
    mask_and_penalised,
    stochastic_mask,
    upper_leaky_hard_sigmoid,
)
from mechscope.spd.objective import SPDObjective
from mechscope.spd.passes import sequential_masked_passes, target_pass
from mechscope.spd.train import make_optimizer
from mechscope.tasks.tms import TMSInstance


def _importance(C=6, hidden=(16,), seed=0):
    imp = ScalarMLPImportance(C, hidden, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-zero biases so that every parameter's gradient is exercised
        imp.b_in.normal_()
        imp.b_out.normal_()
    return imp


def _grads(out, imp, h, g):
    return torch.autograd.grad(out, [h, *imp.parameters()], g)


def test_importance_kernel_equals_the_plain_graph_with_leading_dims_and_reused_buffers():
    imp = _importance()
    for step in range(3):  # the work buffers are reused from call to call
        h = torch.randn(4, 9, 6).mul(3.0).requires_grad_(True)  # [batch, pos, C], wide range of GELU inputs
        g = torch.randn(4, 9, 6)
        fast = imp(h)
        slow = imp.reference(h.reshape(-1, 6)).reshape(4, 9, 6)
        assert torch.allclose(fast, slow, atol=1e-5), step
        for a, b in zip(_grads(fast, imp, h, g), _grads(slow, imp, h, g)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), step


def test_two_importance_graphs_alive_at_once_keep_their_own_values():
    imp = _importance()
    h1, h2 = torch.randn(50, 6, requires_grad=True), torch.randn(50, 6, requires_grad=True)  # same shape: same buffers
    g1, g2 = torch.randn(50, 6), torch.randn(50, 6)
    z1, z2 = imp(h1), imp(h2)  # the second forward must not overwrite what the first saved
    fast1, fast2 = _grads(z1, imp, h1, g1), _grads(z2, imp, h2, g2)
    for fast, h, g in ((fast1, h1, g1), (fast2, h2, g2)):
        for a, b in zip(fast, _grads(imp.reference(h), imp, h, g)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_importance_without_gradients_equals_the_plain_graph():
    imp = _importance()
    h = torch.randn(33, 6)
    with torch.no_grad():
        assert torch.allclose(imp(h), imp.reference(h), atol=1e-5)
    frozen = _importance().requires_grad_(False)
    assert torch.allclose(frozen(h), frozen.reference(h), atol=1e-5)  # grad mode on, nothing to differentiate


@pytest.mark.parametrize("kind", ["continuous", "binomial"])
def test_fused_masks_equal_the_composed_sigmoids_and_masks(kind):
    # the kinks 0 and 1 (where the clamps pass gradient), both leaky sides, random values
    z = torch.cat([torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 1.5, 3.0]), torch.randn(200) * 2]).reshape(9, 23)
    z.requires_grad_(True)
    r = (torch.rand(z.shape) < 0.5).float() if kind == "binomial" else torch.rand(z.shape)
    gm, gu = torch.randn(z.shape), torch.randn(z.shape)
    m, up, lo = mask_and_penalised(z, r, 0.01)
    lo2, up2 = lower_leaky_hard_sigmoid(z, 0.01), upper_leaky_hard_sigmoid(z, 0.01)
    m2 = lo2 + (1.0 - lo2) * r
    assert torch.allclose(m, m2, atol=1e-7) and torch.allclose(up, up2, atol=1e-7)
    assert torch.allclose(lo, lo2, atol=1e-7) and not lo.requires_grad
    for outs, grads in (([m, up], [gm, gu]), ([m], [gm]), ([up], [gu])):  # either output alone too
        fast = torch.autograd.grad([o for o in outs], z, grads, retain_graph=True)[0]
        plain_outs = [m2 if o is m else up2 for o in outs]
        slow = torch.autograd.grad(plain_outs, z, grads, retain_graph=True)[0]
        assert torch.allclose(fast, slow, atol=1e-7)


def _plain_objective(dec, x, frac, gen):
    """SPD's losses composed from the plain pieces: autograd importance MLP, composed
    sigmoids and masks, one masked forward per loss (``SPDObjective``'s definition)."""
    cfg = dec.cfg
    target, acts = target_pass(dec.model, dec, x)
    z = {p: dec.importance[module_key(p)].reference(dec.comps(p).inner(acts[p])) for p in dec.paths}
    masks = {p: stochastic_mask(lower_leaky_hard_sigmoid(z[p], cfg.leak), cfg.mask, gen) for p in dec.paths}
    deltas = {p: delta_mask(z[p].shape[:-1], cfg.mask, gen, like=z[p]) for p in dec.paths}
    outs = sequential_masked_passes(dec.model, dec, x, masks, deltas)
    imp = importance_minimality({p: upper_leaky_hard_sigmoid(v, cfg.leak) for p, v in z.items()},
                                annealed_p(frac, cfg.p, cfg.p_final, cfg.p_anneal_start, cfg.p_anneal_end))
    stochastic, layerwise = mse(outs[0], target), mean_over_layers([mse(y, target) for y in outs[1:]])
    total = cfg.stochastic_coeff * stochastic + cfg.layerwise_coeff * layerwise + cfg.importance_coeff * imp
    return {"total": total, "stochastic": stochastic, "layerwise": layerwise, "importance": imp}


def test_a_whole_step_equals_the_plain_composition_on_tms_with_identity():
    torch.manual_seed(0)
    model = TMSInstance(5, 2, hidden_identity=True).requires_grad_(False)
    with torch.no_grad():
        model.decoder.weight.copy_(model.encoder.weight.T)
        model.decoder.bias.normal_()
    cfg = SPDConfig(sites=("encoder", "identity", "decoder"), tied=("decoder=encoder",), C=7, p=1.5,
                    importance_coeff=0.1)
    x0 = torch.rand(64, 5) * (torch.rand(64, 5) < 0.4)
    dec = Decomposition(model, cfg, example_inputs=x0)
    with torch.no_grad():  # importances on both sides of the kinks
        for imp in dec.importance.values():
            imp.b_out.normal_(0.0, 0.5)
    params = list(dec.parameters())
    for step in range(2):  # a second step reuses the kernel's buffers
        x = torch.rand(64, 5) * (torch.rand(64, 5) < 0.4)
        fast = SPDObjective(dec)(x, 0.3, torch.Generator().manual_seed(step))
        slow = _plain_objective(dec, x, 0.3, torch.Generator().manual_seed(step))
        for key in slow:
            assert torch.allclose(fast[key], slow[key], rtol=1e-5, atol=1e-7), (step, key)
        g_fast = torch.autograd.grad(fast["total"], params)
        g_slow = torch.autograd.grad(slow["total"], params)
        for (name, _), a, b in zip(dec.named_parameters(), g_fast, g_slow):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (step, name)


def test_the_fused_optimizer_takes_adamw_steps():
    torch.manual_seed(0)
    start = [torch.randn(20, 16), torch.randn(20), torch.randn(3, 5)]
    runs = []
    for fast in (True, False):
        params = [nn.Parameter(t.clone()) for t in start]
        opt = make_optimizer(params, 1e-2) if fast else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append(params)
    for a, b in zip(*runs):
        assert torch.allclose(a, b, atol=1e-6)
