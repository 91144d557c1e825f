"""Dictionary architectures: configs that reject bad values, inference forms, and the
output-preserving transformations (scale folding, decoder-norm folding, BatchTopK -> JumpReLU)."""

import pytest
import torch

from mechscope.core.config import ConfigError
from mechscope.sae.arch import SAE, SAEConfig, SAEError, fold_decoder_norm, fold_scale, to_jumprelu
from tests.sae.conftest import make_sae

ALL = [(a, k) for a in ("relu", "topk", "batchtopk", "jumprelu", "matryoshka") for k in ("sae", "transcoder", "skip_transcoder")]


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="k=40 exceeds d_sae=32"):
        SAEConfig(d_in=8, d_sae=32, k=40)
    with pytest.raises(ConfigError, match="d_sae must be >= 1"):
        SAEConfig(d_in=8, d_sae=0)
    with pytest.raises(ConfigError, match="use kind='transcoder'"):
        SAEConfig(d_in=8, d_sae=32, d_out=4)
    with pytest.raises(ConfigError, match="only used by arch='matryoshka'"):
        SAEConfig(d_in=8, d_sae=32, matryoshka_widths=(4, 8))
    with pytest.raises(ConfigError, match="increase strictly"):
        SAEConfig(d_in=8, d_sae=32, arch="matryoshka", matryoshka_widths=(8, 4))
    with pytest.raises(ConfigError, match="has no field 'widht'"):
        SAEConfig.from_dict({"d_in": 8, "d_sae": 32, "widht": 3})
    with pytest.raises(TypeError, match="needs an SAEConfig"):
        SAE({"d_in": 8})


def test_matryoshka_default_widths_nest_up_to_d_sae():
    assert SAEConfig(d_in=8, d_sae=64, arch="matryoshka").widths() == [4, 8, 16, 32, 64]
    assert SAEConfig(d_in=8, d_sae=64, arch="matryoshka", matryoshka_widths=(10, 20)).widths() == [10, 20, 64]


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_inference_forms(arch):
    sae = make_sae(arch)
    x = torch.randn(5, 3, 8)  # leading dims are kept
    h = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = sae.encode(x)
    assert f.shape == (5, 3, 32)
    if arch == "relu":
        expected = h.relu()
    elif arch == "topk":
        kth = h.topk(4, dim=-1).values[..., -1:]
        expected = torch.where(h >= kth, h, torch.zeros_like(h)).relu()
        assert int((f != 0).sum(-1).max()) <= 4
    else:
        expected = h.relu() * (h > sae.threshold.float())
    assert torch.allclose(f, expected, atol=1e-6)
    assert torch.allclose(sae(x), f @ sae.W_dec + sae.b_dec, atol=1e-5)


def test_skip_transcoder_adds_the_skip_term():
    sae = make_sae("relu", "skip_transcoder", d_out=6)
    x = torch.randn(4, 8)
    f = sae.encode(x)
    assert torch.allclose(sae(x), f @ sae.W_dec + sae.b_dec + x @ sae.W_skip.T, atol=1e-5)
    with pytest.raises(SAEError, match="needs its input x"):
        sae.decode(f)


def test_wrong_width_is_a_clear_error():
    sae = make_sae("topk")
    with pytest.raises(SAEError, match=r"expects a input of shape \[\.\.\., 8\], got \[4, 9\]"):
        sae.encode(torch.randn(4, 9))


@pytest.mark.parametrize("arch,kind", ALL)
def test_fold_scale_preserves_outputs(arch, kind):
    sae = make_sae(arch, kind, d_out=None if kind == "sae" else 6)
    x = torch.randn(64, 8)
    s_in, s_out = 3.7, (3.7 if kind == "sae" else 0.45)
    folded = fold_scale(sae, s_in, None if kind == "sae" else s_out)
    with torch.no_grad():
        want = sae(x * s_in) / s_out
        assert torch.allclose(folded(x), want, rtol=1e-4, atol=1e-5)
        # latents (and so thresholds) are unchanged: no θ rescaling needed (SAELens #763)
        assert torch.allclose(folded.encode(x), sae.encode(x * s_in), rtol=1e-4, atol=1e-5)
    if arch in ("jumprelu", "batchtopk", "matryoshka"):
        assert torch.equal(folded.threshold, sae.threshold)
    with pytest.raises(SAEError, match="finite and positive"):
        fold_scale(sae, 0.0)


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_fold_decoder_norm_preserves_outputs_and_scales_theta(arch):
    sae = make_sae(arch)
    norms = sae.W_dec.norm(dim=1)
    folded = fold_decoder_norm(sae)
    x = torch.randn(64, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), sae(x), rtol=1e-4, atol=1e-5)
    assert torch.allclose(folded.W_dec.norm(dim=1), torch.ones(32), atol=1e-5)
    if arch == "jumprelu":
        assert torch.allclose(folded.threshold, sae.threshold * norms, rtol=1e-5)


def test_fold_decoder_norm_refuses_topk_with_unequal_norms():
    with pytest.raises(SAEError, match="changes which latents are selected"):
        fold_decoder_norm(make_sae("topk"))
    with pytest.raises(SAEError, match="to_jumprelu"):
        fold_decoder_norm(make_sae("batchtopk"))


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_saves_as_jumprelu_with_one_threshold(arch):
    sae = make_sae(arch)
    jr = to_jumprelu(sae)
    assert jr.cfg.arch == "jumprelu" and jr.threshold.dtype == torch.float32
    assert torch.all(jr.threshold == float(sae.threshold))
    x = torch.randn(100, 8)
    with torch.no_grad():
        assert torch.allclose(jr(x), sae(x), atol=1e-6)
    assert to_jumprelu(make_sae("topk")).cfg.arch == "topk"


def test_initialisation_follows_the_recipes():
    topk = SAE(SAEConfig(d_in=16, d_sae=64, arch="topk"), seed=0)
    assert torch.allclose(topk.W_dec.norm(dim=1), torch.ones(64))
    assert torch.equal(topk.W_enc, topk.W_dec.T)  # tied start
    relu = SAE(SAEConfig(d_in=16, d_sae=64, arch="relu"), seed=0)
    assert torch.allclose(relu.W_dec.norm(dim=1), torch.full((64,), 0.1))
    tc = SAE(SAEConfig(d_in=16, d_sae=64, kind="skip_transcoder", d_out=8), seed=0)
    assert tc.W_dec.abs().sum() == 0 and tc.W_skip.abs().sum() == 0  # sparsify: predict the bias first
    jr = SAE(SAEConfig(d_in=16, d_sae=64, arch="jumprelu"), seed=0)
    assert jr.threshold.dtype == torch.float32 and torch.all(jr.threshold == 0.001)
    assert torch.equal(SAE(SAEConfig(d_in=16, d_sae=64), seed=3).W_dec, SAE(SAEConfig(d_in=16, d_sae=64), seed=3).W_dec)
