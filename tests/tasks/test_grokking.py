"""Modular addition: data, the last-query shortcut is exact, training makes progress, the
shipped checkpoints load, and bad configs are refused."""

import math

import pytest
import torch

from mechscope.core.config import ConfigError
from mechscope.core.run import cache
from mechscope.core.site import Site
from mechscope.tasks import grokking, modular


def test_data_and_split():
    tokens, labels = grokking.all_pairs(7)
    assert tokens.shape == (49, 3) and bool((tokens[:, 2] == 7).all())
    assert labels.tolist() == ((tokens[:, 0] + tokens[:, 1]) % 7).tolist()
    cfg = grokking.GrokkingConfig(p=7, train_fraction=0.3)
    tr, te = grokking.split(cfg)
    assert len(tr) == 15 and len(set(tr.tolist()) | set(te.tolist())) == 49 and not set(tr.tolist()) & set(te.tolist())


def test_last_query_shortcut_equals_full_causal_attention():
    """Computing attention and the MLP at the last position only is exact: compare with a
    full causal computation of every position written out here."""
    cfg = grokking.quick_config(d_model=16, n_heads=2, d_head=8, d_mlp=32)
    model = grokking.ModularAdditionTransformer(cfg)
    tokens = grokking.all_pairs(cfg.p)[0][:20]
    blk = model.blocks[0]
    x = model.embed(tokens) + model.pos_embed.weight  # [b, 3, d]
    split = lambda y: y.view(20, 3, 2, 8).transpose(1, 2)  # noqa: E731
    q, k, v = split(blk.attn.q(x)), split(blk.attn.k(x)), split(blk.attn.v(x))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(), float("-inf"))
    z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(20, 3, 16)
    h = x + blk.attn.o(z)
    h = h + blk.mlp(h)
    assert torch.allclose(model(tokens), model.unembed(h[:, -1]), atol=1e-5)
    acts = cache(model, tokens, [Site("blocks.0.mlp.act"), Site("blocks.0.attn.pattern")])
    assert acts[Site("blocks.0.mlp.act")].shape == (20, 32)
    assert acts[Site("blocks.0.attn.pattern")].shape == (20, 2, 1, 3)


def test_training_shortcut_is_the_model_with_its_gradients():
    """Training reads logits from per-token tables: same values and same gradients as the
    module forward, and rows that are not ``a b =`` are refused."""
    cfg = grokking.quick_config(d_model=16, n_heads=2, d_head=8, d_mlp=32)
    torch.manual_seed(0)
    model = grokking.ModularAdditionTransformer(cfg)
    tokens, labels = grokking.all_pairs(cfg.p)
    grads = []
    for forward in (model, lambda t: grokking.training_logits(model, t)):
        model.zero_grad()
        logits = forward(tokens)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref, ref_g), (fast, fast_g) = grads
    assert torch.allclose(fast, ref, atol=1e-5)
    for name in ref_g:
        assert torch.allclose(fast_g[name], ref_g[name], atol=1e-6), name
    with pytest.raises(ValueError, match="rows \\(a, b, =\\)"):
        grokking.training_logits(model, tokens[:, [0, 2, 1]])


def test_short_training_memorises_and_keeps_snapshots():
    cfg = grokking.quick_config(p=17, d_model=32, n_heads=2, d_head=16, d_mlp=64, steps=150, snapshot_every=50, lr=3e-3)
    model, hist = grokking.train_grokking(cfg)
    assert hist["train_loss"][-1] < 0.5 * hist["train_loss"][0]
    assert hist["step"] == [0, 50, 100, 150] and len(hist["snapshots"]) == 4
    assert hist["steps_per_second"] > 0
    assert grokking.evaluate(model)["train_acc"] > 0.9


def test_shipped_checkpoints_load_and_generalise():
    for name in ("grokking_p53.safetensors", "grokking_p113.safetensors"):
        path = grokking.CHECKPOINT.with_name(name)
        if not path.exists():
            pytest.skip(f"{name} is not shipped yet (mechscope train grokking writes it)")
        model = grokking.load(path)
        assert grokking.evaluate(model)["test_acc"] >= 0.999
        assert path.stat().st_size < 2_000_000


def test_bad_input():
    with pytest.raises(ConfigError, match="must be a prime"):
        grokking.GrokkingConfig(p=100)
    with pytest.raises(ConfigError, match=r"in \(0, 1\)"):
        grokking.GrokkingConfig(train_fraction=1.0)
    with pytest.raises(ConfigError, match="no field"):
        grokking.GrokkingConfig.from_dict({"prime": 7})
    model = grokking.ModularAdditionTransformer(grokking.quick_config(d_model=8, n_heads=1, d_head=8, d_mlp=8))
    with pytest.raises(ValueError, match=r"input_ids \[batch, 3\]"):
        model(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="residues 0..52"):
        model(torch.tensor([[60, 1, 53]]))


def test_initial_model_is_the_first_snapshot_and_restricted_accuracy():
    """The untrained baseline is the run's own initialisation (its step-0 snapshot); the
    restricted logits of the shipped p = 53 model alone answer the pairs, the untrained
    model's do not."""
    cfg = grokking.quick_config(p=17, d_model=16, n_heads=2, d_head=8, d_mlp=32, steps=1, snapshot_every=1)
    state = torch.random.get_rng_state()
    start = grokking.initial_model(cfg)
    assert torch.equal(torch.random.get_rng_state(), state)
    _, hist = grokking.train_grokking(cfg)
    for name, value in start.state_dict().items():
        assert torch.equal(value, hist["snapshots"][0][name]), name
    path = grokking.CHECKPOINT.with_name("grokking_p53.safetensors")
    if not path.exists():
        pytest.skip("grokking_p53 is not shipped")
    model = grokking.load(path)
    keys = modular.key_frequencies(model)["agreed"]
    assert modular.progress_measures(model, keys)["restricted_acc"] >= 0.99
    assert modular.progress_measures(grokking.initial_model(model.cfg), keys)["restricted_acc"] < 0.1
