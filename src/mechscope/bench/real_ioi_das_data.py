"""A causal model of the IOI task and its counterfactual data, for DAS on the reference model
(issue 20, row 6): pure functions, no model, tested in CI.

The prompts are those of :mod:`mechscope.bench.real_ioi_data` ("When Mary and John went to
the store, John gave a drink to"), built here from slot indices so that the high-level
inputs and the tokens agree by construction. The causal model:

- inputs ``N1``, ``N2`` (the names at positions 2 and 4), ``S2`` (the name repeated at
  position 10: always ``N1`` or ``N2``) and the filler slots;
- ``P``, the position of the repeated name among the two: 0 when ``S2 = N1``, 1 when
  ``S2 = N2`` (the variable DAS localises);
- the output ``IO``, the indirect object: the name at the slot that does not repeat
  (``N2`` when ``P = 0``, ``N1`` when ``P = 1``), as an index into ``NAMES``.

Interchanging ``P`` from a source prompt (other names, other fillers) sets the base's
answer to the base name at the slot the source does not repeat. The model's output is read
as its logits for the 40 names at the final position (:func:`name_readout`): the model
answers a name when it is the top one of all the names, so a prompt's two names compete
with every other name as well.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from mechscope.bench.real_ioi_data import GIVES, MOVES, NAMES, OBJECTS, OPENERS, PLACES, N_TOKENS, S2_POS
from mechscope.causal.model import CausalModel, Variable

FILLERS = {"opener": OPENERS, "move": MOVES, "place": PLACES, "give": GIVES, "obj": OBJECTS}
INPUTS = ("N1", "N2", "S2", *FILLERS)
N1_POS, N2_POS = 2, 4


def ioi_causal_model() -> CausalModel:
    """Inputs, ``P`` (which of the two names repeats) and the output ``IO`` (the other's slot)."""
    names = tuple(range(len(NAMES)))
    return CausalModel([
        Variable("N1", names), Variable("N2", names), Variable("S2", names),
        *(Variable(slot, tuple(range(len(words)))) for slot, words in FILLERS.items()),
        Variable("P", (0, 1), parents=("N1", "N2", "S2"), mechanism=_repeated_slot),
        Variable("IO", names, parents=("N1", "N2", "P"), mechanism=_other_name),
    ], output="IO")


def _repeated_slot(n1: Tensor, n2: Tensor, s2: Tensor) -> Tensor:
    if not bool(((s2 == n1) | (s2 == n2)).all()):
        raise ValueError("S2 must repeat N1 or N2 in every prompt")
    return (s2 == n2).long()


def _other_name(n1: Tensor, n2: Tensor, p: Tensor) -> Tensor:
    return torch.where(p == 0, n2, n1)


def name_readout(name_ids: Tensor) -> Callable[[Tensor], Tensor]:
    """Model logits ``[batch, pos, vocab]`` -> ``[batch, len(NAMES)]``: the names' logits at the
    last position (classes in ``NAMES`` order)."""
    def readout(logits: Tensor) -> Tensor:
        return logits[:, -1].index_select(-1, name_ids.to(logits.device))
    return readout


def sample_inputs(k: int, gen: torch.Generator) -> dict[str, Tensor]:
    """``k`` prompts' high-level inputs: two distinct names, which one repeats, fillers."""
    n1 = torch.randint(0, len(NAMES), (k,), generator=gen)
    n2 = (n1 + torch.randint(1, len(NAMES), (k,), generator=gen)) % len(NAMES)  # never n1
    repeat_second = torch.randint(0, 2, (k,), generator=gen).bool()
    out = {"N1": n1, "N2": n2, "S2": torch.where(repeat_second, n2, n1)}
    for slot, words in FILLERS.items():
        out[slot] = torch.randint(0, len(words), (k,), generator=gen)
    return out


def word_ids(tokenizer: Any) -> dict[str, Tensor]:
    """Token ids of every slot's words (names, places, ... with a leading space; openers
    without: they follow BOS), and of the template's fixed words; refuses a word that is not
    one token."""
    def one(text: str) -> int:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens for this tokenizer; the IOI template needs one per slot")
        return int(ids[0])

    table = {"N": torch.tensor([one(" " + n) for n in NAMES]), "opener": torch.tensor([one(o) for o in OPENERS])}
    for slot in ("move", "place", "give", "obj"):
        table[slot] = torch.tensor([one(" " + w) for w in FILLERS[slot]])
    table["fixed"] = torch.tensor([one(w) for w in (" and", " to", " the", ",", " a")])
    table["bos"] = torch.tensor([int(tokenizer.bos_token_id)])
    return table


def to_model_inputs(ids: Mapping[str, Tensor]) -> Callable[[Mapping[str, Tensor]], dict[str, Tensor]]:
    """High-level inputs -> ``{"input_ids" [k, 15], "attention_mask"}``: the prompt's tokens
    slot by slot."""
    and_, to, the, comma, a = ids["fixed"].tolist()

    def build(hl: Mapping[str, Tensor]) -> dict[str, Tensor]:
        k = len(hl["N1"])
        col = lambda v: torch.full((k,), v, dtype=torch.long)  # noqa: E731 - one fixed token per prompt
        n1, n2, s2 = ids["N"][hl["N1"]], ids["N"][hl["N2"]], ids["N"][hl["S2"]]
        tokens = torch.stack([col(int(ids["bos"])), ids["opener"][hl["opener"]], n1, col(and_), n2,
                              ids["move"][hl["move"]], col(to), col(the), ids["place"][hl["place"]], col(comma),
                              s2, ids["give"][hl["give"]], col(a), ids["obj"][hl["obj"]], col(to)], 1)
        assert tokens.shape[1] == N_TOKENS and bool((tokens[:, S2_POS] == s2).all())
        return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    return build


__all__ = ["FILLERS", "INPUTS", "N1_POS", "N2_POS", "ioi_causal_model", "name_readout", "sample_inputs",
           "to_model_inputs", "word_ids"]
