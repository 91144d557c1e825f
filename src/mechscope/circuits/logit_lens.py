"""The logit lens and direct logit attribution, on any model whose structure is found
(the zoo transformer, Hugging Face causal LMs).

- :func:`logit_lens`: each block's residual stream read out early, through the model's
  own final norm and unembedding modules (called as they are, nothing re-implemented).
- :func:`direct_logit_attribution`: the final residual stream at a position is the sum
  of the embedding and every block's attention and MLP outputs; each part's direct
  effect on a logit is its share through the final norm with the norm's scale frozen at
  the full stream's value (the usual convention). The parts sum exactly to the logit
  (less the norm's and unembedding's biases), which is checked.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mechscope.core import aliases
from mechscope.core.run import find_module, logits_of, run
from mechscope.core.site import Site
from mechscope.core.structure import ModelStructure, StructureError, structure


def _parts(s: ModelStructure) -> tuple[nn.Module, nn.Module]:
    if s.final_norm is None or s.unembed is None:
        raise StructureError(f"{s.model_class}: the logit lens needs the final norm and the unembedding; "
                             "pass them with structure(model, final_norm=..., unembed=...)")
    return s.final_norm, s.unembed


def _at(act: Tensor, position: int) -> Tensor:  # [batch, pos, d] -> [batch, d]
    return act[:, position]


def logit_lens(model: nn.Module, inputs: Any, position: int = -1, layers: Sequence[int] | None = None) -> Tensor:
    """Logits read from each block's output at ``position``: ``[n_layers, batch, vocab]``
    (the last layer's equals the model's logits)."""
    s = structure(model)
    norm_path, unembed_path = _parts(s)
    norm, unembed = find_module(model, norm_path), find_module(model, unembed_path)
    layers = list(range(s.n_layers)) if layers is None else list(layers)
    sites = [aliases.resid_post(s, layer) for layer in layers]
    with torch.no_grad():
        _, acts = run(model, inputs, cache=sites)
        out = [unembed(norm(_at(acts[site], position))) for site in sites]  # each [batch, vocab]
    return torch.stack([o if isinstance(o, Tensor) else o[0] for o in out])


def _norm_linear(norm: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, bool]:
    """For a LayerNorm / RMSNorm at ``x`` [batch, d]: the per-example frozen scale γ/σ
    [batch, d], the bias β [d] and whether it centres. Tells the two apart by behaviour."""
    d = x.shape[-1]
    probe = torch.randn(2, d, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    with torch.no_grad():
        centres = torch.allclose(norm(probe), norm(probe + 3.0), atol=1e-4)
        bias = norm(torch.zeros(1, d, dtype=x.dtype))[0]  # β for LayerNorm, 0 for RMSNorm
    eps = next((float(getattr(norm, n)) for n in ("eps", "variance_epsilon", "epsilon") if hasattr(norm, n)), None)
    weight = getattr(norm, "weight", None)
    if eps is None or weight is None:
        raise StructureError(f"direct logit attribution needs a LayerNorm- or RMSNorm-like final norm with a "
                             f"weight and an eps; {type(norm).__name__} has neither")
    xc = x - x.mean(-1, keepdim=True) if centres else x
    sigma = (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt()  # [batch, 1]
    return weight.detach() / sigma, bias.detach(), centres


def direct_logit_attribution(model: nn.Module, inputs: Any, tokens: Tensor, position: int = -1,
                             atol: float = 1e-3) -> dict[str, Any]:
    """Each component's direct contribution to the logit of ``tokens`` ``[batch]`` at ``position``.

    Returns ``{"labels": [...], "contributions": [n_parts, batch], "logits": [batch], "rest": [batch]}``
    with ``contributions.sum(0) + rest == logits`` (``rest``: the norm's bias through the
    unembedding, and its bias). Parts: the embedding (stream before block 0), then each
    block's attention and MLP output.
    """
    s = structure(model)
    norm_path, unembed_path = _parts(s)
    norm, unembed = find_module(model, norm_path), find_module(model, unembed_path)
    parts: list[tuple[str, Site]] = [("embed", aliases.resid_pre(s, 0))]
    for layer in range(s.n_layers):
        parts.append((f"attn_out.{layer}", aliases.attn_out(s, layer)))
        if s.block(layer).mlp is not None:
            parts.append((f"mlp_out.{layer}", aliases.mlp_out(s, layer)))
    final = aliases.resid_post(s, s.n_layers - 1)
    with torch.no_grad():
        out, acts = run(model, inputs, cache=[site for _, site in parts] + [final])
        logits = logits_of(out)[:, position]  # [batch, vocab]
        x = _at(acts[final], position)  # [batch, d]
        scale, beta, centres = _norm_linear(norm, x)
        w_u = unembed.weight.detach()  # [vocab, d]
        direction = w_u[tokens] * scale  # [batch, d]: d logit / d (centred) component, scale frozen
        contribs = []
        for _, site in parts:
            c = _at(acts[site], position)
            c = c - c.mean(-1, keepdim=True) if centres else c
            contribs.append((c * direction).sum(-1))
        contribs = torch.stack(contribs)  # [n_parts, batch]
        target = logits.gather(1, tokens[:, None])[:, 0]
        rest = unembed(beta[None])[0][tokens] if beta.abs().sum() > 0 else torch.zeros_like(target)
        if getattr(unembed, "bias", None) is not None and beta.abs().sum() == 0:
            rest = rest + unembed.bias.detach()[tokens]
    gap = float((contribs.sum(0) + rest - target).abs().max())
    if gap > atol * max(1.0, float(target.abs().max())):
        raise StructureError(f"the components do not add up to the logits (off by {gap:.3g}); the model's blocks "
                             "may not be plain residual sums, or its final norm is not a LayerNorm / RMSNorm")
    return {"labels": [n for n, _ in parts], "contributions": contribs, "logits": target, "rest": rest}
