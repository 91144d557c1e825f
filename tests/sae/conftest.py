"""Shared helpers for the SAE tests: small dictionaries with known weights."""

import pytest
import torch

from mechscope.sae.arch import SAE, SAEConfig


def make_sae(arch: str = "topk", kind: str = "sae", d_in: int = 8, d_sae: int = 32, d_out: int | None = None,
             k: int = 4, seed: int = 0, **kw) -> SAE:
    """A dictionary with random, non-trivial weights (biases and thresholds too)."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, arch=arch, kind=kind, d_out=d_out, k=k, **kw), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name != "threshold":
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        if arch == "jumprelu":
            sae.threshold.copy_(0.2 * torch.rand(d_sae, generator=gen))
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.15)
    return sae.eval()


@pytest.fixture
def sae_factory():
    return make_sae
