"""The IOI causal model and counterfactual data of the real suite's DAS row (issue 20, row 6)."""

import pytest
import torch

from mechscope.bench.real_ioi_data import NAMES, TEMPLATE
from mechscope.bench.real_ioi_das_data import FILLERS, ioi_causal_model, sample_inputs, to_model_inputs, word_ids
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
    assert values["P"].tolist() == [0, 1] and values["IO"].tolist() == [1, 0]
    # interchanging P from a prompt that repeats the second name flips the first example's answer
    src = {**hl, "S2": torch.tensor([5, 5])}
    assert cm.interchange(hl, {"P": src})["IO"].tolist() == [0, 0]
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
    assert batch["pair_ids"][:, 0].tolist() == batch["input_ids"][:, 2].tolist()
    assert batch["pair_ids"][:, 1].tolist() == batch["input_ids"][:, 4].tolist()


def test_counterfactual_data_is_balanced_over_answer_and_change():
    tok = WordTokenizer()
    data = make_counterfactuals(ioi_causal_model(), "P", sample_inputs, 200, to_model_inputs(word_ids(tok)), seed=0)
    changed = data.labels != data.base_labels
    assert int(changed.sum()) == 100 and int((data.labels == 0).sum()) == 100
    assert data.base["input_ids"].shape == (200, 15) and data.sources["P"]["pair_ids"].shape == (200, 2)
