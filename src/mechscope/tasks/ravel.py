"""RAVEL, small: a transformer that answers attribute queries about entities (Huang et al. 2024).

RAVEL asks whether a featurizer can move one attribute of an entity (a city's country)
without moving another (its language), intervening at the entity's token. The same shape
here, with a small transformer trained by this project: a prompt is three tokens
``T E Q`` -- a template token (8 of them, irrelevant to the answer, as RAVEL's prompt
templates), an entity (48 of them) and an attribute query -- and the answer at ``Q`` is
the entity's value of that attribute (a value token). Each entity carries two
attributes, ``colour`` and ``shape`` (6 values each), drawn once from a fixed seed so
that every value belongs to 8 entities; the attributes are independent of each other.

The entity position cannot see the query (it comes after), so whatever the network keeps
there it keeps for every attribute at once: the residual stream at ``E`` (:func:`site`)
is where RAVEL intervenes. The default site is the one after block 0: measured on the
shipped network, interchanging the whole vector there moves colour answers every time
and shape answers about 6 times in 10 (block 0's attention already carries some of the
entity to the query), while after block 1 it moves nothing (the query has read the
entity by then); ``docs/results.md`` has the numbers.

Causal model (:func:`causal_model`): ``T, E, Q`` are inputs; one variable per attribute,
``colour := COLOUR[E]``, ``shape := SHAPE[E]``; the output is the value token of the
queried attribute. Interchanging ``colour`` from a source entity gives the source's colour
to colour queries (RAVEL's *Cause*) and must leave the answer to shape queries at the
base's shape (*Isolate*): :func:`counterfactuals` makes both kinds, keeping only pairs
whose base and source differ on the attributes concerned (a pair where they agree cannot
tell a featurizer that moves the attribute from one that does not). Entities are split
(:data:`SPLITS`) so that featurizers are trained on some entities and scored on others.

The trained network ships as ``zoo/checkpoints/ravel.safetensors``; ``mechscope train
ravel`` rewrites it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mechscope.causal.counterfactual import CounterfactualData, make_counterfactuals
from mechscope.causal.disentangle import DisentangleData
from mechscope.causal.engine import last_position
from mechscope.causal.model import CausalModel, Variable
from mechscope.core.site import Site
from mechscope.zoo.recipes import load_shipped, save_shipped, train_steps
from mechscope.zoo.transformer import Transformer, TransformerConfig

NAME = "ravel"
N_TEMPLATES, N_ENTITIES = 8, 48
ATTRIBUTES = ("colour", "shape")
N_VALUES = {"colour": 6, "shape": 6}
TABLE_SEED = 2024  # the world's entity -> attribute table is fixed, whatever the recipe's seed
# tokens: templates, entities, one query per attribute, then each attribute's value tokens
ENTITY0 = N_TEMPLATES
QUERY0 = ENTITY0 + N_ENTITIES
VALUE0 = {"colour": QUERY0 + len(ATTRIBUTES), "shape": QUERY0 + len(ATTRIBUTES) + N_VALUES["colour"]}
VOCAB = VALUE0["shape"] + N_VALUES["shape"]
SEQ, ENTITY_POS = 3, 1  # T E Q
MODEL = TransformerConfig(vocab=VOCAB, n_ctx=SEQ, d_model=64, n_layers=3, n_heads=4, d_head=16, d_mlp=256)
CHECKPOINT = Path(__file__).resolve().parent.parent / "zoo" / "checkpoints" / f"{NAME}.safetensors"
SITE_LAYER = 0  # the entity position after block 0 (see the module docstring)
readout = last_position  # the answer is read at the query


class RavelError(ValueError):
    """A query about the RAVEL world that it cannot answer as asked."""


def _table() -> dict[str, Tensor]:
    """Each attribute's value per entity: every value on N_ENTITIES / N_VALUES entities."""
    gen = torch.Generator().manual_seed(TABLE_SEED)
    out = {}
    for a in ATTRIBUTES:
        values = torch.arange(N_ENTITIES) % N_VALUES[a]
        out[a] = values[torch.randperm(N_ENTITIES, generator=gen)]
    return out


