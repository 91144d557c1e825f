"""Indirect-object identification prompts and scores for the real suite (issue 20, row 2):
pure functions, no model, tested in CI.

- :func:`ioi_prompts`: templated prompts written for this project, "When Mary and John went
  to the store, John gave a drink to" (the indirect object, IO, is the name that does not
  repeat; the subject S repeats at S2), each with a corrupted counterpart that swaps which
  name repeats (S2 becomes the IO, so the answer flips). Every word of the template is one
  fixed slot, so that all prompts have the same token length and positions align across
  prompts (patching needs aligned positions); :func:`check_layout` verifies that with the
  model's tokenizer. The names come in both orders (IO first, "ABB", and IO second, "BAB"),
  so that the first-mentioned name is not always the answer.
- :func:`shift_score`: the pre-registered summary of a (layer x position) residual patching
  map: the first layer at which the final position carries more than half of the summed
  |effect| over positions, minus the layer where the S2 position's |effect| peaks.
- :func:`top_share`: the share of the summed |effect| carried by the top fraction of heads.
- :func:`pearson`: the correlation of two score vectors.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

NAMES = ["Mary", "John", "Alice", "Bob", "James", "Sarah", "Tom", "Anna", "David", "Emma", "Paul", "Laura", "Mark", "Kate", "Peter", "Lucy", "Adam", "Jane", "Mike", "Rose", "Daniel", "Grace", "Jack", "Lisa", "Ryan", "Amy", "Sam", "Helen", "Eric", "Chris", "Michael", "Robert", "Linda", "Susan", "Kevin", "Brian", "George", "Emily", "Anne", "Martin"]
PLACES = ["store", "park", "school", "office", "beach", "house", "garden", "station", "library", "hospital", "market", "restaurant", "church", "bank", "hotel", "cafe", "river", "lake", "museum", "zoo", "farm"]
OBJECTS = ["drink", "book", "ball", "gift", "letter", "key", "pen", "bag", "ring", "cake", "flower", "bottle", "ticket", "phone", "card", "coin", "hat", "map", "toy"]
OPENERS = ("When", "After", "While")  # the first word: no leading space after BOS
MOVES = ("went", "walked", "ran", "got")
GIVES = ("gave", "handed", "passed", "brought", "sent", "showed", "offered", "sold")
# slots in token order after BOS: opener, N1, and, N2, move, to, the, place, ",", S2, give, a, object, to
TEMPLATE = "{opener} {n1} and {n2} {move} to the {place}, {s2} {give} a {obj} to"
SINGLE = {"names": NAMES, "places": PLACES, "objects": OBJECTS, "moves": MOVES, "gives": GIVES}
N_TOKENS = 15  # BOS + the 14 slots above
S2_POS, FINAL_POS = 10, 14  # positions with BOS at 0 (the names sit at 2 and 4)


@dataclass(frozen=True)
class IOIPrompt:
    clean: str
    corrupt: str  # the same prompt with S2 replaced by the IO: the other name repeats
    io: str  # the clean answer (the name said once)
    s: str  # the repeated name of the clean prompt
    order: str  # "ABB" (IO first) or "BAB" (IO second)


def ioi_prompts(n: int, seed: int) -> list[IOIPrompt]:
    """``n`` distinct prompts, half with the IO named first ("ABB"), half second ("BAB")."""
    if n < 2:
        raise ValueError(f"n must be at least 2, got {n}")
    rng = random.Random(seed)
    out: list[IOIPrompt] = []
    seen: set[str] = set()
    while len(out) < n:
        io, s = rng.sample(NAMES, 2)
        order = "ABB" if len(out) % 2 == 0 else "BAB"
        n1, n2 = (io, s) if order == "ABB" else (s, io)
        slots = {"opener": rng.choice(OPENERS), "n1": n1, "n2": n2, "move": rng.choice(MOVES),
                 "place": rng.choice(PLACES), "give": rng.choice(GIVES), "obj": rng.choice(OBJECTS)}
        clean = TEMPLATE.format(s2=s, **slots)
        if clean in seen:
            continue
        seen.add(clean)
        out.append(IOIPrompt(clean, TEMPLATE.format(s2=io, **slots), io, s, order))
    return out


def single_token_words(tokenizer: Any) -> dict[str, list[str]]:
    """Words of the slot lists that are NOT one token with a leading space (empty lists: all fine)."""
    bad: dict[str, list[str]] = {}
    for group, words in SINGLE.items():
        bad[group] = [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) != 1]
    bad["openers"] = [w for w in OPENERS if len(tokenizer(w, add_special_tokens=False)["input_ids"]) != 1]
    return bad


def check_layout(ids: Tensor, prompts: Sequence[IOIPrompt], name_id: dict[str, int]) -> None:
    """Refuse a tokenisation where prompts differ in length or the names are not where the
    template puts them (``ids``: [n, N_TOKENS] of the clean prompts, BOS first)."""
    if ids.dim() != 2 or ids.shape[1] != N_TOKENS:
        raise ValueError(f"IOI prompts must all be {N_TOKENS} tokens (BOS + 14 slots), got shape {list(ids.shape)}")
    for i, p in enumerate(prompts):
        io_pos = 2 if p.order == "ABB" else 4
        s1_pos = 6 - io_pos
        want = {io_pos: p.io, s1_pos: p.s, S2_POS: p.s}
        for pos, name in want.items():
            if int(ids[i, pos]) != name_id[name]:
                raise ValueError(f"prompt {i} ({p.clean!r}): position {pos} is not {name!r}")


def shift_score(effects: Tensor, s2: int, final: int) -> tuple[int, int | None, int]:
    """``(score, takeover, peak)`` of a patching map ``effects [layers, positions]``:
    ``takeover``, the first layer where the final position's share of the summed |effect|
    over positions exceeds 0.5 (None: never); ``peak``, the layer where |effect| at ``s2``
    is largest (the first such layer). ``score = takeover - peak``, or ``-n_layers`` when
    the final position never takes over, so that a positive score is the pre-registered
    "moves from S2 to the final position"."""
    a = effects.abs().double()
    total = a.sum(1)  # [layers]
    share = torch.where(total > 0, a[:, final] / total.clamp_min(1e-300), torch.zeros_like(total))
    over = torch.nonzero(share > 0.5).flatten()
    peak = int(torch.argmax(a[:, s2]))  # argmax returns the first maximal index
    takeover = int(over[0]) if over.numel() else None
    score = takeover - peak if takeover is not None else -effects.shape[0]
    return score, takeover, peak


def final_share(effects: Tensor, final: int) -> Tensor:
    """``[layers]``: the final position's share of the summed |effect| over positions."""
    a = effects.abs().double()
    return a[:, final] / a.sum(1).clamp_min(1e-300)


