"""The IOI causal model and counterfactual data of the real suite's DAS row (issue 20, row 6)."""

import pytest
import torch

from mechscope.bench.real_ioi_data import NAMES, TEMPLATE
from mechscope.bench.real_ioi_das_data import (
    FILLERS,
    ioi_causal_model,
    name_readout,
    sample_inputs,
    to_model_inputs,
    word_ids,
)
from mechscope.causal.counterfactual import make_counterfactuals


class WordTokenizer:
    """One id per whitespace word (a leading space kept), as the template needs."""

    bos_token_id = 0

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.setdefault(text, len(self.vocab) + 1)] if text.strip() else []}


def test_p_is_the_repeated_slot_and_the_answer_is_the_other():
    cm = ioi_causal_model()
    hl = {"N1": torch.tensor([3, 3]), "N2": torch.tensor([5, 5]), "S2": torch.tensor([3, 5]),
          **{s: torch.zeros(2, dtype=torch.long) for s in FILLERS}}
    values = cm.solve(hl)
    assert values["P"].tolist() == [0, 1] and values["IO"].tolist() == [5, 3]
    # interchanging P from a prompt that repeats its second name: the base's first name is the answer
    src = {**hl, "N1": torch.tensor([7, 7]), "N2": torch.tensor([8, 8]), "S2": torch.tensor([8, 8])}
    assert cm.interchange(hl, {"P": src})["IO"].tolist() == [3, 3]
    with pytest.raises(ValueError, match="S2 must repeat"):
        cm.solve({**hl, "S2": torch.tensor([4, 5])})


def test_tokens_follow_the_template_slot_by_slot():
    tok = WordTokenizer()
    ids = word_ids(tok)
    gen = torch.Generator().manual_seed(0)
    hl = sample_inputs(64, gen)
    assert bool((hl["N1"] != hl["N2"]).all()) and bool(((hl["S2"] == hl["N1"]) | (hl["S2"] == hl["N2"])).all())
    batch = to_model_inputs(ids)(hl)
    inverse = {v: k for k, v in tok.vocab.items()}
    for i in range(3):
        words = {s: FILLERS[s][int(hl[s][i])] for s in FILLERS}
        text = TEMPLATE.format(n1=NAMES[int(hl["N1"][i])], n2=NAMES[int(hl["N2"][i])], s2=NAMES[int(hl["S2"][i])],
                               **words)
        rebuilt = "".join(inverse[int(t)] for t in batch["input_ids"][i, 1:])
        assert rebuilt == text and int(batch["input_ids"][i, 0]) == 0
    readout = name_readout(ids["N"])
    logits = torch.zeros(64, 15, 200)
    logits[torch.arange(64), -1, batch["input_ids"][:, 4]] = 1.0  # every prompt's second name is the top logit
    assert readout(logits).argmax(-1).tolist() == hl["N2"].tolist()


def test_counterfactual_data_is_balanced_over_change():
    tok = WordTokenizer()
    data = make_counterfactuals(ioi_causal_model(), "P", sample_inputs, 240, to_model_inputs(word_ids(tok)), seed=0)
    changed = data.labels != data.base_labels
    assert int(changed.sum()) == 120 and torch.bincount(data.labels).tolist() == [6] * 40  # (answer, change) buckets
    assert data.base["input_ids"].shape == (240, 15)
    # the counterfactual answer is always one of the base's own two names
    ids = data.base["input_ids"]
    names = word_ids(tok)["N"][data.labels]
    assert bool(((names == ids[:, 2]) | (names == ids[:, 4])).all())
