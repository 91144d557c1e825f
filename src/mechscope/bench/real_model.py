"""The reference real model of the real suite, loaded once per run, and next-token losses read
at the positions a metric needs without ever holding full logits.

The vocabulary has 262,144 entries: logits for every position of a batch are gigabytes, and
the unembedding of every position costs more than the rest of the forward. So a loss is
read from the last block's output (the stream before the final norm): the forward stops
there, and the final norm and unembedding run on the needed positions only, in chunks of
rows, each chunk reduced to log-sum-exp and the target's logit before the next one. That
this equals the model's own logits is checked once per model on a short input
(:meth:`mechscope.circuits.readout.Head.reproduces`), so a model whose forward does more
after its blocks (a final soft-cap) is refused rather than misread.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from mechscope.circuits.readout import Head, find_head
from mechscope.core.load import load_model, model_record
from mechscope.core.replay import chain
from mechscope.core.run import run

REFERENCE = "gemma-3-270m"
CHUNK_ROWS = 256  # rows unembedded at once: 256 x 262k float32 = 268 MB

_LOADED: dict[tuple[str, str], tuple[nn.Module, Any]] = {}
_HEADS: weakref.WeakKeyDictionary[nn.Module, Head] = weakref.WeakKeyDictionary()


def reference_model(ctx: Any) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of the reference model on ``ctx.device`` in ``ctx.dtype``, loaded once per process
    with eager attention (the only implementation that returns attention patterns, so that
    every row runs the same attention code), and recorded in the scoreboard's ``models``."""
    key = (ctx.device, ctx.dtype)
    if key not in _LOADED:
        ctx.log.info(f"loading {REFERENCE} ({ctx.dtype}, eager attention) on {ctx.device}")
        _LOADED[key] = load_model(REFERENCE, device=ctx.device, attn="eager", dtype=ctx.dtype)
    model, tok = _LOADED[key]
    ctx.record_model(model_record(REFERENCE, model))
    return model, tok


def checked_head(model: nn.Module, tokens: Tensor) -> Head:
    """The modules after the last block, checked once per model against the model's own
    logits on the first sequence's first 16 positions."""
    if model in _HEADS:
        return _HEADS[model]
    head = find_head(model)
    if head is None:
        raise RuntimeError(f"no final norm / unembedding was found after the blocks of {type(model).__name__}")
    probe = tokens[:1, :16]
    readout = list(range(probe.shape[1]))
    with torch.no_grad():
        out, acts = run(model, probe, cache=[head.anchor])
    if not head.reproduces(acts[head.anchor], readout, None, out.logits):
        raise RuntimeError(f"the final norm and unembedding applied to the last block's output do not reproduce "
                           f"{type(model).__name__}'s logits (a soft-cap or scaling after the blocks?); "
                           f"losses cannot be read from the stream")
    _HEADS[model] = head
    return head


def token_losses(model: nn.Module, tokens: Tensor, columns: slice, interventions: Any = None,
                 chunk: int = CHUNK_ROWS) -> Tensor:
    """Next-token losses ``[batch, len(columns)]`` (float64) where column t scores the
    prediction of ``tokens[:, t + 1]`` from position t, with ``interventions`` applied."""
    head = checked_head(model, tokens)
    with torch.no_grad():
        _, acts = run(model, tokens, interventions, cache=[head.anchor], stop_when_cached=True)
        stream = acts[head.anchor]  # [batch, pos, d_model]
        cols = list(range(tokens.shape[1] - 1))[columns]
        x = stream[:, cols].reshape(-1, stream.shape[-1])  # [batch * cols, d_model]
        targets = tokens[:, 1:][:, cols].reshape(-1).to(x.device)  # [batch * cols]
        out = []
        for xs, ts in zip(x.split(chunk), targets.split(chunk)):
            logits = chain(head.modules, xs.unsqueeze(0)).squeeze(0).float()  # [rows, vocab]
            out.append(torch.logsumexp(logits, -1) - logits.gather(-1, ts.unsqueeze(-1)).squeeze(-1))
    return torch.cat(out).view(tokens.shape[0], len(cols)).double().cpu()


__all__ = ["REFERENCE", "checked_head", "reference_model", "token_losses"]
