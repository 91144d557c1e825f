"""Feature pages: top examples with context, histogram, promoted/suppressed tokens via the unembedding."""

import pytest
import torch

from mechscope.core.site import Site
from mechscope.sae.arch import SAEError
from mechscope.sae.pages import collect, feature_pages, logit_map
from mechscope.zoo import build
from tests.sae.conftest import make_sae


def test_pages_for_a_residual_stream_dictionary(tmp_path):
    model = build("transformer", seed=0)
    sae = make_sae("topk", d_in=64, d_sae=128, k=8)
    batches = [torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    codes, ids, mask = collect(model, sae, Site("blocks.1"), batches)
    assert codes.shape == (12, 12, 128) and ids.shape == (12, 12) and bool(mask.all())
    index = feature_pages(model, sae, Site("blocks.1"), batches, tmp_path, n_features=5, token_str=lambda t: f"t{t}")
    text = index.read_text()
    assert text.count('href="feature_') == 5 and "dead on these inputs" in text
    busiest = int((codes.reshape(-1, 128) != 0).sum(0).argmax())
    page = (tmp_path / f"feature_{busiest}.html").read_text()
    assert "<svg" in page and page.count('class="ex"') == 10 and "promotes" in page
    # the promoted tokens are the top of W_dec[i] @ W_U
    top = int((sae.W_dec[busiest] @ model.unembed.weight.T).argmax())
    assert f'class="tok pos">t{top}</span>' in page
    assert torch.equal(logit_map(model, sae), model.unembed.weight.T)


def test_pages_for_a_site_without_positions(tmp_path):
    mlp = build("mlp", seed=0)  # acts.0 is [batch, 16]: placed at the last token
    sae = make_sae("relu", d_in=16, d_sae=32)
    tokens = torch.randint(0, 16, (8, 3))

    class Last(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mlp = torch.nn.Embedding(16, 16), mlp

        def forward(self, ids):
            return self.mlp(self.emb(ids)[:, -1])

    index = feature_pages(Last(), sae, Site("mlp.acts.0"), [tokens], tmp_path, features=[0, 3])
    assert "no map to the logits" in (tmp_path / "feature_3.html").read_text() and index.exists()
    with pytest.raises(SAEError, match="outside the dictionary"):
        feature_pages(Last(), sae, Site("mlp.acts.0"), [tokens], tmp_path, features=[99])
    with pytest.raises(SAEError, match="need token inputs"):
        feature_pages(Last(), sae, Site("mlp.acts.0"), [torch.randn(2, 3)], tmp_path)