TABLE = _table()
_ORDER = torch.randperm(N_ENTITIES, generator=torch.Generator().manual_seed(TABLE_SEED + 1))
# featurizers train on 32 entities and are scored on the 16 others (the network knows all 48)
SPLITS: dict[str, Tensor] = {"train": _ORDER[:32].sort().values, "test": _ORDER[32:].sort().values,
                             "all": torch.arange(N_ENTITIES)}


def check_attribute(name: str) -> None:
    if name not in ATTRIBUTES:
        raise RavelError(f"unknown attribute {name!r}; the RAVEL world's entities have {list(ATTRIBUTES)}")


def causal_model() -> CausalModel:
    """``T, E, Q -> colour := COLOUR[E], shape := SHAPE[E] -> O``: the queried attribute's value token."""
    def answer(q: Tensor, colour: Tensor, shape: Tensor) -> Tensor:
        return torch.where(torch.as_tensor(q) == 0, VALUE0["colour"] + colour, VALUE0["shape"] + shape)
    return CausalModel([
        Variable("T", tuple(range(N_TEMPLATES))), Variable("E", tuple(range(N_ENTITIES))),
        Variable("Q", tuple(range(len(ATTRIBUTES)))),
        Variable("colour", tuple(range(N_VALUES["colour"])), ("E",), lambda e: TABLE["colour"][e]),
        Variable("shape", tuple(range(N_VALUES["shape"])), ("E",), lambda e: TABLE["shape"][e]),
        Variable("O", tuple(range(VALUE0["colour"], VOCAB)), ("Q", "colour", "shape"), answer),
    ], output="O")


def sample(n: int, generator: torch.Generator, query: str | None = None, split: str = "all") -> dict[str, Tensor]:
    """``n`` prompts: uniform template and entity (from ``split``), the query ``query`` (None: uniform)."""
    if split not in SPLITS:
        raise RavelError(f"unknown entity split {split!r}; valid: {list(SPLITS)}")
    if query is not None:
        check_attribute(query)
    entities = SPLITS[split]
    q = (torch.randint(0, len(ATTRIBUTES), (n,), generator=generator) if query is None
         else torch.full((n,), ATTRIBUTES.index(query)))
    return {"T": torch.randint(0, N_TEMPLATES, (n,), generator=generator),
            "E": entities[torch.randint(0, len(entities), (n,), generator=generator)], "Q": q}


def to_model_inputs(values: Mapping[str, Tensor]) -> Tensor:  # [n, 3] token ids
    return torch.stack([values["T"], ENTITY0 + values["E"], QUERY0 + values["Q"]], dim=-1).long()


def site(layer: int = SITE_LAYER, position: int = ENTITY_POS) -> Site:
    """The residual stream after block ``layer`` at ``position`` (default: the entity, after the middle block)."""
    if not 0 <= layer < MODEL.n_layers or not 0 <= position < SEQ:
        raise RavelError(f"layer must be in 0..{MODEL.n_layers - 1} and position in 0..{SEQ - 1}, got {layer}, {position}")
    return Site(f"blocks.{layer}", positions=[position], name=f"resid_post.{layer}@{'TEQ'[position]}")


