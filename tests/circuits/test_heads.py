"""Head scores on patterns whose answer is known, on the hand-set model, and ablations."""

import math

import pytest
import torch

from mechscope.circuits.heads import (duplicate_token_score, head_ablation_sweep, head_scores, induction_score,
                                      previous_token_score)
from mechscope.tasks import induction


def _stripe(T: int, offset: int, first_query: int) -> torch.Tensor:
    """A causal pattern [1, 1, T, T]: queries from first_query attend fully to q - offset, others to BOS."""
    p = torch.zeros(T, T)
    for q in range(T):
        p[q, q - offset if q >= first_query else 0] = 1.0
    return p[None, None]


def test_scores_on_known_patterns():
    L = 5
    prev = _stripe(2 * L + 1, 1, 1)
    assert previous_token_score(prev).item() == 1.0
    assert induction_score(prev, L).item() == 0.0
    ind = _stripe(2 * L + 1, L - 1, L + 1)
    assert induction_score(ind, L).item() == 1.0
    assert duplicate_token_score(ind, L).item() == 0.0
    dup = _stripe(2 * L + 1, L, L + 1)
    assert duplicate_token_score(dup, L).item() == 1.0
    assert previous_token_score(torch.stack([prev, ind])).shape == (2, 1)  # leading dims kept


def test_hand_set_model_scores_and_ablations():
    model, truth = induction.hand_set_model()
    tokens = induction.repeated_tokens(32, 6, 12, generator=torch.Generator().manual_seed(0))
    s = head_scores(model, tokens, 6, 2)
    assert s["previous_token"][0, 0] > 0.95 and s["previous_token"][0, 1] > 0.95  # circuit head and its decoy
    assert int(s["induction_stripe"][1].argmax()) in (0, 2)  # the induction head or its decoy

    def loss(logits):
        return induction.repeated_half_loss(logits, tokens, 6)
    sweep = head_ablation_sweep(model, tokens, loss, "zero", metric_name="loss")
    decoys = [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert all(sweep.values[a, b].item() == pytest.approx(sweep.baseline, abs=1e-5) for a, b in decoys)
    assert sweep.values[1, 0] > sweep.baseline + 1.0 and sweep.values[0, 0] > sweep.baseline + 1.0
    assert sweep.to_dict()["ablation"] == "zero"
    mean = head_ablation_sweep(model, tokens, loss, "mean")
    assert mean.values[1, 0] > mean.baseline + 1.0 and mean.ablation == "mean"
    assert sweep.values[1, 0] < 2 * math.log(12)


def test_bad_input():
    with pytest.raises(ValueError, match="square"):
        previous_token_score(torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="period >= 2"):
        induction_score(torch.zeros(1, 1, 5, 5), 1)
    with pytest.raises(ValueError, match="no query"):
        induction_score(torch.zeros(1, 1, 5, 5), 4)
    model, _ = induction.hand_set_model()
    tokens = induction.repeated_tokens(4, 6, 12)
    with pytest.raises(ValueError, match="unknown ablation"):
        head_ablation_sweep(model, tokens, lambda lg: lg.mean(), "resample")
