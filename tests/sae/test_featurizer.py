"""An SAE as a featurizer: exact round trip, and interchange of SAE features moves the
activation by exactly those latents' decoder contributions."""

import pytest
import torch

from mechscope.core.featurize import FeaturizerError
from mechscope.core.intervene import FeatureInterchange
from mechscope.core.run import cache, run
from mechscope.core.site import Site
from mechscope.sae.featurizer import SAEFeaturizer
from mechscope.zoo import build
from tests.sae.conftest import make_sae


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_round_trip_is_exact(arch):
    feat = SAEFeaturizer(make_sae(arch, d_in=64, d_sae=256, k=8))
    x = torch.randn(4, 7, 64)
    f, err = feat.encode(x)
    assert f.shape == (4, 7, 256) and err.shape == x.shape
    assert torch.allclose(feat.decode(f, err), x, atol=1e-5)
    assert feat.d == 64 and feat.n_features == 256


def test_interchange_of_sae_features_in_a_model():
    model = build("transformer", seed=0)
    site = Site("blocks.0", positions=-1)
    feat = SAEFeaturizer(make_sae("topk", d_in=64, d_sae=256, k=16))
    base, source = torch.randint(0, 64, (6, 10)), torch.randint(0, 64, (6, 10))
    with torch.no_grad():
        xb, xs = cache(model, base, [site])[site], cache(model, source, [site])[site]  # [6, 1, 64]
        chosen = [3, 17, 200]
        swap = FeatureInterchange(feat, xs, chosen)
        _, acts = run(model, base, {site: swap}, cache=[site])
        fb, fs = feat.sae.encode(xb), feat.sae.encode(xs)
        delta = (fs[..., chosen] - fb[..., chosen]) @ feat.sae.W_dec[chosen]
        assert torch.allclose(acts[site], xb + delta, atol=1e-5)
        # swapping no features leaves the run exactly as it was
        out_none, _ = run(model, base, {site: FeatureInterchange(feat, xs, [])})
        assert torch.allclose(out_none, model(base), atol=1e-5)


def test_transcoders_cannot_be_featurizers():
    with pytest.raises(FeaturizerError, match="use an autoencoder"):
        SAEFeaturizer(make_sae("relu", "transcoder", d_out=4))
    with pytest.raises(FeaturizerError, match="expects activations of width 8"):
        SAEFeaturizer(make_sae("relu"))(torch.randn(2, 9))
