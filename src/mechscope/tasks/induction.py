"""Induction heads (Elhage et al. 2021; Olsson et al. 2022) on repeated random sequences.

A sequence is ``BOS r r`` with ``r`` a run of random tokens: the second copy is
predictable only by looking back to the token after the previous occurrence of the
current token, which takes two attention layers (a previous-token head in layer 0
feeding the keys of an induction head in layer 1). A one-layer model is the control.

Pitfall (why the period is random): with a fixed period a one-layer model learns to
attend a fixed distance back by position alone and solves the task without induction.
Training therefore draws each sequence's period P from U[L/2, L] (``t_i = r[i mod P]``);
evaluation uses a fixed repeat P = L.

Losses are read on the *repeated half*: the predictions of the second copy's tokens
r_1..r_{L-1} (indices L+2..2L), the ones an induction mechanism can make; r_0 (index
L+1) follows a token that has not occurred before and is unpredictable. The model is the
zoo's attention-only :class:`~mechscope.zoo.transformer.Transformer`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mechscope.core.checkpoint import (
    load_module_state,
    load_tensors,
    save_json_atomic,
    save_module,
)
from mechscope.core.config import Config, ConfigError, config, param
from mechscope.zoo.transformer import Transformer, TransformerConfig

CHECKPOINTS = Path(__file__).resolve().parent.parent / "zoo" / "checkpoints"
BOS = 0


@config
class InductionConfig(Config):
    """Model and recipe (defaults: the 2-layer model; ``n_layers=1`` is the control)."""

    n_layers: int = param(2, help="attention-only layers", ge=1)
    n_heads: int = param(4, help="heads per layer", ge=1)
    d_head: int = param(16, help="width of one head", ge=1)
    d_model: int = param(64, help="residual width", ge=1)
    vocab: int = param(64, help="vocabulary (token 0 is BOS; r is drawn from 1..vocab-1)")
    half_len: int = param(20, help="L: the sequence is BOS + 2L tokens")
    batch_size: int = param(64, help="sequences per step", ge=1)
    lr: float = param(1e-3, help="AdamW learning rate")
    steps: int = param(3000, help="optimiser steps", ge=1)
    eval_every: int = param(50, help="measure the repeated-half loss every this many steps", ge=1)
    seed: int = param(0, help="seed of the initialisation and the data")

    def validate(self) -> None:
        if self.half_len < 4:
            raise ConfigError(f"InductionConfig.half_len must be >= 4 to leave a repeated half, got {self.half_len}")
        if self.vocab < 3:
            raise ConfigError(f"InductionConfig.vocab must be >= 3 (BOS plus tokens), got {self.vocab}")

    def model_config(self) -> TransformerConfig:
        return TransformerConfig(vocab=self.vocab, n_ctx=2 * self.half_len + 1, d_model=self.d_model,
                                 n_layers=self.n_layers, n_heads=self.n_heads, d_head=self.d_head, d_mlp=None)


def checkpoint_path(n_layers: int) -> Path:
    return CHECKPOINTS / f"induction_{n_layers}l.safetensors"


# ------------------------------------------------------------------------------ data


def repeated_tokens(n: int, half_len: int, vocab: int, periods: Tensor | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
    """``[n, 2L+1]`` sequences ``BOS t_0 .. t_{2L-1}`` with ``t_i = r[i mod P]``.

    ``periods`` ``[n]`` gives each sequence's P (default: L, an exact repeat ``BOS r r``).
    """
    if periods is None:
        periods = torch.full((n,), half_len)
    r = torch.randint(1, vocab, (n, half_len), generator=generator)  # [n, L]
    i = torch.arange(2 * half_len)
    body = r.gather(1, i[None, :] % periods[:, None])  # [n, 2L]
    return torch.cat([torch.full((n, 1), BOS), body], dim=1)


def training_periods(half_len: int) -> Tensor:
    """The periods training draws from, uniformly: ``L // 2 .. L`` (the prior of the 1-layer bound)."""
    return torch.arange(half_len // 2, half_len + 1)


def training_batch(cfg: InductionConfig, generator: torch.Generator | None = None) -> Tensor:
    """Sequences whose period is drawn per sequence from U[L/2, L] (so position alone cannot solve it)."""
    periods = training_periods(cfg.half_len)
    periods = torch.randint(int(periods[0]), int(periods[-1]) + 1, (cfg.batch_size,), generator=generator)
    return repeated_tokens(cfg.batch_size, cfg.half_len, cfg.vocab, periods, generator)


def eval_batch(cfg: InductionConfig, n: int = 256, seed: int = 1234) -> Tensor:
    """A fixed batch of exact repeats ``BOS r r`` (the evaluation distribution)."""
    return repeated_tokens(n, cfg.half_len, cfg.vocab, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ losses


def token_losses(logits: Tensor, tokens: Tensor) -> Tensor:  # [batch, pos-1]
    """Next-token cross-entropy at every position: loss of predicting tokens[:, i+1]."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")


def repeated_half_losses(logits: Tensor, tokens: Tensor, half_len: int) -> Tensor:  # [batch]
    """Per-sequence mean loss on the second copy's tokens r_1..r_{L-1} (indices L+2..2L)."""
    return token_losses(logits, tokens)[:, half_len + 1:].mean(1)


def repeated_half_loss(logits: Tensor, tokens: Tensor, half_len: int) -> Tensor:
    """Mean loss on the second copy's tokens r_1..r_{L-1} (indices L+2..2L)."""
    return repeated_half_losses(logits, tokens, half_len).mean()


def first_half_loss(logits: Tensor, tokens: Tensor, half_len: int) -> Tensor:
    """Mean loss on the first copy's tokens r_1..r_{L-1} (indices 2..L): not predictable."""
    return token_losses(logits, tokens)[:, 1:half_len].mean()


def position_only_loss(tokens: Tensor, half_len: int) -> float:
    """Repeated-half loss of a guess that uses relative position alone, on exact repeats.

    Trained with periods P in [L/2, L], the next token at index q + 1 sits P positions
    back, at index q + 1 - P; without knowing P, a model can name those candidates
    but not choose among them. This guesser spreads its probability evenly over the
    candidate positions (a token named twice gets twice the mass) and is what one
    attention layer can compute from positions alone: an upper bound on the loss of a
    converged one-layer control (2.29 nats on the evaluation batch at L = 20, V = 64: ln 11
    = 2.40 less the chance that two candidates are the same token), which may do better
    by weighting the candidates: the best weighting is
    :func:`mechscope.tasks.induction_bound.positional_bound`.
    """
    L, n_pos = half_len, tokens.shape[1]
    periods = training_periods(L)
    losses = []
    for q in range(L + 1, n_pos - 1):  # predictions of r_1..r_{L-1} of the second copy
        src = q + 1 - periods
        src = src[src >= 1]
        hits = (tokens[:, src] == tokens[:, q + 1, None]).float().sum(1) / len(src)  # [batch]
        losses.append(-hits.clamp_min(1e-12).log())
    return float(torch.stack(losses, 1).mean())


def train_induction(cfg: InductionConfig, log: Callable[[str], None] | None = None,
                    log_every: int = 500) -> tuple[Transformer, dict[str, Any]]:
    """Train by the recipe (AdamW, next-token loss on every position); returns model and history.

    The history records the repeated-half loss on a fixed evaluation batch every
    ``eval_every`` steps, and the *phase change*: the first step at which that loss falls
    below ln(V)/2 (half of the loss of a uniform guess), with the seconds it took.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = Transformer(cfg.model_config())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    evals = eval_batch(cfg)
    hist: dict[str, Any] = {"step": [], "repeated_half_loss": [], "first_half_loss": [],
                            "phase_change_step": None, "phase_change_seconds": None}
    start = time.perf_counter()
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            _record(model, evals, cfg, step, hist, time.perf_counter() - start)
            if log and step % log_every == 0:
                log(f"induction {cfg.n_layers}L step {step}: repeated-half loss {hist['repeated_half_loss'][-1]:.3f} "
                    f"({time.perf_counter() - start:.0f}s)")
        if step == cfg.steps:
            break
        tokens = training_batch(cfg, gen)
        loss = token_losses(model(tokens), tokens).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    hist["seconds"] = time.perf_counter() - start
    hist["steps_per_second"] = cfg.steps / max(hist["seconds"], 1e-9)
    return model.eval(), hist


def _record(model: Transformer, evals: Tensor, cfg: InductionConfig, step: int, hist: dict[str, Any], seconds: float) -> None:
    with torch.no_grad():
        logits = model(evals)
    rep = float(repeated_half_loss(logits, evals, cfg.half_len))
    hist["step"].append(step)
    hist["repeated_half_loss"].append(rep)
    hist["first_half_loss"].append(float(first_half_loss(logits, evals, cfg.half_len)))
    if hist["phase_change_step"] is None and rep < math.log(cfg.vocab) / 2:
        hist["phase_change_step"], hist["phase_change_seconds"] = step, seconds


def evaluate(model: Transformer, cfg: InductionConfig, n: int = 256, seed: int = 1234) -> dict[str, float]:
    tokens = eval_batch(cfg, n, seed)
    with torch.no_grad():
        logits = model(tokens)
    return {"repeated_half_loss": float(repeated_half_loss(logits, tokens, cfg.half_len)),
            "first_half_loss": float(first_half_loss(logits, tokens, cfg.half_len))}


def save(path: str | Path, model: Transformer, cfg: InductionConfig) -> None:
    save_module(path, model, cfg)


def load(path: str | Path | None = None, n_layers: int = 2) -> tuple[Transformer, InductionConfig]:
    """Load a checkpoint (default: the shipped model with ``n_layers`` layers) and its config."""
    path = checkpoint_path(n_layers) if path is None else path
    _, meta = load_tensors(path)
    cfg = InductionConfig.from_dict(meta["config"])
    model = Transformer(cfg.model_config())
    load_module_state(path, model)
    return model.eval(), cfg


# ------------------------------------------------------------------------------ circuit inputs


def corrupt_first_copy(tokens: Tensor, half_len: int, vocab: int, generator: torch.Generator | None = None) -> Tensor:
    """The same sequences with the first copy (indices 1..L) replaced by other random tokens,
    so the second copy is no longer predictable by induction (the corrupt input of patching)."""
    out = tokens.clone()
    fresh = torch.randint(1, vocab - 1, (tokens.shape[0], half_len), generator=generator)
    out[:, 1:half_len + 1] = fresh + (fresh >= tokens[:, 1:half_len + 1]).long()  # never the original token
    return out


def induction_metric(logits: Tensor, tokens: Tensor, half_len: int) -> Tensor:
    """Logit difference on the repeated half: the correct next token's logit minus the mean
    logit, averaged over the predictions of r_1..r_{L-1} (the spec's LD; unlike the
    log-probability it does not flatten out once the model is confident, which would
    starve attribution patching's gradients)."""
    pred = logits[:, half_len + 1:-1]  # [batch, L-1, vocab]: predictions of indices L+2..2L
    correct = pred.gather(-1, tokens[:, half_len + 2:, None])[..., 0]
    return (correct - pred.mean(-1)).mean()


# ------------------------------------------------------------------------------ hand-set model


def hand_set_model(vocab: int = 12, half_len: int = 6, sharpness: float = 30.0) -> tuple[Transformer, dict[str, Any]]:
    """A 2-layer, 4-head attention-only transformer whose induction circuit is set by hand.

    The residual stream is a sum of one-hot blocks: TOK (the token), POS (the position),
    PREV (the previous token), OUT (the prediction) and JUNK. The circuit is exactly
    ``L0H0`` (attends to the previous position, copies TOK into PREV) → the K input of
    ``L1H0`` (queries with TOK, keys with PREV, copies TOK into OUT); the unembedding
    reads OUT only. Decoys look like circuit parts but write only to JUNK: ``L0H1``
    (a previous-token pattern), ``L1H2`` (an induction pattern), ``L1H1`` (reads PREV).

    Returns the model and its ground truth: ``heads`` [(layer, head)] and ``edges``
    [(sender head, receiver head, "q"|"k"|"v")] of the circuit.
    """
    V, T, J = vocab, 2 * half_len + 1, 4
    dh = max(V, T)
    TOK, POS, PREV, OUT, JUNK = 0, V, V + T, 2 * V + T, 3 * V + T
    cfg = TransformerConfig(vocab=V, n_ctx=T, d_model=3 * V + T + J, n_layers=2, n_heads=4, d_head=dh,
                            d_mlp=None, layer_norm=False)
    model = Transformer(cfg)
    gen = torch.Generator().manual_seed(0)
    junk = torch.randn(J, dh, generator=gen)  # decoys write head dims -> JUNK through this
    beta = sharpness * math.sqrt(dh)  # scores are divided by sqrt(d_head)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.weight[torch.arange(V), TOK + torch.arange(V)] = 1.0
        model.pos_embed.weight[torch.arange(T), POS + torch.arange(T)] = 1.0
        model.unembed.weight[torch.arange(V), OUT + torch.arange(V)] = 10.0

        def head(layer: int, h: int, q: tuple | None, k: tuple | None, v: int, o: int | None) -> None:
            attn, rows = model.blocks[layer].attn, slice(h * dh, (h + 1) * dh)
            if q is not None:  # q/k: (residual offset, width, shift of the key's head dim)
                (qo, n), (ko, kn, shift) = q, k
                attn.q.weight[rows][torch.arange(n), qo + torch.arange(n)] = beta
                idx = torch.arange(kn - shift)
                attn.k.weight[rows][idx + shift, ko + idx] = 1.0
            attn.v.weight[rows][torch.arange(V), v + torch.arange(V)] = 1.0  # read the V-wide block at offset v
            if o is None:
                attn.o.weight[JUNK:JUNK + J, rows] = junk
            else:
                attn.o.weight[o + torch.arange(V), h * dh + torch.arange(V)] = 1.0

        head(0, 0, (POS, T), (POS, T, 1), TOK, PREV)   # previous-token head: key j answers query j+1
        head(0, 1, (POS, T), (POS, T, 1), TOK, None)   # decoy: the same pattern, writes JUNK
        head(0, 2, None, None, TOK, None)              # decoy: uniform attention
        head(0, 3, (POS, T), (POS, T, 0), TOK, None)   # decoy: attends to itself
        head(1, 0, (TOK, V), (PREV, V, 0), TOK, OUT)   # induction head: query token = key's previous token
        head(1, 1, None, None, PREV, None)             # decoy: reads PREV, writes JUNK
        head(1, 2, (TOK, V), (PREV, V, 0), TOK, None)  # decoy: the induction pattern, writes JUNK
        head(1, 3, None, None, TOK, None)              # decoy: uniform
    truth = {"heads": [(0, 0), (1, 0)], "edges": [((0, 0), (1, 0), "k")]}
    return model.eval(), truth


# ------------------------------------------------------------------------------ shipping


def train_and_ship(out_dir: Path, log: Callable[[str], None] = print, n_layers: int = 2) -> list[Path]:
    """``mechscope train induction``: the recipe's model, written as ``induction_{n}l.safetensors``
    with its training history beside it (``.json``)."""
    cfg = InductionConfig(n_layers=n_layers)
    model, hist = train_induction(cfg, log=log)
    path = Path(out_dir) / f"induction_{n_layers}l.safetensors"
    save(path, model, cfg)
    save_json_atomic(path.with_suffix(".json"), {"config": cfg.to_dict(), "history": hist, "eval": evaluate(model, cfg)})
    log(f"induction {n_layers}L: {hist['steps_per_second']:.1f} steps/s, phase change at step "
        f"{hist['phase_change_step']} ({hist['phase_change_seconds'] or float('nan'):.0f}s)")
    return [path, path.with_suffix(".json")]


def train_and_ship_1l(out_dir: Path, log: Callable[[str], None] = print) -> list[Path]:
    """``mechscope train induction_1l``: the one-layer control."""
    return train_and_ship(out_dir, log, n_layers=1)
