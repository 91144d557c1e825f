"""One SPD step's losses, as an ``nn.Module`` (so that DistributedDataParallel can wrap it).

Per step: one target forward that caches the decomposed layers' inputs, the importances
from them, one stochastic mask sample, the stochastic and layerwise masked forwards
(batched into one forward by default), and the weighted sum of the losses.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from mechscope.spd.decomposition import Decomposition
from mechscope.spd.losses import annealed_p, importance_minimality, mean_over_layers, reconstruction
from mechscope.spd.masks import delta_mask, mask_and_penalised, stochastic_source
from mechscope.spd.passes import batched_masked_passes, sequential_masked_passes, target_pass_keeping

ALIVE_CI = 0.1  # an importance above this counts the subcomponent as used on that input (CI L0)


def attention_mask_of(inputs: Any) -> Tensor | None:
    if isinstance(inputs, Mapping) and isinstance(inputs.get("attention_mask"), Tensor):
        return inputs["attention_mask"]
    return None


class SPDObjective(nn.Module):
    """``forward(inputs, frac, generator) -> {"total": loss, ...}`` for one batch."""

    def __init__(self, dec: Decomposition, batched: bool | None = None) -> None:
        super().__init__()
        self.dec = dec
        self.batched = dec.cfg.batched_passes if batched is None else batched

    def forward(self, inputs: Any, frac: float, generator: torch.Generator | None = None) -> dict[str, Any]:
        dec, cfg = self.dec, self.dec.cfg
        target, acts, known = target_pass_keeping(dec.model, dec, inputs, keep=self.batched)
        inner, z = {}, {}
        for path in dec.paths:
            inner[path] = dec.comps(path).inner(acts[path])  # [batch, (pos,) C]
            z[path] = dec.importance_logits(path, acts[path], inner[path])
        masks, g_upper, g_lower = {}, {}, {}
        for path in dec.paths:  # m = g + (1 - g) r with g lower-leaky; the penalty's g upper-leaky
            r = stochastic_source(z[path], cfg.mask, generator)
            masks[path], g_upper[path], g_lower[path] = mask_and_penalised(z[path], r, cfg.leak)
        deltas = {p: delta_mask(z[p].shape[:-1], cfg.mask, generator, like=z[p])
                  if cfg.faithfulness == "delta" else None for p in dec.paths}
        layerwise = cfg.layerwise_coeff > 0
        if self.batched:
            outs = batched_masked_passes(dec.model, dec, inputs, acts, inner, masks, deltas, layerwise, known)
        else:
            outs = sequential_masked_passes(dec.model, dec, inputs, masks, deltas, layerwise)
        am = attention_mask_of(inputs)
        stochastic = reconstruction(cfg.recon, outs[0], target, am)
        zero = stochastic.new_zeros(())
        lw = mean_over_layers([reconstruction(cfg.recon, y, target, am) for y in outs[1:]]) if layerwise else zero
        p = annealed_p(frac, cfg.p, cfg.p_final, cfg.p_anneal_start, cfg.p_anneal_end)
        imp = importance_minimality(g_upper, p)
        total = cfg.stochastic_coeff * stochastic + cfg.layerwise_coeff * lw + cfg.importance_coeff * imp
        if cfg.faithfulness == "loss":
            faith = dec.faithfulness()
            total = total + cfg.faithfulness_coeff * faith
        else:
            with torch.no_grad():
                faith = dec.faithfulness()
        with torch.no_grad():
            l0 = {path: torch.gt(g, ALIVE_CI, out=torch.empty_like(g)).sum(-1).mean() for path, g in g_lower.items()}
        return {"total": total, "stochastic": stochastic, "layerwise": lw, "importance": imp,
                "faithfulness": faith, "p": p, "l0": l0}
