"""Training data: a live model stopped after the deepest site (several sites per forward),
the mixing buffer, the activation store, and several dictionaries on one stream."""

import pytest
import torch

from mechscope.core.batch import collate
from mechscope.core.site import Site
from mechscope.core.store import write_store
from mechscope.sae.arch import SAEConfig, SAEError
from mechscope.sae.data import DictionarySpec, live_activations, store_batches, train_many
from mechscope.sae.train import TrainConfig, train
from mechscope.zoo import build


def _inputs(n_batches, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (8, 16), generator=gen) for _ in range(n_batches)]


def test_live_activations_stop_after_the_deepest_site_and_stay_aligned():
    model = build("transformer", seed=0)
    calls = []
    model.blocks[1].register_forward_hook(lambda *a: calls.append("block1"))
    model.unembed.register_forward_hook(lambda *a: calls.append("unembed"))
    sites = [Site("blocks.0"), Site("blocks.1.mlp", io="input"), Site("blocks.1.mlp")]
    batches = list(live_activations(model, _inputs(6), sites, batch_size=64, buffer_rows=256))
    assert "unembed" not in calls and "block1" not in calls  # stopped inside block 1, after its MLP
    assert len(batches) == 6 * 8 * 16 // 64 and all(b[s].shape == (64, 64) for b in batches for s in sites)
    # rows are aligned: the MLP output row is the MLP applied to the MLP input row
    b = batches[3]
    with torch.no_grad():
        assert torch.allclose(model.blocks[1].mlp(b[sites[1]]), b[sites[2]], atol=1e-5)


def test_the_buffer_mixes_input_batches():
    tag = torch.nn.Sequential(torch.nn.Identity())  # rows are their input batch's index
    inputs = [torch.full((32, 1), float(i)) for i in range(8)]
    batches = [b[Site("0")] for b in live_activations(tag, inputs, [Site("0")], batch_size=16, buffer_rows=64)]
    assert len(batches) == 16
    assert sum(len(set(b.flatten().tolist())) > 1 for b in batches) >= 12
    assert sorted(torch.cat(batches).flatten().tolist()) == sorted(torch.cat(inputs).flatten().tolist())


def test_live_activations_drop_padding():
    model = build("transformer", seed=0)
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8], [9]] * 4
    rows = list(live_activations(model, [collate(seqs)], [Site("blocks.0")], batch_size=9, buffer_rows=10 ** 6))
    assert sum(r[Site("blocks.0")].shape[0] for r in rows) == 36  # 4 * 9 real tokens, no padding


def test_several_dictionaries_from_one_forward_per_step():
    model = build("transformer", seed=0)
    forwards = []
    model.embed.register_forward_hook(lambda *a: forwards.append(1))
    mlp_in, mlp_out, resid = Site("blocks.1.mlp", io="input"), Site("blocks.1.mlp"), Site("blocks.0")
    specs = {"resid": DictionarySpec(SAEConfig(d_in=64, d_sae=128, k=8), resid),
             "mlp_transcoder": DictionarySpec(SAEConfig(d_in=64, d_sae=128, k=8, kind="transcoder"), mlp_in, mlp_out)}
    stream = live_activations(model, _inputs(40), [resid, mlp_in, mlp_out], batch_size=128, buffer_rows=512)
    results = train_many(specs, TrainConfig(steps=20, batch_size=128, log_every=10), stream)
    assert set(results) == {"resid", "mlp_transcoder"}
    assert all(r.trainer.step_count == 20 and len(r.history) == 2 for r in results.values())
    assert len(forwards) <= 40  # one forward per input batch feeds both dictionaries
    with pytest.raises(SAEError, match="reads \\['blocks.2:output'\\]"):
        train_many({"x": DictionarySpec(SAEConfig(d_in=64, d_sae=128), Site("blocks.2"))}, TrainConfig(steps=1),
                   iter([{resid: torch.randn(4, 64)}]))


def test_training_from_an_activation_store(tmp_path):
    model = build("transformer", seed=0)
    site = Site("blocks.0")
    store = write_store(model, site, _inputs(4), tmp_path / "store", shard_rows=128)
    stream = (b for b in store_batches(store, site, batch_size=100, epochs=3))
    res = train(SAEConfig(d_in=64, d_sae=128, k=8), TrainConfig(steps=15, batch_size=100, progress=False),
                (b for b in stream))
    assert res.trainer.tokens == 1500
    with pytest.raises(SAEError, match="fewer than one batch"):
        next(store_batches(store, site, batch_size=10 ** 6))
