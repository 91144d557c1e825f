"""A dictionary spliced into the model: cross-entropy loss recovered, KL score, delta loss.

The reconstruction replaces the activation at its site during the forward pass (a core
intervention, so the rest of the model is untouched), and the model's loss is compared
with the clean run and with zero-ablation of the same site (SAELens ``ce_loss_score``):

- **CE loss recovered** ``= (CE_zero − CE_dict) / (CE_zero − CE_clean)``: 1 for a perfect
  reconstruction, 0 for one as bad as zeros;
- **KL score** ``= (KL_zero − KL_dict) / KL_zero``, with ``KL`` of the clean output
  distribution to the spliced one, averaged over scored positions;
- **delta loss** ``= CE_dict − CE_clean`` in nats (Gemma Scope, OpenAI): the percentage is
  flattered by how bad zero-ablation is, so both are reported.

A transcoder replaces its target site's output by its prediction from its input site,
read in the same forward pass.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mechscope.core.intervene import Zero
from mechscope.core.run import HookCall, batch_info, call_model, hooked, logits_of
from mechscope.core.site import Site
from mechscope.sae.arch import SAE, SAEError

# loss_fn(output, inputs) -> (per-position losses [n], logits [n, V]) over the scored positions
LossFn = Callable[[Any, Any], tuple[Tensor, Tensor]]


def next_token_loss(output: Any, inputs: Any) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy of a causal LM over real tokens (attention mask respected)."""
    logits = logits_of(output)  # [batch, pos, vocab]
    ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
    if not isinstance(logits, Tensor) or logits.dim() != 3 or ids.shape != logits.shape[:2]:
        raise SAEError("next_token_loss needs logits [batch, pos, vocab] for input_ids [batch, pos]; "
                       "give a loss_fn(output, inputs) -> (losses [n], logits [n, vocab]) for this model")
    keep = torch.ones_like(ids[:, 1:], dtype=torch.bool)
    if isinstance(inputs, dict) and "attention_mask" in inputs:
        mask = inputs["attention_mask"].bool()
        keep = mask[:, 1:] & mask[:, :-1]
    pred = logits[:, :-1][keep]  # [n, vocab]
    return F.cross_entropy(pred.float(), ids[:, 1:][keep], reduction="none"), pred


class _Reconstruct(nn.Module):
    """Intervention: the view becomes the dictionary's reconstruction (of another site's view for a transcoder)."""

    def __init__(self, sae: SAE, source: Site | None = None) -> None:
        super().__init__()
        self.sae, self.source, self.run = sae, source, None

    def forward(self, view: Tensor, call: HookCall) -> Tensor:
        x = view if self.source is None else self.run.cache[self.source]
        if x.shape[:-1] != view.shape[:-1]:
            raise SAEError(f"the transcoder's input at {self.source} has leading shape {list(x.shape[:-1])}, "
                           f"its target at {call.site} has {list(view.shape[:-1])}; use sites over the same positions")
        return self.sae(x.to(self.sae.W_enc.dtype)).to(view.dtype)


def _forward(model: nn.Module, inputs: Any, interventions: list, cache: list[Site], rec: _Reconstruct | None) -> Any:
    with hooked(model, interventions, cache, batch=batch_info(inputs)) as state:
        if rec is not None:
            rec.run = state
        return call_model(model, inputs)


@torch.no_grad()
def ce_loss_recovered(
    model: nn.Module,
    batches: Iterable[Any],
    site: Site,
    sae: SAE,
    *,
    input_site: Site | None = None,
    loss_fn: LossFn = next_token_loss,
) -> dict[str, float]:
    """CE loss recovered, KL score and delta loss of ``sae`` spliced in at ``site``.

    ``site`` is where the reconstruction goes (an autoencoder also reads its input
    there); a transcoder reads ``input_site`` and writes ``site``. ``loss_fn(output,
    inputs)`` gives per-position losses and the logits they come from (default: next-token
    cross-entropy of a causal LM).
    """
    if sae.cfg.kind != "sae" and input_site is None:
        raise SAEError(f"a {sae.cfg.kind} reads one site and writes another: give input_site= (e.g. the MLP input)")
    if sae.cfg.kind == "sae" and input_site is not None:
        raise SAEError("an autoencoder reads and writes the same site; input_site is only for transcoders")
    rec = _Reconstruct(sae, input_site)
    cache = [input_site] if input_site is not None else []
    sums = {"clean": 0.0, "zero": 0.0, "dict": 0.0, "kl_zero": 0.0, "kl_dict": 0.0}
    n = 0
    for inputs in batches:
        clean_loss, clean_logits = loss_fn(call_model(model, inputs), inputs)
        logp = clean_logits.float().log_softmax(-1)
        runs = {"zero": ([(site, Zero())], [], None), "dict": ([(site, rec)], cache, rec)}
        sums["clean"] += float(clean_loss.sum())
        for name, (ivs, cached, r) in runs.items():
            loss, logits = loss_fn(_forward(model, inputs, ivs, cached, r), inputs)
            sums[name] += float(loss.sum())
            kl = F.kl_div(logits.float().log_softmax(-1), logp, log_target=True, reduction="none").sum(-1)
            sums[f"kl_{name}"] += float(kl.sum())
        n += clean_loss.numel()
    if n == 0:
        raise SAEError("no positions were scored: the batches were empty")
    ce = {k: v / n for k, v in sums.items()}
    gap = ce["zero"] - ce["clean"]
    if abs(gap) < 1e-9:
        raise SAEError(f"zero-ablating {site} does not change the loss ({ce['clean']:.4f}); "
                       "CE loss recovered is undefined at a site the model does not use")
    return {
        "ce_clean": ce["clean"], "ce_zero_ablation": ce["zero"], "ce_spliced": ce["dict"],
        "ce_loss_recovered": (ce["zero"] - ce["dict"]) / gap,
        "kl_zero_ablation": ce["kl_zero"], "kl_spliced": ce["kl_dict"],
        "kl_score": (ce["kl_zero"] - ce["kl_dict"]) / ce["kl_zero"] if ce["kl_zero"] > 0 else float("nan"),
        "delta_loss": ce["dict"] - ce["clean"], "n_positions": n,
    }
