"""Pure helpers of the real suite's steering and probe rows (issue 20, rows 4 and 5): no model,
tested in CI (``tests/bench/test_real_text_data.py``).

Steering (row 4):

- :func:`steps` and :func:`min_step`: "rises monotonically over the coefficients" made a
  number, the smallest rise between consecutive coefficients of the mean effect;
- :func:`matched_coefficient`: the steering coefficient whose KL on unrelated text equals a
  target KL (the prompting prefix's), by bisection on an increasing KL curve.

Probes (row 5), on SentencePiece pieces (``"\u2581"`` marks a word start):

- :func:`piece_text`, :func:`is_capitalised`, :func:`is_digit`, :func:`word_class_labels` and
  :func:`token_property_labels`: the three token-level properties;
- :func:`best_index` (the layer chosen on validation) and :func:`balanced_selectivity`
  (task minus control balanced accuracy on the same test tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
from torch import Tensor

from mechscope.core.jsonl import DataError
from mechscope.core.text import text_windows
from mechscope.probe.linear import balanced_accuracy

WORD_START = "\u2581"
# English prepositions, written before the first run; a whole word only (see word_class_labels)
PREPOSITIONS = frozenset({
    "about", "above", "across", "after", "against", "along", "among", "around", "at", "before", "behind", "below",
    "beneath", "beside", "besides", "between", "beyond", "by", "despite", "down", "during", "except", "for", "from",
    "in", "inside", "into", "like", "near", "of", "off", "on", "onto", "out", "outside", "over", "past", "since",
    "through", "throughout", "till", "to", "toward", "towards", "under", "underneath", "until", "unto", "up", "upon",
    "via", "with", "within", "without"})
PROPERTIES = ("capitalised", "digit", "preposition")


# -- steering ----------------------------------------------------------------------------------
def steps(means: Sequence[float]) -> list[float]:
    """Rises between consecutive entries of ``means`` (one per coefficient, in coefficient order)."""
    if len(means) < 2:
        raise ValueError(f"monotonicity needs at least 2 coefficients, got {len(means)}")
    return [float(b) - float(a) for a, b in pairwise(means)]


def min_step(per_example: Tensor) -> Tensor:
    """The smallest rise of the mean over examples between consecutive coefficients, from
    ``per_example [n, coeffs]``: > 0 exactly when the mean rises strictly at every step."""
    m = per_example.double().mean(0)
    return (m[1:] - m[:-1]).min()


def matched_coefficient(kl_at: Callable[[float], float], target: float, hi: float, *, rel_tol: float = 0.02,
                        max_iter: int = 20) -> tuple[float, float, bool]:
    """``(c, kl_at(c), matched)``: the coefficient in ``[0, hi]`` whose KL equals ``target``,
    found by bisection (the KL is assumed to rise with the coefficient, and ``kl_at(0) == 0``).

    ``matched`` is False when ``target`` exceeds ``kl_at(hi)`` (then ``c = hi``) or when
    ``max_iter`` halvings did not bring the KL within ``rel_tol`` of ``target``.
    """
    if target <= 0 or hi <= 0:
        raise ValueError(f"target KL and the largest coefficient must be positive, got {target} and {hi}")
    top = kl_at(hi)
    if top < target * (1 - rel_tol):
        return hi, top, False
    lo, up, best = 0.0, hi, (hi, top)
    for _ in range(max_iter):
        mid = (lo + up) / 2
        kl = kl_at(mid)
        if abs(kl - target) < abs(best[1] - target):
            best = (mid, kl)
        if abs(kl - target) <= rel_tol * target:
            return mid, kl, True
        lo, up = (mid, up) if kl < target else (lo, mid)
    return best[0], best[1], abs(best[1] - target) <= rel_tol * target


# -- token properties ---------------------------------------------------------------------------
def piece_text(piece: str) -> str:
    """A piece without its word-start mark."""
    return piece[1:] if piece.startswith(WORD_START) else piece


def is_capitalised(piece: str) -> bool:
    """The piece's first character (after the word-start mark) is an uppercase letter."""
    text = piece_text(piece)
    return bool(text) and text[0].isupper()


