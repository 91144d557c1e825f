"""A sparse autoencoder as a featurizer: latents as features, the error term added back.

``encode(x) = (f, err)`` with ``f`` the SAE's latents and ``err = x − x̂`` its
reconstruction error; ``decode(f, err) = f W_dec + b_dec + err``. The round trip is exact
(``decode(*encode(x)) == x`` up to rounding), so swapping some latents between a base and
a source (:class:`mechscope.core.intervene.FeatureInterchange`) changes the activation by
exactly those latents' decoder contributions and nothing else, which is what lets SAE
features be scored by the same interchange-intervention accuracy as neurons, PCA and DAS.
(SAELens calls this ``use_error_term=True``.)
"""

from __future__ import annotations

from torch import Tensor

from mechscope.core.featurize import Featurizer, FeaturizerError
from mechscope.sae.arch import SAE


class SAEFeaturizer(Featurizer):
    """Wrap a trained autoencoder (not a transcoder) as a :class:`Featurizer`."""

    def __init__(self, sae: SAE) -> None:
        super().__init__()
        if not isinstance(sae, SAE):
            raise FeaturizerError(f"SAEFeaturizer needs a mechscope.sae.SAE, got {type(sae).__name__}")
        if sae.cfg.kind != "sae":
            raise FeaturizerError(f"a {sae.cfg.kind} maps one site to another, so it cannot re-encode an "
                                  "activation in place; use an autoencoder (kind='sae') as a featurizer")
        self.sae = sae
        self.d = sae.d_in
        self.n_features = sae.d_sae

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:  # [..., d] -> [..., d_sae], [..., d]
        f = self.sae.encode(x)
        return f, x - self.sae.decode(f)

    def decode(self, f: Tensor, err: Tensor) -> Tensor:  # -> [..., d]
        return self.sae.decode(f) + err
