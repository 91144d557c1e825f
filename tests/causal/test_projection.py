"""Several variables' interchanges at one basis as one product of stacked projectors."""

import torch

from mechscope.causal.projection import column_masks, mix_by_projectors


def _sequential(basis, columns, base, sources):
    out = base
    for cols, source in zip(columns, sources):
        b = basis[:, list(cols)]
        out = out + ((source - base) @ b) @ b.T
    return out


def test_projected_mix_equals_the_interchanges_and_has_their_gradients():
    torch.manual_seed(0)
    d, columns = 6, [(0, 1), (2, 3, 4)]  # k = 5 of 6 columns: the base keeps the sixth
    basis = torch.linalg.qr(torch.randn(d, d, dtype=torch.double))[0][:, :5].requires_grad_(True)
    masks = column_masks(5, columns, basis)
    base, s1, s2 = (torch.randn(7, d, dtype=torch.double, requires_grad=True) for _ in range(3))
    got = mix_by_projectors(basis, masks, base, [s1, s2])
    assert torch.allclose(got, _sequential(basis, columns, base, [s1, s2]), atol=1e-12)
    assert torch.autograd.gradcheck(lambda b, x, y, z: mix_by_projectors(b, masks, x, [y, z]), (basis, base, s1, s2))


def test_projected_mix_without_activation_gradients():
    torch.manual_seed(1)
    basis = torch.linalg.qr(torch.randn(4, 4))[0].requires_grad_(True)
    masks = column_masks(4, [(0, 1), (2, 3)], basis)
    base, s1, s2 = torch.randn(3, 5, 4).unbind(0)
    got = mix_by_projectors(basis, masks, base, [s1, s2])
    want = _sequential(basis, [(0, 1), (2, 3)], base, [s1, s2])
    assert torch.allclose(got, want, atol=1e-5)
    (g,) = torch.autograd.grad(got.square().sum(), basis)
    (w,) = torch.autograd.grad(want.square().sum(), basis)
    assert torch.allclose(g, w, atol=1e-4)
