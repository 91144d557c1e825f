"""The real suite's SAE row (issue 20, row 3): its pooled statistics and page attachment,
without the reference model (and without importing the row module, which registers checks)."""

import logging

import torch

from mechscope.bench.context import CheckContext
from mechscope.bench.real_sae_store import fvu_of, recovered_of
from mechscope.core.site import Site
from mechscope.sae.pages import collect, feature_sheet
from mechscope.zoo import build
from tests.sae.conftest import make_sae


def test_fvu_of_window_columns_equals_the_pooled_definition():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5]) + 2.0  # [w, pos, d]
    x_hat = x + 0.3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    cols = torch.cat([torch.stack([(x - x_hat).pow(2).sum((1, 2)), torch.full((5,), 7.0, dtype=torch.float64),
                                   x.pow(2).sum((1, 2))], 1), x.sum(1)], 1)  # [w, 3 + d]
    rows, rec = x.reshape(-1, 3), x_hat.reshape(-1, 3)
    direct = (rows - rec).pow(2).sum() / (rows - rows.mean(0)).pow(2).sum()
    assert torch.allclose(fvu_of(cols, 3), direct, rtol=1e-12)


def test_recovered_of_summed_losses():
    losses = torch.tensor([[2.0, 10.0, 3.0], [4.0, 12.0, 5.0]], dtype=torch.float64)  # clean, zero, spliced
    assert float(recovered_of(losses)) == (22.0 - 8.0) / (22.0 - 6.0)


def test_feature_sheet_leaves_masked_rows_out_without_changing_the_model_input(tmp_path):
    model = build("transformer", seed=0)
    sae = make_sae("topk", d_in=64, d_sae=128, k=8)
    batches = [torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def not_first(tokens):
        keep = torch.ones_like(tokens, dtype=torch.bool)
        keep[:, 0] = False
        return keep

    codes, _, mask = collect(model, sae, Site("blocks.1"), batches)
    masked, _, kept = collect(model, sae, Site("blocks.1"), batches, not_first)
    assert torch.equal(masked[:, 1:], codes[:, 1:]) and not masked[:, 0].any() and not kept[:, 0].any()
    page = feature_sheet(model, sae, Site("blocks.1"), batches, [3, 5], row_mask=not_first, token_str=lambda t: f"t{t}")
    assert page.count("<h1>latent ") == 2 and f"{int(kept.sum())} tokens" in page
    ctx = CheckContext(task="real_sae", method="topk", seed=0, full=False, device="cpu", out_dir=tmp_path,
                       log=logging.getLogger("t"))
    path = ctx.add_html(page, "feature_pages", "pages")
    assert path.read_text() == page and ctx.figures[-1]["path"] == "figures/real_sae__topk__feature_pages.html"
