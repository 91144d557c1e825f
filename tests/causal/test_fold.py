"""The folded interchange (causal/fold.py): DAS's hard interchange on an MLP's hidden layer,
folded into the linear layer after it, gives the general path's logits and training, is
checked once, and steps aside wherever it does not apply."""

import logging

import pytest
import torch

from mechscope.causal import fold
from mechscope.causal.counterfactual import CounterfactualData
from mechscope.causal.das import FitConfig, SubspaceAlignment, fit, frozen, step_loss
from mechscope.causal.engine import TailEngine
from mechscope.core.site import Site
from mechscope.zoo import build

N = 96


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(N, 16, generator=gen)
    sources = {"A": torch.randn(N, 16, generator=gen), "B": torch.randn(N, 16, generator=gen)}
    labels = torch.randint(0, 2, (N,), generator=gen)
    return CounterfactualData(("A", "B"), base, sources, labels, labels.clone(), {v: labels.clone() for v in sources},
                              {v: torch.ones(N, dtype=torch.bool) for v in sources})


def _setup(site="acts.0", dims=None, **kw):
    model = build("mlp", seed=0)
    data = _data()
    places = {v: Site(site) for v in data.variables}
    with frozen(model):
        engine = TailEngine(model, data, places)
    width = int(engine.state.anchor.shape[-1])
    trainable = SubspaceAlignment(places, dims or {"A": 3, "B": 5}, {Site(site): width}, seed=1, **kw)
    return model, data, engine, trainable


def _both(engine, trainable, idx):
    with frozen(engine.model), torch.no_grad():
        general = engine.logits(idx, trainable.mix, trainable.mix_site)
        folded = engine.logits(idx, trainable.mix, trainable.mix_site, trainable.interchange_bases)
    return general, folded


@pytest.mark.parametrize("kw", [{}, {"kind": "rotation"}, {"orthogonality": "parametrization"}])
def test_the_folded_interchange_gives_the_general_logits(kw):
    model, data, engine, trainable = _setup(**kw)
    idx = torch.randperm(N)[:40]
    general, folded = _both(engine, trainable, idx)
    assert engine._fold is not None and engine._fold.fold and engine._fold.checked
    assert torch.allclose(folded, general, atol=1e-5), (folded - general).abs().max()


def test_one_variable_and_a_site_before_a_relu_which_is_mixed_then_run():
    """One variable alone folds too; at a linear layer's output (a ReLU next) the table holds the
    activation itself and the mix is one product before the tail."""
    model, data, engine, trainable = _setup(site="layers.1")
    idx = torch.arange(N)
    general, folded = _both(engine, trainable, idx)
    assert engine._fold is not None and not engine._fold.fold
    assert torch.allclose(folded, general, atol=1e-5)
    places = {"A": Site("acts.0")}
    one = SubspaceAlignment(places, {"A": 4}, {Site("acts.0"): 16}, seed=2)
    with frozen(model), torch.no_grad():
        engine = TailEngine(model, data, places)
        got = engine.logits(idx, one.mix, one.mix_site, one.interchange_bases)
        want = engine.logits(idx, one.mix, one.mix_site)
    assert engine._fold is not None and engine._fold.fold and engine._fold.variables == ["A"]
    assert torch.allclose(got, want, atol=1e-5)


def test_training_on_the_folded_path_ends_where_the_general_path_does():
    model, data, engine, trainable = _setup()
    _, _, general_engine, general = _setup()
    general.interchange_bases = lambda variables: None  # the general path, every step
    cfg = FitConfig(epochs=3, batch_size=32)
    fit(model, data, trainable, cfg=cfg, engine=engine)
    fit(model, data, general, cfg=cfg, engine=general_engine)
    assert engine._fold is not None and general_engine._fold is False  # never asked
    gap = (trainable.featurizers[0].basis() - general.featurizers[0].basis()).abs().max()
    assert gap < 1e-4, gap
    with frozen(model):
        loss = step_loss(engine, trainable, torch.arange(N), data.labels)
    assert loss.requires_grad


def test_a_hooked_layer_is_not_folded_and_its_hook_runs():
    model, data, engine, trainable = _setup()
    handle = model.layers[1].register_forward_hook(lambda m, a, out: out * 2)
    try:
        idx = torch.arange(N)
        general, folded = _both(engine, trainable, idx)
    finally:
        handle.remove()
    assert engine._fold is not None and not engine._fold.fold  # the hooked layer runs as a module
    assert torch.allclose(folded, general, atol=1e-5)


def test_a_folded_path_that_disagrees_is_dropped_with_the_reason(monkeypatch, caplog):
    model, data, engine, trainable = _setup()
    monkeypatch.setattr(fold.Folded, "logits", lambda self, idx, bases: torch.zeros(len(idx), 2))
    idx = torch.arange(N)
    with caplog.at_level(logging.WARNING, logger="mechscope.causal"):
        general, folded = _both(engine, trainable, idx)
    assert engine._fold is None and "differs from the general path" in caplog.text
    assert torch.equal(folded, general)


def test_where_it_does_not_apply_the_general_path_runs(monkeypatch):
    model = build("mlp", seed=0)
    data = _data()
    places = {"A": Site("acts.0"), "B": Site("acts.0", features=list(range(8)))}  # two sites at one module
    with frozen(model):
        engine = TailEngine(model, data, places)
    trainable = SubspaceAlignment(places, {"A": 2, "B": 2}, {Site("acts.0"): 16, places["B"]: 8}, seed=0)
    idx = torch.arange(N)
    with frozen(model), torch.no_grad():
        engine.logits(idx, trainable.mix, trainable.mix_site, trainable.interchange_bases)
    assert engine._fold is None
    model, data, engine, trainable = _setup()
    assert fold.foldable(engine.state, Site("acts.0", features=[0, 1]), None, 2) == "the site is not a whole [n, d] activation"
    assert fold.foldable(engine.state, Site("acts.0"), None, 2) is None
    monkeypatch.setattr(fold, "MAX_TABLE", 10)
    assert "more than 10" in fold.foldable(engine.state, Site("acts.0"), None, 2)


def test_a_readout_applies_after_the_folded_tail():
    model, data = build("mlp", seed=0), _data()
    places = {v: Site("acts.0") for v in data.variables}
    with frozen(model):
        engine = TailEngine(model, data, places, readout=lambda logits: logits.flip(-1)[:, :1] * 3)
    trainable = SubspaceAlignment(places, {"A": 3, "B": 5}, {Site("acts.0"): 16}, seed=1)
    general, folded = _both(engine, trainable, torch.arange(N))
    assert engine._fold is not None and engine._fold.checked and folded.shape == (N, 1)
    assert torch.allclose(folded, general, atol=1e-5)
