"""Data and selections of the real-model suite that need no model: pure functions, tested in CI.

- :func:`frequent_ids`: the vocabulary subset the induction row draws from, as the issue
  asks: the corpus's ``n`` most frequent tokens (special tokens left out).
- :func:`ascii_word_ids`: the stand-in where the corpus is not installed: the first ``n``
  token ids whose piece is a word start made of plain lowercase ASCII letters (``"▁the"``, ``"▁keyboard"``). A SentencePiece BPE vocabulary
  numbers its pieces in merge order, and merges follow frequency in the tokenizer's
  training text, so low ids stand in for frequent tokens; the ASCII filter keeps out
  the multilingual, byte and unused pieces whose embeddings a random draw over 262k ids
  would mostly hit.
- :func:`repeated_tokens`: BOS, then ``period`` tokens drawn without replacement, repeated once.
- :func:`top_heads` and :func:`control_draws`: the heads an ablation removes, and the
  random control heads drawn from those with a low stripe score.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

WORD_PIECE = re.compile(r"^\u2581[a-z]{2,}$")  # SentencePiece's word-start mark, then >= 2 ASCII letters


def frequent_ids(tokens: Iterable[int], n: int = 10_000, exclude: Iterable[int] = ()) -> list[int]:
    """The ``n`` most frequent ids of ``tokens`` (ties: lower id first), without ``exclude``."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    skip = set(exclude)
    counts = Counter(t for t in tokens if t not in skip)
    if len(counts) < n:
        raise ValueError(f"the corpus holds only {len(counts)} distinct tokens, {n} were asked for")
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def ascii_word_ids(pieces: Sequence[str], n: int = 10_000) -> list[int]:
    """The first ``n`` ids (in id order) whose piece is a word start of lowercase ASCII letters."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    ids = [i for i, p in enumerate(pieces) if isinstance(p, str) and WORD_PIECE.match(p)]
    if len(ids) < n:
        raise ValueError(f"only {len(ids)} pieces are plain ASCII word starts, {n} were asked for")
    return ids[:n]


def repeated_tokens(pool: Sequence[int], n_seqs: int, period: int, bos: int, seed: int) -> Tensor:
    """``[n_seqs, 1 + 2 * period]``: BOS, then ``period`` distinct tokens of ``pool``, repeated once.

    Distinct within a copy, so that every query of the repeat has one earlier occurrence
    and the stripe offset is unambiguous. Seeded by ``seed`` alone (not the global generator).
    """
    if period < 2 or period > len(pool):
        raise ValueError(f"period must lie in 2..{len(pool)} (the pool's size), got {period}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.as_tensor(list(pool), dtype=torch.long)
    rows = [ids[torch.randperm(len(ids), generator=gen)[:period]] for _ in range(n_seqs)]
    first = torch.stack(rows)  # [n_seqs, period]
    bos_col = torch.full((n_seqs, 1), bos, dtype=torch.long)
    return torch.cat([bos_col, first, first], dim=1)


def half_slices(period: int) -> tuple[slice, slice]:
    """Columns of per-position losses ``[batch, 2 * period]`` (column t predicts token t + 1)
    that score the first copy's tokens r_2..r_P and the second copy's r_2..r_P.

    The first token of each copy is left out of both: nothing predicts r_1 in either copy.
    """
    return slice(1, period), slice(period + 1, 2 * period)


def top_heads(scores: Tensor, k: int) -> list[tuple[int, int]]:
    """The ``k`` (layer, head) pairs with the highest score in ``scores [layers, heads]``, best first."""
    flat = scores.flatten()
    order = torch.argsort(flat, descending=True, stable=True)[:k].tolist()
    return [divmod(i, scores.shape[1]) for i in order]


def control_draws(scores: Tensor, k: int, below: float, draws: int, seed: int,
                  exclude: Sequence[tuple[int, int]] = ()) -> tuple[list[tuple[int, int]], list[list[tuple[int, int]]]]:
    """The eligible heads (score < ``below``, not in ``exclude``) and ``draws`` random sets of
    ``k`` of them, each sorted; no sets when fewer than ``k`` are eligible."""
    skip = set(exclude)
    eligible = [(layer, h) for layer in range(scores.shape[0]) for h in range(scores.shape[1])
                if float(scores[layer, h]) < below and (layer, h) not in skip]
    if len(eligible) < k:
        return eligible, []
    gen = torch.Generator().manual_seed(seed)
    sets = [sorted(eligible[i] for i in torch.randperm(len(eligible), generator=gen)[:k].tolist())
            for _ in range(draws)]
    return eligible, sets


__all__ = ["WORD_PIECE", "ascii_word_ids", "frequent_ids", "control_draws", "half_slices", "repeated_tokens", "top_heads"]
