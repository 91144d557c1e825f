"""Generation with interventions kept on every new token, on the model's KV cache.

``generate(model, tokenizer, prompts, interventions)`` left-pads the prompts, runs one
*prefill* forward over them, then one *decode* forward per new token on the model's KV
cache, with the interventions (the ``(Site, intervention)`` pairs of
:func:`mechscope.core.run.hooked`) registered on every forward.

What a site's positions mean while decoding:

- ``positions=None`` (all positions, the default for steering): every prompt position in
  the prefill and every new token in each decode step; the cached keys and values of the
  prompt carry the intervention into later steps.
- ``positions="last"``: the position whose logits choose each new token, i.e. the last
  prompt token in the prefill, then each fed-back new token in the decode steps.
- any other positions (ints, lists, slices, ``"first"``, index tensors, functions):
  *prompt* positions, resolved against the prompt's own attention mask (position 0 is each
  prompt's first real token under left padding) and applied in the prefill only; later
  tokens see their effect through the KV cache.

``use_cache=False`` recomputes the whole sequence at every step with the same meaning
(prompt positions at the same absolute indices, "last" at every position that chose a new
token), so the two agree up to float rounding; it is the check of the cached path and the
route for models without a KV cache. Greedy by default; ``do_sample=True`` samples with
``temperature`` and ``top_k`` from a generator seeded by ``seed``, so a run is reproducible.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mechscope.core.batch import collate
from mechscope.core.jsonl import check_token_ids, vocab_size
from mechscope.core.run import Interventions, as_pairs, hooked, logits_of
from mechscope.core.site import BatchInfo, Site, resolve_positions


@dataclass
class Generation:
    """What :func:`generate` returns.

    ``tokens [batch, n_new]`` are the new token ids (``pad_id`` after a row's EOS);
    ``lengths`` the number of new tokens of each row, its EOS included; ``texts`` the
    decoded continuations (None without a tokenizer); ``logits [batch, n_new, vocab]`` the
    logits that chose each new token, when asked for with ``return_logits=True``.
    """

    prompt: dict[str, Tensor]
    tokens: Tensor
    lengths: list[int]
    texts: list[str] | None
    logits: Tensor | None = None


def _prompt_ids(tokenizer: Any, prompts: Any) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        prompts = [prompts] if prompts.dim() <= 1 else list(prompts)  # [batch, pos]: one prompt a row
    elif isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("prompts are strings but no tokenizer was given; pass the tokenizer or token ids")
            ids = list(tokenizer(p)["input_ids"])
        else:
            ids = [int(t) for t in torch.as_tensor(p).flatten().tolist()]
        if not ids:
            raise ValueError(f"prompt {i} has no tokens; every prompt needs at least one")
        rows.append(ids)
    return rows


def _cache_kwarg(model: nn.Module) -> str | None:
    """The forward's KV-cache argument: ``cache`` (transformers >= 5.2x), ``past_key_values``, or None."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def _forward(model: nn.Module, ids: Tensor, mask: Tensor, pos: Tensor, kv: str | None, past: Any,
             use_cache: bool) -> tuple[Tensor, Any]:
    """Logits ``[batch, n, vocab]`` and the updated cache."""
    params = inspect.signature(model.forward).parameters
    if "attention_mask" not in params:  # a plain module: tokens in, logits out
        if not bool(mask.all()):
            raise ValueError(f"{type(model).__name__}.forward takes no attention_mask, so prompts of different "
                             "lengths cannot be padded for it; generate from one prompt at a time")
        return logits_of(model(ids)), None
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in params:
        kwargs["position_ids"] = pos
    if use_cache and kv is not None:
        kwargs["use_cache"] = True
        if past is not None:
            kwargs[kv] = past
    elif "use_cache" in params:
        kwargs["use_cache"] = False
    out = model(**kwargs)
    new_past = (getattr(out, "cache", None) or getattr(out, "past_key_values", None)) if use_cache else None
    return logits_of(out), new_past