def is_digit(piece: str) -> bool:
    """The piece (after the word-start mark) is one or more ASCII digits."""
    text = piece_text(piece)
    return bool(text) and text.isascii() and text.isdigit()


def _continues_word(piece: str | None) -> bool:
    """Whether ``piece`` continues the word before it: no word-start mark and begins with a letter."""
    return piece is not None and not piece.startswith(WORD_START) and piece[:1].isalpha()


def word_class_labels(pieces: Sequence[str], words: frozenset[str] = PREPOSITIONS) -> list[bool]:
    """Per piece: it is a whole word of ``words`` (case-insensitive), i.e. it starts a word (or the
    text), its text is in the list, and the next piece does not continue it ("▁to" + "ne" is
    "tone", not "to"). The last piece of a sequence is taken to end its word."""
    out = []
    for i, piece in enumerate(pieces):
        starts = i == 0 or piece.startswith(WORD_START) or not pieces[i - 1][-1:].isalpha()
        nxt = pieces[i + 1] if i + 1 < len(pieces) else None
        out.append(starts and piece_text(piece).lower() in words and not _continues_word(nxt))
    return out


def token_property_labels(pieces: Sequence[str]) -> Tensor:
    """``[n, 3]`` long labels (0/1) of :data:`PROPERTIES` for consecutive pieces of one text."""
    cap = [is_capitalised(p) for p in pieces]
    dig = [is_digit(p) for p in pieces]
    return torch.tensor([cap, dig, word_class_labels(pieces)], dtype=torch.long).T


# -- corpus text ---------------------------------------------------------------------------------
def spaced_windows(files: Sequence[object], tokenizer: object, n: int, seq_len: int, skip: int = 1) -> Tensor:
    """``[n, seq_len]`` windows (``[BOS] + seq_len - 1`` tokens) from ``n`` files spread evenly over
    ``files`` (sorted), the window after the first ``skip`` of each: a small sample of the whole
    corpus rather than its first files, and past each file's title block. A file too short for
    ``skip + 1`` windows is passed over for the next one."""
    ordered = sorted(files, key=str)
    if n < 1 or n > len(ordered):
        raise ValueError(f"n must lie in 1..{len(ordered)} (the number of files), got {n}")
    out: list[Tensor] = []
    start = 0
    for k in range(n):
        i = max(start, k * len(ordered) // n)
        while i < len(ordered):
            got = _first_windows(ordered[i], tokenizer, seq_len, skip + 1)
            i += 1
            if len(got) > skip:
                out.append(got[skip])
                break
        start = i
    if len(out) < n:
        raise ValueError(f"only {len(out)} of {len(ordered)} files hold {skip + 1} windows of {seq_len} tokens")
    return torch.stack(out)


def _first_windows(path: object, tokenizer: object, seq_len: int, k: int) -> list[Tensor]:
    """Up to ``k`` first windows of one file; none when it is shorter than one window."""
    try:
        return list(text_windows(str(path), tokenizer, seq_len, max_windows=k))
    except DataError:
        return []


# -- probe selection and scoring -------------------------------------------------------------------
def best_index(scores: Sequence[float]) -> int:
    """Index of the highest score (the first on ties): the layer chosen on validation."""
    if not len(scores):
        raise ValueError("no scores to choose from")
    values = [float(s) for s in scores]
    return values.index(max(values))


def balanced_selectivity(rows: Tensor) -> Tensor:
    """Task balanced accuracy minus control balanced accuracy on the same tokens, from
    ``rows [n, 4]`` = (task prediction, task label, control prediction, control label)."""
    r = rows.long()
    return (balanced_accuracy(r[:, 0], r[:, 1]) - balanced_accuracy(r[:, 2], r[:, 3]))[0].double()


__all__ = ["PREPOSITIONS", "PROPERTIES", "WORD_START", "balanced_selectivity", "best_index", "is_capitalised",
           "is_digit", "matched_coefficient", "min_step", "piece_text", "spaced_windows", "steps",
           "token_property_labels", "word_class_labels"]
