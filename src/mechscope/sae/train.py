"""Training sparse dictionaries: the :class:`Trainer` (one step at a time) and :func:`train`.

A step normalises the batch (the scale is estimated on the first batch and folded into
the weights on export), evaluates the architecture's objective (objectives.py), averages
gradients across processes (core/distributed.py), keeps decoder rows at unit norm where the recipe
says so (projecting the gradient's parallel component out first), steps Adam, and updates
the bookkeeping: tokens since each latent last fired (dead = not fired in ``dead_tokens``
tokens), the BatchTopK threshold, resampling of dead latents when asked for.

Defaults follow the recipes of spec §1-2, per architecture, wherever a field is None:

| field            | relu (April 2024) | topk / batchtopk / matryoshka | jumprelu (paper) |
|------------------|-------------------|-------------------------------|------------------|
| lr               | 3e-4 (SAELens)    | 2e-4 / sqrt(d_sae / 2^14)     | 7e-5             |
| adam betas       | (0.9, 0.999)      | (0.9, 0.999)                  | (0.0, 0.999)     |
| normalize        | sqrt_d: E|x| = √d | unit: E|x|² = 1               | unit             |
| lr decay         | last 20 % to 0    | none                          | none             |
| grad clip        | 1.0               | off                           | off              |
| dead latents     | none              | auxk (k_aux = d_in/2, α=1/32) | none             |
| unit-norm W_dec  | no (in penalty)   | yes (autoencoders)            | yes (autoencoders)|
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional

import torch
from torch import Tensor

from mechscope.core.config import Config, ConfigError, config, param
from mechscope.core.distributed import Comm
from mechscope.core.lock import lock_dir
from mechscope.core.progress import Progress
from mechscope.sae.arch import (
    SAE,
    TOPK_FAMILY,
    SAEConfig,
    SAEError,
    fold_scale,
    to_jumprelu,
)
from mechscope.sae.objectives import OBJECTIVES, LossSettings, StepOutput
from mechscope.sae.resample import resample_dead
from mechscope.sae import resume  # called through the module: tests count its checkpoint writes


@config
class TrainConfig(Config):
    """How a dictionary is trained. None means the architecture's default (module table)."""

    steps: int = param(1000, ge=1, help="optimiser steps")
    batch_size: int = param(4096, ge=1, help="activation vectors per step (per process under torchrun)")
    lr: Optional[float] = param(None, gt=0, help="Adam learning rate (default: per architecture)")
    adam_betas: Optional[tuple[float, float]] = param(None, help="Adam betas (default: per architecture)")
    adam_eps: float = param(1e-8, help="Adam epsilon")
    lr_warmup_steps: int = param(0, ge=0, help="linear learning-rate warm-up from 0 over these steps")
    lr_decay_fraction: Optional[float] = param(None, ge=0, le=1, help="linear decay to 0 over this final fraction of steps")
    grad_clip: Optional[float] = param(None, help="clip the gradient norm to this (0: off; default per architecture)")
    normalize: Optional[Literal["sqrt_d", "unit", "none"]] = param(
        None, help="input scaling, estimated on the first batch and folded in at export: "
                   "sqrt_d (E|x| = sqrt(d)), unit (E|x|^2 = 1) or none")
    l1_coefficient: float = param(1.0, help="relu: λ of the penalty Σ f_i |W_dec,i| (SAELens default)")
    l1_warmup_fraction: float = param(0.05, ge=0, le=1, help="relu: λ ramps linearly from 0 over this fraction of steps")
    l0_coefficient: float = param(1.0, help="jumprelu: λ of the L0 penalty")
    l0_penalty: Literal["target", "linear"] = param(
        "target", help="jumprelu: target = λ(L0/k - 1)^2 (dictionary_learning), linear = λ·L0 (paper)")
    ste_to_input: bool = param(False, help="jumprelu: let the L0 gradient reach the pre-activations too")
    dead_fix: Optional[Literal["auxk", "resample", "none"]] = param(
        None, help="what to do about dead latents (default: auxk for the topk family, none otherwise)")
    dead_tokens: int = param(10_000_000, ge=1, help="a latent is dead when it has not fired in this many tokens")
    aux_k: Optional[int] = param(None, ge=1, help="AuxK: dead latents used per token (default d_in/2)")
    aux_alpha: float = param(1 / 32, help="AuxK loss weight α")
    resample_every: int = param(25_000, ge=1, help="resample: steps between resamplings of dead latents")
    resample_warmup_steps: int = param(1000, ge=0, help="resample: learning-rate re-warm-up after a resampling")
    threshold_lr: float = param(0.01, gt=0, le=1, help="batchtopk: θ <- (1-r)θ + r·min(kept activation) each step")
    unit_norm_decoder: Optional[bool] = param(None, help="keep decoder rows at unit norm (default per architecture)")
    init_b_dec: Literal["mean", "zero"] = param("mean", help="start b_dec at the first batch's mean, or at 0")
    tied_init: bool = param(True, help="start an autoencoder's encoder at W_dec^T (off: an independent random encoder)")
    seed: int = param(0, ge=0, lt=2**63, help="seed of the initialisation")
    checkpoint_dir: Optional[Path] = param(None, help="write resumable checkpoints here (resumes from one found)")
    checkpoint_every: int = param(0, ge=0, help="steps between checkpoints (0: only at the end)")
    log_every: int = param(50, ge=1, help="steps between progress updates and history entries")
    progress: bool = param(True, help="show a progress bar on stderr")


