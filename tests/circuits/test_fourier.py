"""Fourier tools on signals whose frequencies are known, and on the shipped p = 53 model."""

import math

import pytest
import torch

from mechscope.circuits import fourier
from mechscope.tasks import grokking, modular

P = 13


def _cos(k, x):
    return torch.cos(2 * math.pi * k * x / P)


def test_basis_is_orthonormal():
    F = fourier.fourier_basis(P)
    assert torch.allclose(F @ F.T, torch.eye(P, dtype=F.dtype), atol=1e-10)
    with pytest.raises(ValueError, match="odd modulus"):
        fourier.fourier_basis(12)


def test_energy_and_keys_of_known_signals():
    x = torch.arange(P, dtype=torch.float64)
    W = torch.stack([_cos(2, x), torch.sin(2 * math.pi * 5 * x / P), 0.01 * _cos(4, x)], dim=1)  # [p, 3]
    energy = fourier.frequency_energy(W, P)
    assert fourier.key_frequencies(energy) == [2, 5]
    a, b = torch.meshgrid(x, x, indexing="ij")
    acts = torch.stack([_cos(3, a + b), _cos(6, a) * _cos(6, b) + 0.1 * _cos(1, a)], dim=-1)  # [p, p, 2]
    best, frac = fourier.neuron_frequencies(acts, P)
    assert best.tolist() == [3, 6] and frac[0].item() == pytest.approx(1.0) and frac[1].item() > 0.9
    c = x
    logits = _cos(4, a[..., None] + b[..., None] - c)  # [p, p, p]
    e = fourier.logit_frequency_energy(logits, P)
    assert int(e.argmax()) + 1 == 4 and e[3].item() == pytest.approx(1.0, abs=1e-9)


def test_restricted_and_excluded_split_the_logits():
    x = torch.arange(P, dtype=torch.float64)
    a, b = torch.meshgrid(x, x, indexing="ij")
    L = (_cos(2, a + b)[..., None] * torch.randn(P, dtype=torch.float64) + 0.1 * torch.randn(P, P, P, dtype=torch.float64)).reshape(P * P, P)
    r, e = fourier.restricted_logits(L, P, [2]), fourier.excluded_logits(L, P, [2])
    assert torch.allclose(r - r.mean(0) + e - e.mean(0), L - L.mean(0), atol=1e-9)


def test_gini():
    assert fourier.gini(torch.ones(10)) == pytest.approx(0.0)
    assert fourier.gini(torch.tensor([0.0, 0.0, 0.0, 1.0])) == pytest.approx(0.75)


def test_shipped_quick_model_has_an_agreeing_key_set():
    """The p = 53 checkpoint (``mechscope train grokking_quick``): generalised, 3-7 key
    frequencies found from the model agree in every view, restricted <= 2x test loss."""
    model = grokking.load(grokking.CHECKPOINT.with_name("grokking_p53.safetensors"))
    keys = modular.key_frequencies(model)
    assert 3 <= len(keys["agreed"]) <= 7 and keys["agreed"] == keys["union"]
    m = modular.progress_measures(model, keys["agreed"])
    assert m["test_acc"] >= 0.999
    assert m["restricted_loss"] <= 2 * m["test_loss"] and m["excluded_loss"] > 1.0
    assert 0.0 < m["gini_embed"] < 1.0 and m["total_squared_weights"] > 0
