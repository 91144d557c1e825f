"""The sparse TopK kernels give the gradients of the plain dense computation."""

import pytest
import torch

from mechscope.sae import kernels
from mechscope.sae.kernels import dense_code, sparse_decode, topk_encode
from tests.sae.conftest import make_sae


def _dense(x, b_pre, W_enc, b_enc, W_dec, b_dec, k, dead):
    xc = x - b_pre if b_pre is not None else x
    h = xc @ W_enc + b_enc
    v, i = h.topk(k, dim=-1)
    f = torch.zeros_like(h).scatter(1, i, v.relu())
    y = f @ W_dec + b_dec
    return y, (h[:, dead] if dead is not None else None)


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
@pytest.mark.parametrize("x_grad", [False, True])
@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("chunk", [1024, 16])
def test_sparse_gradients_equal_dense(kind, x_grad, with_dead, chunk, monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK", chunk)  # 16: three row chunks, the last one partial
    sae = make_sae("topk", kind, d_in=12, d_sae=48, d_out=None if kind == "sae" else 7, k=5).train()
    x = torch.randn(40, 12, dtype=torch.float64, requires_grad=x_grad)
    sae = sae.double()
    b_pre = sae.b_dec if kind == "sae" else None
    # dead latents that overlap the selected ones: their gradients must add up
    dead = torch.tensor([0, 3, 7, 11, 20, 21, 47]) if with_dead else None
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec] + ([x] if x_grad else [])
    w = torch.randn(40, sae.d_out, dtype=torch.float64)

    v, i, hd = topk_encode(x, b_pre, sae.W_enc, sae.b_enc, 5, dead)
    y = sparse_decode(v, i, sae.W_dec) + sae.b_dec
    loss = (y * w).sum() + (hd.pow(2).sum() if with_dead else 0)
    got = torch.autograd.grad(loss, params)

    y2, hd2 = _dense(x, b_pre, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, 5, dead)
    loss2 = (y2 * w).sum() + (hd2.pow(2).sum() if with_dead else 0)
    want = torch.autograd.grad(loss2, params)
    assert torch.allclose(y, y2, atol=1e-10)
    for g, e in zip(got, want):
        assert torch.allclose(g, e, atol=1e-9), (g - e).abs().max()


def test_dense_code_and_bad_input():
    sae = make_sae("topk", k=3)
    x = torch.randn(6, 8)
    v, i, _ = topk_encode(x, sae.b_dec, sae.W_enc, sae.b_enc, 3)
    assert torch.allclose(dense_code(v, i, 32), sae.encode(x), atol=1e-6)
    with pytest.raises(ValueError, match=r"rows \[batch, d_in\]"):
        topk_encode(x[None], sae.b_dec, sae.W_enc, sae.b_enc, 3)