@dataclass(frozen=True)
class Recipe:
    """A TrainConfig with every architecture default filled in."""

    lr: float
    betas: tuple[float, float]
    normalize: str
    decay_fraction: float
    grad_clip: float
    dead_fix: str
    aux_k: int
    unit_norm_decoder: bool


def recipe(sae_cfg: SAEConfig, cfg: TrainConfig) -> Recipe:
    """Fill the architecture defaults of the module table into ``cfg``."""
    arch, topk = sae_cfg.arch, sae_cfg.arch in TOPK_FAMILY
    lr = {"relu": 3e-4, "jumprelu": 7e-5}.get(arch, 2e-4 / math.sqrt(sae_cfg.d_sae / 2 ** 14))
    dead_fix = cfg.dead_fix or ("auxk" if topk else "none")
    if dead_fix == "auxk" and not topk:
        raise ConfigError(f"dead_fix='auxk' needs a topk-family architecture (AuxK is part of their objective); "
                          f"arch={arch!r} can use dead_fix='resample' or 'none'")
    unit = cfg.unit_norm_decoder if cfg.unit_norm_decoder is not None else (arch != "relu" and sae_cfg.kind == "sae")
    return Recipe(
        lr=cfg.lr if cfg.lr is not None else lr,
        betas=tuple(cfg.adam_betas) if cfg.adam_betas is not None else ((0.0, 0.999) if arch == "jumprelu" else (0.9, 0.999)),
        normalize=cfg.normalize or ("sqrt_d" if arch == "relu" else "unit"),
        decay_fraction=cfg.lr_decay_fraction if cfg.lr_decay_fraction is not None else (0.2 if arch == "relu" else 0.0),
        grad_clip=cfg.grad_clip if cfg.grad_clip is not None else (1.0 if arch == "relu" else 0.0),
        dead_fix=dead_fix,
        aux_k=cfg.aux_k if cfg.aux_k is not None else max(1, sae_cfg.d_in // 2),
        unit_norm_decoder=bool(unit),
    )


def lr_factor(step: int, steps: int, warmup: int, decay_fraction: float) -> float:
    """Learning-rate multiplier: linear warm-up, constant, linear decay to 0 at the end."""
    f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    decay_start = steps * (1 - decay_fraction)
    if decay_fraction > 0 and step >= decay_start:
        f *= max(0.0, (steps - step) / (steps - decay_start))
    return f


def _l1(coefficient: float, warmup_fraction: float, step: int, steps: int) -> float:
    """The L1 coefficient at ``step``: a linear ramp from 0 over ``warmup_fraction`` of ``steps``."""
    if warmup_fraction <= 0:
        return coefficient
    return coefficient * min(1.0, (step + 1) / max(1, int(warmup_fraction * steps)))


@torch.no_grad()
def untie(sae: SAE, seed: int) -> None:
    """Replace the tied encoder by independent random directions of the same (unit) column norm."""
    gen = torch.Generator().manual_seed(seed + 10_007)
    w = torch.randn(sae.d_in, sae.d_sae, generator=gen)
    sae.W_enc.copy_(w / w.norm(dim=0, keepdim=True) * sae.W_enc.norm(dim=0, keepdim=True))


def _adam(params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float], eps: float) -> torch.optim.Adam:
    try:  # the fused kernel (CPU and GPU in torch >= 2.4) touches each parameter once per step
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)


