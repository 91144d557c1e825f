"""What a direction does to a model's next-token distributions.

Every use of a direction (adding it, ablating it, baking the ablation into the weights) is
measured the same way, on the model's own outputs with and without it:

- the KL divergence ``KL(clean || changed)`` of the next-token distributions, averaged
  over the real (unpadded) positions: how much else changed;
- optionally the probability of a target token at each example's last real position,
  before and after: the intended effect;
- with a tokenizer (or token-id prompts), continuations of prompts with and without it
  (:func:`compare_generations`, on :func:`mechscope.core.generate.generate`, the change on
  every forward: added at every position, ablated at every layer, or the edited weights).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.generate import Generation, generate
from mechscope.core.run import call_model, logits_of
from mechscope.core.site import Site
from mechscope.steer.apply import ablate, ablation_interventions, steer, steering_interventions
from mechscope.steer.orthogonalize import orthogonalize_weights


def next_token_effect(clean: Any, changed: Any, inputs: Any, target: Optional[int] = None) -> dict[str, float]:
    """Target probability at each example's last real position, and KL(clean || changed) over real positions."""
    mask = inputs["attention_mask"].bool() if isinstance(inputs, dict) else torch.ones(
        logits_of(clean).shape[:2], dtype=torch.bool)
    p, q = logits_of(clean).float().log_softmax(-1), logits_of(changed).float().log_softmax(-1)
    out = {"kl": float((p.exp() * (p - q)).sum(-1)[mask].mean())}
    if target is not None:
        last = mask.long().sum(1) - 1
        rows = torch.arange(len(last))
        out["p_target_before"] = float(p[rows, last, target].exp().mean())
        out["p_target_after"] = float(q[rows, last, target].exp().mean())
    return out


@torch.no_grad()
def steering_effects(model: nn.Module, inputs: Any, direction: Tensor, site: Site, coeffs: Sequence[float],
                     target: Optional[int] = None) -> list[dict[str, float]]:
    """Per coefficient ``c``: the effect of adding ``c * direction`` at ``site`` (every position)."""
    return [{"coeff": c, **next_token_effect(call_model(model, inputs), steer(model, inputs, direction, site, c),
                                             inputs, target)} for c in coeffs]


@torch.no_grad()
def ablation_effect(model: nn.Module, inputs: Any, direction: Tensor, target: Optional[int] = None) -> dict[str, float]:
    """The effect of keeping ``direction`` out of the residual stream (every layer and position)."""
    return next_token_effect(call_model(model, inputs), ablate(model, inputs, direction), inputs, target)


@torch.no_grad()
def weight_edit_effect(model: nn.Module, inputs: Any, direction: Tensor,
                       target: Optional[int] = None) -> tuple[dict[str, float], nn.Module]:
    """``({max_abs_diff_vs_hooks, concept_inputs}, edited model)``: the orthogonalised weights'
    effect on ``inputs``, and how far their logits are from the hooked ablation's."""
    edited = orthogonalize_weights(model, direction)
    diff = (logits_of(call_model(edited, inputs)) - logits_of(ablate(model, inputs, direction))).abs().max()
    return {"max_abs_diff_vs_hooks": float(diff),
            "concept_inputs": next_token_effect(call_model(model, inputs), call_model(edited, inputs), inputs,
                                                target)}, edited


Variant = tuple[nn.Module, list]  # (model to run, interventions on every forward)


def action_variants(model: nn.Module, action: str, direction: Tensor, site: Site, coeffs: Sequence[float] = (1.0,),
                    edited: Optional[nn.Module] = None) -> dict[str, Variant]:
    """The changed models of ``action`` by name: ``"add"``, ``c * direction`` at every position of
    ``site`` per coefficient (``"coeff C"``); ``"ablate"``, the direction kept out of every
    residual write; ``"orthogonalize"``, the edited weights (``edited``, else made here)."""
    if action == "add":
        return {f"coeff {c:g}": (model, steering_interventions(direction, site.replace(positions=None), c))
                for c in coeffs}
    if action == "ablate":
        return {"ablated": (model, ablation_interventions(model, direction))}
    if action == "orthogonalize":
        return {"edited weights": (edited if edited is not None else orthogonalize_weights(model, direction), [])}
    raise ValueError(f"unknown action {action!r}; choose add, ablate or orthogonalize")


def _continuation(g: Generation, i: int) -> Any:
    return g.texts[i] if g.texts is not None else g.tokens[i, :g.lengths[i]].tolist()


@torch.no_grad()
def compare_generations(model: nn.Module, tokenizer: Any, prompts: Any, variants: dict[str, Variant],
                        max_new_tokens: int, **options: Any) -> list[dict[str, Any]]:
    """Per prompt, ``{"prompt", "unsteered", <variant name>: continuation, ...}``: the model's
    continuation and each variant's, generated alike (``options`` of ``generate``: greedy by
    default; ``do_sample=True`` with the same ``seed`` for every variant). A continuation is
    text with a tokenizer, else its token ids."""
    runs = {"unsteered": generate(model, tokenizer, prompts, None, max_new_tokens, **options)}
    runs.update({name: generate(m, tokenizer, prompts, iv, max_new_tokens, **options)
                 for name, (m, iv) in variants.items()})
    shown = [p if isinstance(p, str) else torch.as_tensor(p).tolist() for p in
             ([prompts] if isinstance(prompts, str) else prompts)]
    return [{"prompt": p, **{name: _continuation(g, i) for name, g in runs.items()}} for i, p in enumerate(shown)]
