"""Steering toy: a small transformer that emits a token R exactly when a latent concept is present.

The language (no pretrained model needed). A sequence is ``BOS t_1 .. t_L Q``. Each
``t_i`` is a symbol 0..15, written either plainly (token ``s``) or *marked* (token
``16 + s``): the same symbol with the concept. Symbols count up (``t_{i+1} = t_i + 1 mod
16``) with probability 3/4 and are uniform otherwise; half of the sequences carry the
concept, with 1 to 3 marked tokens at random places. The model learns two things:

- at every content position, the next *symbol* (marks are unpredictable and ignored);
- at the query ``Q``: ``R`` when any token is marked (the concept), else ``N``.

The concept is planted, so its representation can be defined causally: for a
concept-free sequence and its twin with some tokens marked (same symbols), the mean of
h(twin) - h(sequence) at a site is the concept's direction there
(:func:`concept_direction`). Next-symbol predictions on concept-free inputs are the
unrelated behaviour that steering should leave alone (KL).

The shipped checkpoint ``zoo/checkpoints/steering_toy.safetensors`` is reproduced by
``mechscope train steering_toy`` (:func:`train`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechscope.core.collect import activations
from mechscope.steer.directions import paired_mean_difference
from mechscope.zoo.recipes import load_shipped, save_shipped, train_steps
from mechscope.zoo.transformer import Transformer, TransformerConfig

N_SYMBOLS = 16
BOS, Q, R, N = 32, 33, 34, 35
VOCAB = 36
LENGTH = 10  # content tokens
QUERY_POS = LENGTH + 1
CHECKPOINT = Path(__file__).resolve().parent.parent / "zoo" / "checkpoints" / "steering_toy.safetensors"
MODEL = TransformerConfig(vocab=VOCAB, n_ctx=16, d_model=64, n_layers=3, n_heads=4, d_head=16, d_mlp=128)


@dataclass(frozen=True)
class Recipe:
    """How the shipped model was trained (``quick`` variants are for tests)."""

    steps: int = 1500
    batch: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0


@dataclass(frozen=True)
class Batch:
    """``ids`` [batch, L+2]; ``concept`` [batch] bool; ``symbols`` [batch, L]."""

    ids: Tensor
    concept: Tensor
    symbols: Tensor


def _symbols(n: int, gen: torch.Generator) -> Tensor:  # [n, L]
    sym = torch.empty(n, LENGTH, dtype=torch.long)
    sym[:, 0] = torch.randint(N_SYMBOLS, (n,), generator=gen)
    for i in range(1, LENGTH):
        jump = torch.rand(n, generator=gen) < 0.25
        sym[:, i] = torch.where(jump, torch.randint(N_SYMBOLS, (n,), generator=gen), (sym[:, i - 1] + 1) % N_SYMBOLS)
    return sym


def _marks(n: int, gen: torch.Generator) -> Tensor:  # [n, L] bool, 1 to 3 marks per row
    count = torch.randint(1, 4, (n,), generator=gen)
    order = torch.rand(n, LENGTH, generator=gen).argsort(1).argsort(1)  # a random rank per position
    return order < count[:, None]


def _assemble(sym: Tensor, marks: Tensor) -> Tensor:
    n = sym.shape[0]
    content = sym + N_SYMBOLS * marks.long()
    return torch.cat([torch.full((n, 1), BOS), content, torch.full((n, 1), Q)], dim=1)


def sample(n: int, seed: int = 0, concept: bool | None = None) -> Batch:
    """``n`` sequences; ``concept`` None draws it with probability 1/2, else forces it."""
    gen = torch.Generator().manual_seed(seed)
    sym = _symbols(n, gen)
    has = torch.rand(n, generator=gen) < 0.5 if concept is None else torch.full((n,), bool(concept))
    marks = _marks(n, gen) & has[:, None]
    return Batch(_assemble(sym, marks), has, sym)


def pairs(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Matched ``(with_concept, without)`` ids [n, L+2]: the same symbols, 1-3 of them marked."""
    gen = torch.Generator().manual_seed(seed)
    sym = _symbols(n, gen)
    marks = _marks(n, gen)
    return _assemble(sym, marks), _assemble(sym, torch.zeros_like(marks))


