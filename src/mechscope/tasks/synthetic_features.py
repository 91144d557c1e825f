"""Synthetic activations with known features: sparse combinations of known directions.

The ground truth of a sparse dictionary, after Sharkey et al. ("Taking features out of
superposition", code ``HoagyC/sparse_coding`` ``ToyArgs``) as the reference run of the
SAE spec (§6) uses it:

- ``n_features`` ground-truth directions in ``R^d``, Gaussian then normalised (with
  n > d they are in superposition: not orthogonal);
- feature ``i`` is active independently with probability ``p_i ∝ decay^i``, rescaled so
  that ``Σ p_i = expected_l0`` (on average that many features per vector);
- an active feature has magnitude ``U[0, 1]``;
- ``x = Σ_i a_i F_i``.

Defaults are the reference setting: d = 256, 512 features, decay 0.99, L0 = 5. The
directions are a function of ``seed`` alone, so a dictionary trained elsewhere can be
scored against them; the data stream has its own seed.

Both generators are seeded through a hash of the seed and a tag, never with the plain
seed: a dictionary initialised by ``torch.randn`` under ``manual_seed(s)`` would
otherwise start with its decoder rows equal to the true directions of the world with
seed ``s`` (Gaussian, then normalised, exactly as here), and score MMCS = 1 before
training.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch
from torch import Tensor

from mechscope.core.config import Config, ConfigError, config, param


@config
class SyntheticConfig(Config):
    """A ground-truth world of sparse features (defaults: the SAE spec's reference run)."""

    d: int = param(256, help="dimension of the activations")
    n_features: int = param(512, help="number of ground-truth feature directions")
    expected_l0: float = param(5.0, help="mean number of active features per vector (Σ p_i)")
    decay: float = param(0.99, help="feature i fires with probability proportional to decay^i")
    seed: int = param(0, help="seed of the feature directions")

    def validate(self) -> None:
        if self.d < 1 or self.n_features < 1:
            raise ConfigError(f"SyntheticConfig needs d >= 1 and n_features >= 1, got {self.d} and {self.n_features}")
        if not 0 < self.decay <= 1:
            raise ConfigError(f"SyntheticConfig.decay must be in (0, 1], got {self.decay}")
        if not 0 < self.expected_l0 <= self.n_features:
            raise ConfigError(f"SyntheticConfig.expected_l0 must be in (0, n_features={self.n_features}], "
                              f"got {self.expected_l0}")
        p = self.probabilities()
        if float(p.max()) > 1:
            raise ConfigError(f"SyntheticConfig: expected_l0={self.expected_l0} with decay={self.decay} gives "
                              f"feature 0 a firing probability {float(p.max()):.3g} > 1; lower expected_l0 "
                              "or raise decay towards 1")

    def probabilities(self) -> Tensor:  # [n_features]
        w = self.decay ** torch.arange(self.n_features, dtype=torch.float64)
        return (w / w.sum() * self.expected_l0).float()


def derived_seed(tag: str, seed: int) -> int:
    """A 63-bit seed from ``tag`` and ``seed``, unrelated to the stream of ``manual_seed(seed)``."""
    digest = hashlib.sha256(f"mechscope.synthetic_features.{tag}:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


class SyntheticFeatures:
    """The world of a :class:`SyntheticConfig`: its directions and a sampler."""

    def __init__(self, cfg: SyntheticConfig | None = None) -> None:
        self.cfg = cfg or SyntheticConfig()
        gen = torch.Generator().manual_seed(derived_seed("directions", self.cfg.seed))
        f = torch.randn(self.cfg.n_features, self.cfg.d, generator=gen)
        self.features = f / f.norm(dim=1, keepdim=True)  # [n_features, d], unit rows
        self.p = self.cfg.probabilities()  # [n_features]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(x [n, d], codes [n, n_features])``: activations and their true coefficients."""
        if n < 1:
            raise ValueError(f"sample needs n >= 1 vectors, got {n}")
        active = torch.rand(n, self.cfg.n_features, generator=generator) < self.p  # [n, n_features]
        codes = active * torch.rand(n, self.cfg.n_features, generator=generator)  # magnitudes U[0, 1]
        return codes @ self.features, codes

    def batches(self, batch_size: int, seed: int = 1, n_batches: int | None = None) -> Iterator[Tensor]:
        """A reproducible stream of batches ``[batch_size, d]`` (endless unless ``n_batches``)."""
        gen = torch.Generator().manual_seed(derived_seed("data", seed))
        i = 0
        while n_batches is None or i < n_batches:
            yield self.sample(batch_size, gen)[0]
            i += 1