def _choose(logits: Tensor, do_sample: bool, temperature: float, top_k: int | None, gen: torch.Generator) -> Tensor:
    """Next token ``[batch]`` from last-position logits ``[batch, vocab]``."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(logits.device)


def _split(items: list[tuple[Site, Any]]) -> tuple[list, list, list]:
    """(all-position items, "last" items, prompt-position items)."""
    every = [(s, f) for s, f in items if s.positions is None]
    last = [(s, f) for s, f in items if s.positions == "last"]
    prompt = [(s, f) for s, f in items if s.positions is not None and s.positions != "last"]
    return every, last, prompt


def _absolute(items: list[tuple[Site, Any]], mask: Tensor) -> list[tuple[Site, Any]]:
    """Prompt-position sites with their positions resolved once, against the prompt's mask,
    to absolute indices (for the recomputing path, where the sequence grows)."""
    info = BatchInfo(seq_len=mask.shape[1], attention_mask=mask)
    probe = torch.empty(mask.shape[0], mask.shape[1], 1)
    return [(s.replace(positions=resolve_positions(s.positions, probe, info, s)), f) for s, f in items]


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: str | Sequence[str] | Sequence[Sequence[int]] | Tensor,
    interventions: Interventions | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    *,
    use_cache: bool = True,
    stop_at_eos: bool = True,
    pad_id: int | None = None,
    return_logits: bool = False,
) -> Generation:
    """Continue ``prompts`` by ``max_new_tokens`` tokens with ``interventions`` on every forward.

    Prompts are strings (tokenised with ``tokenizer``, its special tokens included, so a
    BOS is prepended where the tokenizer adds one) or token-id lists; a batch is left-padded.
    See the module docstring for what a site's positions mean while decoding.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if pad_id is None:
        pad_id = next((t for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                       if t is not None), 0)
    eos = getattr(tokenizer, "eos_token_id", None) if stop_at_eos else None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch = {k: v.to(device) for k, v in collate(_prompt_ids(tokenizer, prompts), pad_id=pad_id, side="left").items()}
    check_token_ids(batch["input_ids"], vocab_size(model), "prompt")
    items = as_pairs(interventions)
    kv = _cache_kwarg(model) if use_cache else None
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if kv is not None:
            tokens, chosen = _decode_cached(model, batch, items, kv, max_new_tokens, do_sample, temperature, top_k,
                                            gen, eos, pad_id)
        else:
            tokens, chosen = _decode_recompute(model, batch, items, max_new_tokens, do_sample, temperature, top_k,
                                               gen, eos, pad_id)
    new = torch.stack(tokens, 1) if tokens else batch["input_ids"].new_zeros(batch["input_ids"].shape[0], 0)
    lengths = _lengths(new, eos)
    texts = None
    if tokenizer is not None and hasattr(tokenizer, "decode"):
        texts = [tokenizer.decode(new[i, :n].tolist(), skip_special_tokens=True) for i, n in enumerate(lengths)]
    logits = torch.stack(chosen, 1) if return_logits and chosen else None
    return Generation(prompt=batch, tokens=new, lengths=lengths, texts=texts, logits=logits)


def _lengths(new: Tensor, eos: int | None) -> list[int]:
    out = []
    for row in new.tolist():
        out.append(row.index(eos) + 1 if eos is not None and eos in row else len(row))
    return out


class _Stepper:
    """Chooses each next token and tracks which rows have ended (emitted EOS)."""

    def __init__(self, batch: int, device: torch.device, sample: tuple, eos: int | None, pad_id: int) -> None:
        self.sample, self.eos, self.pad_id = sample, eos, pad_id
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.tokens: list[Tensor] = []
        self.logits: list[Tensor] = []

    def step(self, last_logits: Tensor) -> Tensor:
        self.logits.append(last_logits)
        nxt = _choose(last_logits, *self.sample)
        nxt = torch.where(self.done, torch.full_like(nxt, self.pad_id), nxt)
        if self.eos is not None:
            self.done |= nxt == self.eos
        self.tokens.append(nxt)
        return nxt

    @property
    def finished(self) -> bool:
        return bool(self.done.all())


def _decode_cached(model, batch, items, kv, n_new, do_sample, temperature, top_k, gen, eos, pad_id):
    every, last, _ = _split(items)
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    stepper = _Stepper(ids.shape[0], ids.device, (do_sample, temperature, top_k, gen), eos, pad_id)
    if n_new == 0:
        return [], []
    with hooked(model, items, batch=BatchInfo(seq_len=ids.shape[1], attention_mask=mask)):
        logits, past = _forward(model, ids, mask, pos, kv, None, True)
    nxt = stepper.step(logits[:, -1])
    decode_items = every + last  # each decode forward is one new token: all positions = "last"
    for _ in range(n_new - 1):
        if stepper.finished:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        with hooked(model, decode_items, batch=BatchInfo(seq_len=1)):
            logits, past = _forward(model, nxt[:, None], mask, pos, kv, past, True)
        nxt = stepper.step(logits[:, -1])
    return stepper.tokens, stepper.logits


def _decode_recompute(model, batch, items, n_new, do_sample, temperature, top_k, gen, eos, pad_id):
    every, last, prompt = _split(items)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    fixed = every + _absolute(prompt, mask)
    stepper = _Stepper(ids.shape[0], ids.device, (do_sample, temperature, top_k, gen), eos, pad_id)
    n_prompt = ids.shape[1]
    for step in range(n_new):
        if stepper.finished:
            break
        rows = ids.shape[0]
        lasts = [(s.replace(positions=torch.full((rows, 1), n_prompt - 1 + j, dtype=torch.long)), f)
                 for j in range(step + 1) for s, f in last]
        pos = (mask.cumsum(1) - 1).clamp(min=0) * mask
        with hooked(model, fixed + lasts, batch=BatchInfo(seq_len=ids.shape[1], attention_mask=mask)):
            logits, _ = _forward(model, ids, mask, pos, None, None, False)
        nxt = stepper.step(logits[:, -1])
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return stepper.tokens, stepper.logits


__all__ = ["Generation", "generate"]
