"""``core.collect.activations``: rows of one site, run in chunks; a per-example positions tensor
follows the chunks; padding is kept or dropped."""

import torch

from mechscope.core.batch import collate
from mechscope.core.collect import activations
from mechscope.core.run import cache
from mechscope.core.site import Site
from mechscope.zoo.transformer import Transformer, TransformerConfig


def test_a_positions_tensor_is_split_with_the_chunks():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab=11, n_ctx=6, d_model=8, n_layers=1, n_heads=2, d_head=4, d_mlp=16))
    tokens = torch.randint(11, (10, 6))
    pos = torch.randint(6, (10, 1))  # one position per example
    site = Site("blocks.0", positions=pos)
    chunked = activations(model, tokens, site, batch_size=4)  # chunks of 4, 4 and 2 examples
    with torch.no_grad():
        whole = cache(model, tokens, [site])[site][:, 0]  # [10, d]: one run, the reference
        direct = cache(model, tokens, [Site("blocks.0")])[Site("blocks.0")][torch.arange(10), pos[:, 0]]
    assert chunked.shape == (10, 8)
    assert torch.allclose(chunked, whole, atol=1e-6) and torch.allclose(chunked, direct, atol=1e-6)


def test_padding_rows_are_kept_unless_dropped_and_an_iterable_runs_batch_by_batch():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab=11, n_ctx=6, d_model=8, n_layers=1, n_heads=2, d_head=4, d_mlp=16))
    batch = collate([[1, 2, 3], [4, 5], [6, 7, 8, 9]], side="right")  # 9 real tokens of 12
    site = Site("blocks.0")
    kept = activations(model, batch, site, batch_size=2)
    dropped = activations(model, batch, site, batch_size=2, drop_padding=True)
    assert kept.shape == (12, 8) and dropped.shape == (9, 8)
    assert torch.equal(dropped, kept[batch["attention_mask"].reshape(-1).bool()])
    assert torch.equal(activations(model, [batch, batch], site), torch.cat([kept, kept]))
