"""Metric definitions on hand-computed cases: L0, FVU about the mean in fp64, density,
dead/dense, shrinkage, MMCS, Hungarian-matched MCC, density histogram."""

import math

import pytest
import torch

from mechscope.sae.arch import SAE, SAEConfig, SAEError
from mechscope.sae.evals import (ReconstructionStats, cosine_matrix, density_histogram, evaluate, l0,
                                 matched_correlation, mmcs, recovered_fraction)


def test_l0_counts_nonzeros_including_negative():
    f = torch.tensor([[0.0, 1.0, -2.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    assert l0(f) == 1.5
    assert l0(f.reshape(1, 2, 4)) == 1.5


def test_fvu_is_about_the_mean_over_all_tokens():
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    y_hat = torch.tensor([[1.5, 2.0], [3.0, 3.0], [5.0, 9.0]])
    f = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    stats = ReconstructionStats(3, 2)
    stats.add(y[:2], y_hat[:2], f[:2])  # two batches: the mean is over all tokens, not per batch
    stats.add(y[2:], y_hat[2:], f[2:])
    r = stats.result()
    sse = 0.25 + 1.0
    var = float(((y - y.mean(0)) ** 2).sum())  # 8 + 26 = 34
    assert r["fvu"] == pytest.approx(sse / var)
    assert r["explained_variance"] == pytest.approx(1 - sse / var)
    assert r["mse"] == pytest.approx(sse / 3)
    assert r["l0"] == pytest.approx(4 / 3)
    assert r["density"].tolist() == pytest.approx([2 / 3, 2 / 3, 0.0])
    assert r["dead_fraction"] == pytest.approx(1 / 3) and r["dense_10pct"] == pytest.approx(2 / 3)
    assert r["dead_window_tokens"] == r["n_tokens"]  # the window "dead" is judged over, stated
    assert r["shrinkage"] == pytest.approx(float((y_hat ** 2).sum() / (y * y_hat).sum()))


def test_fvu_accumulates_in_fp64():
    # a large common offset: in fp32 Σ‖y‖² − N‖ȳ‖² would cancel catastrophically
    y = 1e4 + torch.randn(4096, 8, generator=torch.Generator().manual_seed(0))
    stats = ReconstructionStats(1, 8)
    stats.add(y, y.mean(0).expand_as(y), torch.zeros(4096, 1))
    assert stats.result()["fvu"] == pytest.approx(1.0, abs=1e-3)


def test_evaluate_an_exact_dictionary():
    # d_sae = 2d with W_enc = [I, -I]: ReLU keeps both signs, so the reconstruction is exact
    sae = SAE(SAEConfig(d_in=4, d_sae=8, arch="relu"))
    with torch.no_grad():
        eye = torch.eye(4)
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_(), sae.b_dec.zero_()
    data = [torch.randn(50, 4) for _ in range(3)]
    r = evaluate(sae.eval(), data)
    assert r["fvu"] == pytest.approx(0.0, abs=1e-10) and r["n_tokens"] == 150
    assert r["l0"] == pytest.approx(4.0) and r["shrinkage"] == pytest.approx(1.0)
    with pytest.raises(SAEError, match="no tokens were evaluated"):
        evaluate(sae, [])
    with pytest.raises(SAEError, match="tensors \\[batch, d_in\\] or \\(x, y\\) pairs"):
        evaluate(sae, [{"x": data[0]}])


def test_mmcs_and_matched_correlation_against_ground_truth():
    truth = torch.eye(3)
    perm = torch.tensor([[0.0, 1, 0], [0, 0, -1], [1, 0, 0], [0, 1, 0]])  # a permutation (one sign flip) + duplicate
    assert mmcs(truth, perm) == pytest.approx(2 / 3)  # feature 1 only appears with a negative sign
    assert matched_correlation(truth, perm) == pytest.approx(1.0)  # |cos|, one-to-one
    # both features' best match is latent 0 (a mixture): MMCS counts it twice, the matching once
    mix = torch.tensor([[1.0, 1.0, 0], [0, 0, 1.0]])
    assert cosine_matrix(truth[:2], mix)[0, 0] == pytest.approx(2 ** -0.5)
    assert mmcs(truth[:2], mix) == pytest.approx(2 ** -0.5)
    assert matched_correlation(truth[:2], mix) == pytest.approx(2 ** -0.5 / 2)
    assert recovered_fraction(truth, perm) == pytest.approx(2 / 3)
    with pytest.raises(SAEError, match="must share d"):
        mmcs(torch.eye(3), torch.eye(4))


def test_density_histogram_counts_dead_apart():
    density = torch.tensor([0.0, 0.0, 1e-3, 1e-3, 0.5, 1.0])
    h = density_histogram(density, bins=8)
    assert h["dead"] == 2 and sum(h["counts"]) == 4 and len(h["edges"]) == 9
    assert math.isclose(h["edges"][0], -8.0) and h["edges"][-1] == 0.0