class Trainer:
    """The state of one dictionary's training: weights, Adam, scales, latent bookkeeping."""

    def __init__(self, sae_cfg: SAEConfig, cfg: TrainConfig | None = None, comm: Comm | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.sae_cfg, self.cfg = sae_cfg, cfg or TrainConfig()
        self.recipe = recipe(sae_cfg, self.cfg)
        self.comm = comm or Comm()
        self.sae = SAE(sae_cfg, seed=self.cfg.seed).to(device).train()
        if not self.cfg.tied_init:
            untie(self.sae, self.cfg.seed)
        self.opt = _adam(list(self.sae.parameters()), self.recipe.lr, self.recipe.betas, self.cfg.adam_eps)
        self.objective = OBJECTIVES[sae_cfg.arch]
        self.step_count = 0
        self.tokens = 0
        self.since_fired = torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=device)  # tokens since last fired
        self.in_scale: float | None = None
        self.out_scale: float | None = None
        self.rewarm_from = -10 ** 9  # step of the last resampling
        self.history: list[dict[str, float]] = []
        self.fingerprint: dict[str, Any] = resume.fingerprint(self)  # train() adds the data source
        self.continued: list[dict[str, int]] = []  # extensions of a finished run (resume.py)

    # -- the data-dependent start ----------------------------------------------------------
    def _scale(self, v: Tensor) -> float:
        """Scale that normalises rows ``v [B, d]`` per the recipe (agreed across processes)."""
        if self.recipe.normalize == "none":
            return 1.0
        stats = torch.stack([v.norm(dim=-1).mean(), v.pow(2).sum(-1).mean()]).double()
        stats = self.comm.mean_(stats)
        if float(stats[1]) <= 0:
            raise SAEError("the first batch of activations is all zeros, so it cannot be normalised; "
                           "check the site, or train with normalize='none'")
        if self.recipe.normalize == "sqrt_d":
            return math.sqrt(v.shape[-1]) / float(stats[0])
        return 1.0 / math.sqrt(float(stats[1]))

    @torch.no_grad()
    def initialise(self, x: Tensor, y: Tensor) -> None:
        """Estimate the scales and set the biases from the first batch (spec §2)."""
        self.in_scale = self._scale(x)
        self.out_scale = self.in_scale if self.sae_cfg.kind == "sae" else self._scale(y)
        sae = self.sae
        if self.cfg.init_b_dec == "mean":
            sae.b_dec.copy_(self.comm.mean_((y * self.out_scale).mean(0)))
        if self.sae_cfg.kind != "sae":  # sparsify: centre the transcoder's pre-activations
            mean_in = self.comm.mean_((x * self.in_scale).mean(0))
            sae.b_enc.copy_(-(mean_in @ sae.W_enc))

    def schedule(self, step: int, steps: int) -> dict[str, float]:
        """The scheduled values at ``step`` of a run of ``steps`` (what ``--continue`` recomputes)."""
        c = self.cfg
        out = {"lr": self.recipe.lr * lr_factor(step, steps, c.lr_warmup_steps, self.recipe.decay_fraction)}
        if self.sae_cfg.arch == "relu":
            out["l1_coefficient"] = _l1(c.l1_coefficient, c.l1_warmup_fraction, step, steps)
        return out

    # -- one step ------------------------------------------------------------------------
    def settings(self) -> LossSettings:
        r, c = self.recipe, self.cfg
        dead = None
        if r.dead_fix == "auxk":
            dead = torch.nonzero(self.since_fired >= c.dead_tokens).flatten()
        l1 = _l1(c.l1_coefficient, c.l1_warmup_fraction, self.step_count, c.steps)
        return LossSettings(dead=dead, k_aux=r.aux_k, l1_coefficient=l1, options=c)

    def _check_batch(self, x: Tensor, y: Tensor | None) -> Tensor:
        cfg = self.sae_cfg
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != cfg.d_in:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise SAEError(f"training batches must be rows [batch, d_in={cfg.d_in}], got {shape}")
        if x.shape[0] == 0:
            raise SAEError(f"step {self.step_count}: the batch has no rows ([0, {cfg.d_in}]); every batch needs at "
                           "least one activation row: check the data source (an empty store shard, a filter that "
                           "dropped every position)")
        if cfg.kind == "sae":
            if y is not None and y is not x:
                raise SAEError("an autoencoder reconstructs its input; give targets only to transcoders")
            return x
        if y is None:
            raise SAEError(f"a {cfg.kind} predicts a target: give (x, y) batches with y [batch, d_out={cfg.out_width}]")
        if y.shape != (x.shape[0], cfg.out_width):
            raise SAEError(f"targets must be [batch={x.shape[0]}, d_out={cfg.out_width}], got {list(y.shape)}")
        return y

    def step(self, x: Tensor, y: Tensor | None = None) -> StepOutput:
        """One optimiser step on rows ``x [B, d_in]`` (and targets ``y`` for transcoders)."""
        y = self._check_batch(x, y)
        if not (torch.isfinite(x).all() and (y is x or torch.isfinite(y).all())):
            raise SAEError(f"step {self.step_count}: the batch holds NaN or inf activations; check the model and site")
        if self.in_scale is None:
            self.initialise(x, y)
        x_n = x * self.in_scale
        y_n = x_n if self.sae_cfg.kind == "sae" else y * self.out_scale
        r, sae = self.recipe, self.sae
        factor = lr_factor(self.step_count, self.cfg.steps, self.cfg.lr_warmup_steps, r.decay_fraction)
        since = self.step_count - self.rewarm_from
        if since < self.cfg.resample_warmup_steps:
            factor *= (since + 1) / self.cfg.resample_warmup_steps
        for group in self.opt.param_groups:
            group["lr"] = r.lr * factor
        out = self.objective(sae, x_n, y_n, self.settings())
        out.loss.backward()
        self.comm.average_grads(sae.parameters())
        self._update(out)
        self._bookkeep(out, x_n, y_n, x.shape[0] * self.comm.world_size)
        return out

    def _update(self, out: StepOutput) -> None:
        sae = self.sae
        with torch.no_grad():
            if self.recipe.unit_norm_decoder and sae.W_dec.grad is not None:
                w = sae.W_dec  # rows are unit: remove the gradient's component along each row
                sae.W_dec.grad.sub_((sae.W_dec.grad * w).sum(1, keepdim=True) * w)
        if self.recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), self.recipe.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            if self.recipe.unit_norm_decoder:
                sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
            if self.sae_cfg.arch == "jumprelu":
                sae.threshold.clamp_(min=0.0)  # f = h·H(h − θ) gates a ReLU: θ stays non-negative

    @torch.no_grad()
    def _bookkeep(self, out: StepOutput, x_n: Tensor, y_n: Tensor, global_batch: int) -> None:
        fired = self.comm.any_(out.fired)
        self.since_fired += global_batch
        self.since_fired[fired] = 0
        if self.sae_cfg.arch in ("batchtopk", "matryoshka") and out.min_act is not None:
            sample = self.comm.min_(out.min_act.detach().double().reshape(1))[0]
            r = self.cfg.threshold_lr  # SAELens: EMA of the smallest kept activation, in fp64
            self.sae.threshold.copy_(sample if self.step_count == 0 else (1 - r) * self.sae.threshold + r * sample)
        self.step_count += 1
        self.tokens += global_batch
        if self.recipe.dead_fix == "resample" and self.step_count % self.cfg.resample_every == 0:
            if resample_dead(self, x_n, out.y_hat, y_n):
                self.rewarm_from = self.step_count

    # -- reading the state ---------------------------------------------------------------
    def dead_fraction(self) -> float:
        """Fraction of latents that have not fired in ``dead_tokens`` tokens (0 before that many are seen)."""
        return float((self.since_fired >= self.cfg.dead_tokens).float().mean())

    def metrics(self, out: StepOutput, y_n: Tensor) -> dict[str, float]:
        fvu = float((y_n - out.y_hat).pow(2).sum() / (y_n - y_n.mean(0)).pow(2).sum().clamp_min(1e-12))
        return {"step": self.step_count, "tokens": self.tokens, "loss": out.loss.item(), "l0": out.l0,
                "fvu": fvu, "dead": self.dead_fraction(), "lr": self.opt.param_groups[0]["lr"], **out.parts}

    def export(self) -> SAE:
        """The trained dictionary in raw activation units, for inference (eval mode, a copy)."""
        if self.in_scale is None:
            raise SAEError("the trainer has not seen any data yet; call step() or train() first")
        sae = to_jumprelu(fold_scale(self.sae, self.in_scale, self.out_scale))
        return sae.eval().requires_grad_(False)


