"""The README's SAE example on a tiny random Hugging Face GPT-2 (no downloads): live
activations with padding, training, evaluation, CE loss recovered and SAE features in an
interchange."""

import pytest
import torch

from mechscope import FeatureInterchange, Site, cache, collate, run
from mechscope.sae import SAEConfig, SAEFeaturizer, TrainConfig, ce_loss_recovered, evaluate, train
from mechscope.sae.data import live_activations

transformers = pytest.importorskip("transformers")


def test_readme_sae_example_on_a_tiny_gpt2():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50,
                                                                 n_positions=32)).eval()
    site = Site("transformer.h.0")
    gen = torch.Generator().manual_seed(0)

    def batches(n):
        return [collate([torch.randint(0, 50, (int(L),), generator=gen).tolist()
                         for L in torch.randint(4, 16, (8,), generator=gen)], side="left") for _ in range(n)]

    stream = live_activations(model, batches(60), [site], batch_size=256, buffer_rows=1024)
    res = train(SAEConfig(d_in=32, d_sae=128, arch="topk", k=8), TrainConfig(steps=10, batch_size=256, progress=False),
                (b[site] for b in stream))
    held_out = [b[site] for b in live_activations(model, batches(4), [site], batch_size=64, buffer_rows=10 ** 6)]
    metrics = evaluate(res.sae, held_out)
    assert metrics["l0"] <= 8 and 0 < metrics["fvu"] < 1
    ce = ce_loss_recovered(model, batches(2), site, res.sae)
    assert ce["ce_zero_ablation"] > ce["ce_clean"] and ce["n_positions"] > 0
    base, source = batches(1)[0], batches(1)[0]
    last = Site(site.path, positions="last")
    src = cache(model, source, [last])[last]
    out, _ = run(model, base, {last: FeatureInterchange(SAEFeaturizer(res.sae), src, features=[12, 40])})
    assert out.logits.shape == (8, base["input_ids"].shape[1], 50)