def counterfactuals(attribute: str, query: str, n: int, seed: int, split: str = "all") -> CounterfactualData:
    """``n`` pairs interchanging ``attribute`` from a source entity, the base asking about ``query``.

    ``query == attribute``: Cause pairs (label: the source's value); otherwise Isolate
    pairs (label: the base's value of ``query``). Only pairs whose entities differ on
    ``attribute`` (and on ``query``) are kept. Named ``cause:A`` or ``isolate:A|B``.
    """
    check_attribute(attribute)
    check_attribute(query)
    if n < 1:
        raise RavelError(f"n must be >= 1, got {n}")
    concerned = dict.fromkeys((attribute, query))
    name = f"cause:{attribute}" if query == attribute else f"isolate:{attribute}|{query}"
    data = make_counterfactuals(causal_model(), (attribute,), lambda k, g: sample(k, g, query, split), 4 * n + 64,
                                to_model_inputs, seed=seed, balance=False, name=name)
    high = data.meta["high_level"]
    differ = torch.ones(len(data), dtype=torch.bool)
    for a in concerned:
        differ &= TABLE[a][high["base"]["E"]] != TABLE[a][high[attribute]["E"]]
    keep = torch.nonzero(differ).flatten()
    if len(keep) < n:
        raise RavelError(f"only {len(keep)} of {len(data)} drawn pairs of {name} differ on {list(concerned)}; "
                         f"ask for at most {len(keep)} or use a larger entity split than {split!r}")
    out = data.subset(keep[:n])  # the high-level values follow the rows kept
    out.meta.update({"kind": "cause" if query == attribute else "isolate", "attribute": attribute, "query": query,
                     "split": split})
    return out


def disentangle_data(n: int, seed: int, split: str = "all") -> DisentangleData:
    """``n`` Cause pairs per attribute and ``n`` Isolate pairs per ordered pair of attributes."""
    pairs = [(a, b) for a in ATTRIBUTES for b in ATTRIBUTES if a != b]
    return DisentangleData({a: counterfactuals(a, a, n, seed + i, split) for i, a in enumerate(ATTRIBUTES)},
                           {(a, b): counterfactuals(a, b, n, seed + 100 + i, split) for i, (a, b) in enumerate(pairs)})


# -- the model and its recipe -----------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """How the shipped network was trained: AdamW, one-cycle, fresh prompts, loss at the query only."""

    steps: int = 2000
    batch: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0


def build_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(MODEL)


def answers(values: Mapping[str, Tensor]) -> Tensor:
    """The value token each prompt must be answered with ([n] long)."""
    return causal_model().run(values).long()


def all_prompts() -> dict[str, Tensor]:
    """Every prompt (8 templates x 48 entities x 2 queries = 768)."""
    t, e, q = torch.meshgrid(torch.arange(N_TEMPLATES), torch.arange(N_ENTITIES), torch.arange(len(ATTRIBUTES)),
                             indexing="ij")
    return {"T": t.flatten(), "E": e.flatten(), "Q": q.flatten()}


def train(recipe: Recipe = Recipe(), log: Any = None) -> Transformer:
    """Train the network from scratch (well under a minute on one CPU thread)."""
    model = build_model(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)

    def loss_at(step: int) -> Tensor:
        values = sample(recipe.batch, gen)
        return F.cross_entropy(readout(model(to_model_inputs(values))), answers(values))

    return train_steps(model, recipe, loss_at, pct_start=0.1, log=log)


@torch.no_grad()
def accuracy(model: torch.nn.Module) -> float:
    """Accuracy over every prompt."""
    values = all_prompts()
    return float((readout(model(to_model_inputs(values))).argmax(-1) == answers(values)).double().mean())


def load(path: Path = CHECKPOINT) -> Transformer:
    """The shipped (or a retrained) network, in eval mode."""
    return load_shipped(path, MODEL, "RAVEL", NAME)


def train_and_ship(out_dir: Path, log: Any = None, recipe: Recipe = Recipe()) -> list[Path]:
    """``mechscope train ravel``: train by :class:`Recipe` and write the checkpoint into ``out_dir``."""
    model = train(recipe, log=log)
    path = Path(out_dir) / CHECKPOINT.name
    save_shipped(path, model, MODEL, recipe)
    if log:
        log(f"accuracy {accuracy(model):.4f} over all {N_TEMPLATES * N_ENTITIES * len(ATTRIBUTES)} prompts; wrote {path}")
    return [path]
