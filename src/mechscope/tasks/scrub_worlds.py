"""Causal-scrubbing graphs and hypotheses of the built-in worlds (where a world meets ``causal.scrub``).

Induction (Chan et al. 2022's case, on the 2-layer attention-only model): the graph's nodes
are every layer-0 head's output and, for every layer-1 head, its queries, keys, values
and output (each a site on that head alone); the output reads every head. The hypothesis
``k_composition``: the output depends on the induction heads (layer-1 heads with stripe
score > 0.5, the bench's criterion); each reads its queries, keys and values; the keys read
the previous-token heads (layer-0 heads with previous-token score > 0.2, far above the
~0.05 of a head spread over the sequence), queries and values the current token only (the
embedding: no layer-0 head). Every other path is resampled from another sequence. The
deliberately wrong ``q_composition`` moves the previous-token heads from the keys to the
queries. On random repeated sequences "agreeing on the previous token at every position"
is the sequence itself, so every claimed node keeps its input (key ``None``): the claims
are about which paths matter.

Hierarchical equality (the trained MLP): the graph is the chain ``hidden.0 -> hidden.1 ->
hidden.2 -> output``. The causal model's hypothesis: hidden.2 carries O, hidden.1 carries
(WX, YZ), hidden.0 the input; the rivals claim hidden.1 carries WX alone (or YZ alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mechscope.causal.scrub import Claim, ModelGraph, Node, ScrubHypothesis
from mechscope.circuits.heads import induction_score, previous_token_score
from mechscope.core.run import cache
from mechscope.core.site import Site
from mechscope.tasks import hierarchical_equality as he
from mechscope.tasks import induction

INDUCTION_MIN = 0.5  # stripe score of an induction head (bench/induction_checks' criterion)
PREV_TOKEN_MIN = 0.2  # previous-token score of a previous-token head


@dataclass(frozen=True, eq=False)
class ScrubWorld:
    """A model, its pool of inputs, its graph, the per-input loss and named hypotheses."""

    name: str
    model: nn.Module
    inputs: Tensor  # [n, ...] the pool
    graph: ModelGraph
    loss: Any  # (output, rows) -> [b]
    hypotheses: dict[str, ScrubHypothesis]
    detail: dict[str, Any]
    keys: dict[str, Tensor]  # what a node may carry, by name: [n] per input of the pool (hypothesis files name them)


def _head(path: str, h: int, d_head: int, io: str = "output") -> Site:
    return Site(path, io=io, heads=(h,), head_dim=d_head)


def induction_graph(n_heads: int, d_head: int) -> ModelGraph:
    """Every layer-0 head -> q, k, v of every layer-1 head -> that head -> the output (which reads every head)."""
    l0 = [Node(f"L0H{h}", _head("blocks.0.attn.o", h, d_head, "input")) for h in range(n_heads)]
    parents = tuple(n.name for n in l0)
    l1: list[Node] = []
    for h in range(n_heads):
        qkv = [Node(f"L1H{h}.{p}", _head(f"blocks.1.attn.{p}", h, d_head), parents) for p in "qkv"]
        l1 += [*qkv, Node(f"L1H{h}", _head("blocks.1.attn.o", h, d_head, "input"), tuple(n.name for n in qkv))]
    return ModelGraph((*l0, *l1), (*parents, *(f"L1H{h}" for h in range(n_heads))))


def head_roles(model: nn.Module, tokens: Tensor, half_len: int) -> tuple[list[int], list[int], dict[str, list]]:
    """(previous-token heads of layer 0, induction heads of layer 1, their scores)."""
    sites = [Site(f"blocks.{layer}.attn.pattern") for layer in (0, 1)]
    pats = cache(model, tokens, sites)
    prev = previous_token_score(pats[sites[0]])  # [n_heads]
    stripe = induction_score(pats[sites[1]], half_len)
    return ([h for h, s in enumerate(prev.tolist()) if s > PREV_TOKEN_MIN],
            [h for h, s in enumerate(stripe.tolist()) if s > INDUCTION_MIN],
            {"previous_token_L0": prev.tolist(), "induction_stripe_L1": stripe.tolist()})


def composition(name: str, prev_heads: list[int], ind_heads: list[int], reads_prev: str) -> ScrubHypothesis:
    """Induction heads whose ``reads_prev`` input ("k" or "q") reads the previous-token heads; the
    other two inputs read the current token only."""
    claims = {f"L0H{h}": Claim() for h in prev_heads}
    for h in ind_heads:
        claims[f"L1H{h}"] = Claim(tuple(f"L1H{h}.{p}" for p in "qkv"))
        for p in "qkv":
            claims[f"L1H{h}.{p}"] = Claim(tuple(f"L0H{g}" for g in prev_heads) if p == reads_prev else ())
    return ScrubHypothesis(name, tuple(f"L1H{h}" for h in ind_heads), claims)


def induction_world(n: int = 128, seed: int = 1234, model: nn.Module | None = None) -> ScrubWorld:
    """The 2-layer induction model (``model``, or the shipped one) on ``n`` evaluation sequences;
    loss: the repeated half's."""
    shipped, cfg = induction.load(n_layers=2)
    model = shipped if model is None else model
    tokens = induction.eval_batch(cfg, n, seed)  # [n, 2L+1]
    prev, ind, scores = head_roles(model, tokens, cfg.half_len)

    def loss(logits: Tensor, rows: Tensor) -> Tensor:  # [b]
        return induction.repeated_half_losses(logits, tokens[rows], cfg.half_len)

    hyps = {"k_composition": composition("k_composition", prev, ind, "k"),
            "q_composition": composition("q_composition", prev, ind, "q")}
    return ScrubWorld("induction", model, tokens, induction_graph(cfg.n_heads, cfg.d_head), loss, hyps,
                      {"previous_token_heads": prev, "induction_heads": ind, **scores}, {})