@dataclass
class TrainResult:
    sae: SAE  # exported: raw units, inference architecture
    trainer: Trainer
    history: list[dict[str, float]]


def _rows(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise SAEError(f"training data must yield tensors [batch, d_in] or (x, y) pairs, got {type(batch).__name__}")


def train(sae_cfg: SAEConfig, cfg: TrainConfig, data: Iterable[Any], *, comm: Comm | None = None,
          device: str | torch.device = "cpu",
          on_log: Callable[[dict[str, float], "Trainer"], None] | None = None,
          fingerprint: dict[str, Any] | None = None, extend: bool = False) -> TrainResult:
    """Train one dictionary for ``cfg.steps`` steps on ``data`` (rows, or (x, y) pairs).

    With ``cfg.checkpoint_dir`` a checkpoint is written atomically every
    ``checkpoint_every`` steps and at the end, and a run finds and resumes from it: the
    batches it already consumed are skipped, so ``data`` must yield the same sequence.
    ``fingerprint`` records the data source (JSON values: site, store, data seed, ...); a
    resume whose data source or settings differ from the checkpoint's is refused naming the
    field, and so is another ``cfg.steps`` unless ``extend``, which replans the run for the
    new total (every schedule recomputed for it; :mod:`mechscope.sae.resume`).
    The directory is locked for the run (:mod:`mechscope.core.lock`): a second job
    training into it fails at once; the ranks of one ``torchrun`` job share the lock.
    ``on_log(entry, trainer)`` is called with every history entry (it may add to it).
    """
    trainer = Trainer(sae_cfg, cfg, comm=comm, device=device)
    trainer.fingerprint = resume.fingerprint(trainer, fingerprint)
    if cfg.checkpoint_dir is None:
        return _run(trainer, data, None, device, on_log)
    with lock_dir(cfg.checkpoint_dir, "SAE checkpoint directory"):
        return _run(trainer, data, Path(cfg.checkpoint_dir) / "trainer.safetensors", device, on_log, extend)


def progress_text(m: dict[str, float]) -> str:
    """What the progress line shows of a history entry: loss, L0, FVU, dead fraction."""
    return (f"loss {m.get('loss', 0):.4g} L0 {m.get('l0', 0):.1f} FVU {m.get('fvu', 0):.4f} "
            f"dead {100 * m.get('dead', 0):.1f}%")


def _run(trainer: Trainer, data: Iterable[Any], ckpt: Path | None, device: str | torch.device,
         on_log: Callable[[dict[str, float], "Trainer"], None] | None, extend: bool = False) -> TrainResult:
    """The loop of :func:`train`: resume from ``ckpt`` if it exists, step, log, checkpoint."""
    cfg = trainer.cfg
    if ckpt is not None and ckpt.exists():
        resume.load_checkpoint(trainer, ckpt, extend=extend)
    bar = Progress(cfg.steps, label="sae", enabled=cfg.progress and trainer.comm.is_main, start=trainer.step_count)
    skip = trainer.step_count
    it = iter(data)
    while trainer.step_count < cfg.steps:
        try:
            batch = next(it)
        except StopIteration:
            raise SAEError(f"the data ran out after {trainer.step_count} steps of the {cfg.steps} asked for; "
                           "give more data (more epochs of the store, more input batches) or fewer steps") from None
        if skip > 0:  # resuming: these batches were trained on before the checkpoint
            skip -= 1
            continue
        x, y = _rows(batch)
        x, y = x.to(device), (y.to(device) if y is not None else None)
        out = trainer.step(x, y)
        last = trainer.step_count == cfg.steps
        if trainer.step_count % cfg.log_every == 0 or last:
            y_n = x * trainer.in_scale if y is None else y * trainer.out_scale
            entry = trainer.metrics(out, y_n)
            if on_log is not None:
                on_log(entry, trainer)
            trainer.history.append(entry)
            bar.update(trainer.step_count, progress_text(entry))
        if ckpt is not None and (last or (cfg.checkpoint_every and trainer.step_count % cfg.checkpoint_every == 0)):
            if trainer.comm.is_main:
                resume.save_checkpoint(trainer, ckpt)
            trainer.comm.barrier()
    bar.close()
    return TrainResult(trainer.export(), trainer, trainer.history)