def targets(batch: Batch) -> Tensor:  # [batch, L+2], -100 where nothing is predicted
    """Next symbol after BOS and each content token but the last; R / N at the query."""
    t = torch.full(batch.ids.shape, -100, dtype=torch.long)
    t[:, :LENGTH] = batch.symbols  # position i (BOS, t_1..t_{L-1}) predicts symbol of t_{i+1}
    t[:, QUERY_POS] = torch.where(batch.concept, R, N)
    return t


def build_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(MODEL)


def train(recipe: Recipe = Recipe(), log: Any = None) -> Transformer:
    """Train the steering toy from scratch (about a minute on one CPU thread)."""
    model = build_model(recipe.seed)

    def loss_at(step: int) -> Tensor:
        batch = sample(recipe.batch, seed=recipe.seed * 1_000_003 + step + 1)
        logits = model(batch.ids)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets(batch).reshape(-1))

    return train_steps(model, recipe, loss_at, pct_start=0.1, log=log)


def save(model: Transformer, path: Path = CHECKPOINT, recipe: Recipe = Recipe()) -> None:
    save_shipped(path, model, MODEL, recipe)


def load(path: Path = CHECKPOINT) -> Transformer:
    """The shipped (or a retrained) steering toy, in eval mode."""
    return load_shipped(path, MODEL, "steering-toy", "steering_toy")


# --------------------------------------------------------------------------- measures
@torch.no_grad()
def emits_r(logits: Tensor) -> Tensor:  # [batch, L+2, vocab] -> [batch] bool
    """Whether R is the top token at the query, per input."""
    return logits[:, QUERY_POS].float().argmax(-1) == R


@torch.no_grad()
def r_rate(logits: Tensor) -> dict[str, float]:
    """At the query: mean P(R) and the fraction of inputs whose top token is R."""
    q = logits[:, QUERY_POS].float().softmax(-1)  # [batch, vocab]
    return {"p_r": float(q[:, R].mean()), "argmax_r": float(emits_r(logits).double().mean())}


@torch.no_grad()
def content_kl_per_input(clean: Tensor, steered: Tensor) -> Tensor:  # -> [batch]
    """KL(clean || steered) of the next-symbol predictions, averaged over each input's content positions."""
    p = clean[:, :LENGTH].float().log_softmax(-1)
    q = steered[:, :LENGTH].float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean(-1)


@torch.no_grad()
def content_kl(clean: Tensor, steered: Tensor) -> float:
    """Mean KL(clean || steered) of the next-symbol predictions at the content positions."""
    return float(content_kl_per_input(clean, steered).mean())


@torch.no_grad()
def query_kl(clean: Tensor, steered: Tensor) -> float:
    """Mean KL(clean || steered) of the prediction at the query."""
    p = clean[:, QUERY_POS].float().log_softmax(-1)
    q = steered[:, QUERY_POS].float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def concept_direction(model: Transformer, site: Any, n: int = 2000, seed: int = 10_000) -> Tensor:
    """The planted concept's direction at ``site``: mean over matched pairs of h(marked) - h(plain)."""
    marked, plain = pairs(n, seed)
    return paired_mean_difference(activations(model, marked, site), activations(model, plain, site))


def train_and_ship(out_dir: Path, log: Any = None) -> list[Path]:
    """``mechscope train``'s entry: train by :class:`Recipe` and write the checkpoint into ``out_dir``."""
    recipe = Recipe()
    path = Path(out_dir) / CHECKPOINT.name
    save(train(recipe, log=log), path, recipe)
    return [path]