def top_count(n: int, fraction: float = 0.1) -> int:
    """How many heads "the top ``fraction``" is: rounded down (7 of 72 at 10 %), at least one."""
    return max(1, math.floor(fraction * n + 1e-9))


def top_share(effects: Tensor, fraction: float = 0.1) -> float:
    """Share of the summed |effect| carried by the top ``fraction`` of cells by |effect|."""
    a = effects.abs().double().flatten()
    total = float(a.sum())
    if total <= 0:
        return 0.0
    k = top_count(a.numel(), fraction)
    return float(torch.topk(a, k).values.sum()) / total


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two vectors (0.0 when either is constant)."""
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() != y.numel() or x.numel() < 2:
        raise ValueError(f"pearson needs two vectors of the same length >= 2, got {x.numel()} and {y.numel()}")
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else 0.0


def effects_from(values: Tensor, clean: Tensor, corrupt: Tensor) -> Tensor:
    """Normalised denoising effects ``[cells]`` from per-prompt metrics: ``values [prompts,
    cells]`` after each patch, ``clean``/``corrupt`` ``[prompts]``; the metric is a mean over
    prompts, so the effect of a set of prompts is computed from their means."""
    c, k = float(clean.double().mean()), float(corrupt.double().mean())
    return (values.double().mean(0) - k) / (c - k)


__all__ = [
    "FINAL_POS",
    "N_TOKENS",
    "S2_POS",
    "IOIPrompt",
    "check_layout",
    "effects_from",
    "final_share",
    "ioi_prompts",
    "pearson",
    "shift_score",
    "single_token_words",
    "top_count",
    "top_share",
]
