"""One SPD step's losses, as an ``nn.Module`` (so that DistributedDataParallel can wrap it).

Per step: one target forward that caches the decomposed layers' inputs, the importances
from them, one stochastic mask sample, the stochastic and layerwise masked forwards
(batched into one forward by default), and the weighted sum of the losses. With
``cfg.dtype = "bfloat16"`` the forward's matrix multiplies run under bf16 autocast
(:mod:`.precision`); the importance functions and the losses stay float32.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from mechscope.spd.decomposition import Decomposition
from mechscope.spd.losses import annealed_p, importance_minimality, mean_over_layers, reconstruction
from mechscope.spd.masks import delta_mask, mask_and_penalised, stochastic_source
from mechscope.spd.passes import batched_masked_passes, sequential_masked_passes, target_pass_keeping
from mechscope.spd.precision import check_dtype, full_precision, step_precision

ALIVE_CI = 0.1  # an importance above this counts the subcomponent as used on that input (CI L0)


def attention_mask_of(inputs: Any) -> Tensor | None:
    if isinstance(inputs, Mapping) and isinstance(inputs.get("attention_mask"), Tensor):
        return inputs["attention_mask"]
    return None


def _float(a: Tensor) -> Tensor:
    """A layer input for the importance functions: float32 unless it is token ids."""
    return a.float() if a.is_floating_point() else a


class SPDObjective(nn.Module):
    """``forward(inputs, frac, generator) -> {"total": loss, ...}`` for one batch."""

    def __init__(self, dec: Decomposition, batched: bool | None = None) -> None:
        super().__init__()
        self.dec = dec
        self.batched = dec.cfg.batched_passes if batched is None else batched
        self.device = next(dec.parameters()).device
        check_dtype(dec.cfg.dtype, self.device)  # refuse bf16 without hardware support at once

    def forward(self, inputs: Any, frac: float, generator: torch.Generator | None = None) -> dict[str, Any]:
        dec, cfg = self.dec, self.dec.cfg
        low = cfg.dtype != "float32"
        with step_precision(cfg.dtype, self.device) if low else nullcontext():
            target, acts, known = target_pass_keeping(dec.model, dec, inputs, keep=self.batched)
            inner, z = {}, {}
            for path in dec.paths:
                inner[path] = dec.comps(path).inner(acts[path])  # [batch, (pos,) C]
                if low:  # the importance functions' elementwise work stays float32
                    with full_precision(self.device.type):
                        z[path] = dec.importance_logits(path, _float(acts[path]), inner[path].float())
                else:
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
        if low:  # the losses in float32
            target, outs = target.float(), [y.float() for y in outs]
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
