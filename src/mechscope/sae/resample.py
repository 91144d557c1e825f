"""Resampling dead latents (Bricken et al. 2023; dictionary_learning ``standard.py``).

Every ``resample_every`` steps the latents that have not fired in ``dead_tokens`` tokens
are re-initialised on inputs the dictionary reconstructs badly:

- inputs are sampled with probability ∝ ``‖y − ŷ‖`` from the current batch;
- the dead decoder row becomes the (centred) input, normalised;
- the dead encoder column becomes that input × 0.2 × the mean norm of live encoder columns;
- ``b_enc`` of the dead latent becomes 0;
- Adam's moments of the touched entries are zeroed, and the trainer re-warms the
  learning rate over ``resample_warmup_steps``.

Under torchrun the choice is made on process 0 and broadcast, so copies stay equal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from mechscope.sae.train import Trainer


@torch.no_grad()
def resample_dead(trainer: "Trainer", x_n: Tensor, y_hat: Tensor, y_n: Tensor) -> bool:
    """Resample the trainer's dead latents from this batch; True when any were resampled."""
    sae, comm = trainer.sae, trainer.comm
    dead = torch.nonzero(trainer.since_fired >= trainer.cfg.dead_tokens).flatten()
    if dead.numel() == 0:
        return False
    err = (y_n - y_hat).norm(dim=-1)  # [B]
    n = min(dead.numel(), int((err > 0).sum()))  # sampled without replacement among imperfect inputs
    if n == 0:
        return False
    dead = dead[:n]
    picks = torch.multinomial(err, n, replacement=False)  # ∝ ‖y − ŷ‖
    vecs = x_n[picks] - (sae.b_dec if sae.cfg.subtracts_b_dec else 0)  # [n, d_in]
    unit = vecs / vecs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    alive = torch.ones(sae.d_sae, dtype=torch.bool, device=dead.device)
    alive[dead] = False
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    new_enc = (unit * enc_norm * 0.2).T  # [d_in, n]
    new_dec = unit if sae.cfg.kind == "sae" else torch.zeros(n, sae.d_out)  # a transcoder's row: learnt afresh
    comm.broadcast_(new_enc)
    comm.broadcast_(new_dec)
    sae.W_enc[:, dead] = new_enc
    sae.W_dec[dead] = new_dec.to(sae.W_dec.dtype)
    sae.b_enc[dead] = 0.0
    _zero_moments(trainer, dead)
    trainer.since_fired[dead] = 0
    return True


def _zero_moments(trainer: "Trainer", dead: Tensor) -> None:
    """Forget Adam's history of the resampled latents' entries."""
    sae = trainer.sae
    where = {sae.W_enc: (slice(None), dead), sae.W_dec: (dead,), sae.b_enc: (dead,)}
    for param, index in where.items():
        state = trainer.opt.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][index] = 0.0