def equality_graph() -> ModelGraph:
    h = [Node(f"hidden.{i}", he.site(i), (f"hidden.{i - 1}",) if i else ()) for i in range(3)]
    return ModelGraph(tuple(h), ("hidden.2",))


def equality_world(n: int = 2000, seed: int = 7, model: nn.Module | None = None) -> ScrubWorld:
    """The hierarchical-equality MLP (``model``, or the shipped one) on ``n`` balanced inputs;
    loss: cross-entropy of the label."""
    model = he.load_model() if model is None else model
    values = he.sample(n, torch.Generator().manual_seed(seed))
    inputs, labels = he.to_model_inputs(values), he.labels(values)  # [n, 16], [n]
    wx, yz = _intermediates(values)

    def loss(logits: Tensor, rows: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(logits, labels[rows], reduction="none")

    def chain(name: str, carried: Tensor) -> ScrubHypothesis:
        return ScrubHypothesis(name, ("hidden.2",), {"hidden.2": Claim(("hidden.1",), labels),
                                                     "hidden.1": Claim(("hidden.0",), carried),
                                                     "hidden.0": Claim()})
    keys = {"O": labels, "WX": wx, "YZ": yz, "WX+YZ": 2 * wx + yz}
    hyps = {"wx_and_yz": chain("wx_and_yz", keys["WX+YZ"]), "wx_only": chain("wx_only", wx),
            "yz_only": chain("yz_only", yz)}
    return ScrubWorld(he.NAME, model, inputs, equality_graph(), loss, hyps, {"n": n}, keys)


def _intermediates(values: dict[str, Tensor]) -> tuple[Tensor, Tensor]:  # [n] long each
    return ((values["W"] == values["X"]).all(-1).long(), (values["Y"] == values["Z"]).all(-1).long())


WORLDS = {"induction": induction_world, he.NAME: equality_world}


def world(name: str, **kwargs: Any) -> ScrubWorld:
    if name not in WORLDS:
        raise ValueError(f"no scrubbing world {name!r}; built in: {sorted(WORLDS)}")
    return WORLDS[name](**kwargs)
