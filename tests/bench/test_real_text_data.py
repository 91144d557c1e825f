"""The steering and probe rows' pure helpers (no model, so these run in CI): monotonicity, the
matched-KL coefficient, the token properties, the layer choice and the selectivity; and the
rows' pre-registered criteria, which must not drift from issue 20's numbers."""

import pytest
import torch

from mechscope.bench.catalog import load_catalog
from mechscope.bench.real_text_data import (
    PREPOSITIONS,
    balanced_selectivity,
    best_index,
    is_capitalised,
    is_digit,
    matched_coefficient,
    min_step,
    piece_text,
    spaced_windows,
    steps,
    token_property_labels,
    word_class_labels,
)
from mechscope.bench.registry import REGISTRY

W = "\u2581"


def test_steps_and_min_step_score_strict_monotonicity():
    assert steps([0.0, 1.0, 3.0]) == [1.0, 2.0]
    per_example = torch.tensor([[0.0, 1.0, 3.0], [0.0, 3.0, 3.0]])  # means 0, 2, 3
    assert float(min_step(per_example)) == pytest.approx(1.0)
    flat = torch.tensor([[0.0, 1.0, 1.0]])
    assert float(min_step(flat)) == 0.0  # a flat step is not a rise: the criterion is > 0
    with pytest.raises(ValueError):
        steps([1.0])


def test_matched_coefficient_bisects_an_increasing_kl():
    calls = []

    def kl(c):
        calls.append(c)
        return 0.1 * c * c

    c, found, ok = matched_coefficient(kl, 0.4, 32.0, rel_tol=0.01)
    assert ok and c == pytest.approx(2.0, rel=0.01) and found == pytest.approx(0.4, rel=0.01)
    assert len(calls) < 25


def test_matched_coefficient_says_when_the_target_is_out_of_reach():
    c, found, ok = matched_coefficient(lambda c: 0.01 * c, 5.0, 8.0)
    assert (c, ok) == (8.0, False) and found == pytest.approx(0.08)
    with pytest.raises(ValueError):
        matched_coefficient(lambda c: c, 0.0, 8.0)


def test_token_properties_of_pieces():
    assert piece_text(W + "Paris") == "Paris" and piece_text("ing") == "ing"
    assert is_capitalised(W + "Paris") and is_capitalised("The") and not is_capitalised(W + "the")
    assert not is_capitalised(W) and not is_capitalised("2")
    assert is_digit("7") and is_digit(W + "42") and not is_digit(W + "x1") and not is_digit("\u0663")


def test_word_class_is_a_whole_word_of_the_list():
    pieces = [W + "to", "ne", W + "go", W + "to", W + "the", W + "In", ",", W + "of", "(", "in", ")"]
    assert word_class_labels(pieces) == [False, False, False, True, False, True, False, True, False, True, False]
    assert word_class_labels([W + "on"]) == [True]  # the last piece ends its word
    assert {"of", "in", "with"} <= PREPOSITIONS and "the" not in PREPOSITIONS


def test_token_property_labels_columns():
    labels = token_property_labels([W + "The", W + "3", W + "of", "."])
    assert labels.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]
    assert labels.dtype == torch.long


def test_best_index_takes_the_first_of_ties():
    assert best_index([0.5, 0.9, 0.9, 0.1]) == 1
    with pytest.raises(ValueError):
        best_index([])


def test_balanced_selectivity_is_task_minus_control_balanced_accuracy():
    y = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0])
    task = y.clone()  # balanced accuracy 1
    control_y = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1])
    control_pred = torch.zeros(8, dtype=torch.long)  # recall 1 on class 0, 0 on class 1: 0.5
    rows = torch.stack([task, y, control_pred, control_y], 1)
    assert float(balanced_selectivity(rows)) == pytest.approx(0.5)


class _CharTokenizer:
    """One token per character; BOS 1, EOS 2."""
    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [10 + ord(ch) % 50 for ch in text]}


def test_spaced_windows_take_one_window_per_file_spread_evenly(tmp_path):
    files = []
    for i in range(6):
        f = tmp_path / f"f{i}.txt"
        f.write_text(("ab" if i == 2 else "abcdefghij" * 3) + "\n")
        files.append(f)
    out = spaced_windows(files, _CharTokenizer(), 3, 5, skip=1)
    assert out.shape == (3, 5) and (out[:, 0] == 1).all()
    # files 0, 2 and 4 are chosen; file 2 is too short, so the next file (3) stands in
    assert out[0, 1:].tolist() == [10 + ord(c) % 50 for c in "efgh"]
    with pytest.raises(ValueError):
        spaced_windows(files, _CharTokenizer(), 7, 5)


def test_the_rows_criteria_are_issue_20s():
    load_catalog(suite="real")
    rows = {c.name: c for c in REGISTRY if c.suite == "real"}
    steer = rows["real_steering/diff_of_means/logit_diff_min_step"]
    assert str(steer.threshold) == "> 0" and steer.kind == "finding"
    assert str(steer.criteria["prompting_minus_steering_at_matched_kl"].threshold) == ">= 0"
    ablation = rows["real_steering/directional_ablation/max_relative_projection"]
    assert str(ablation.threshold) == "<= 1e-05" and ablation.kind == "check"
    assert str(ablation.criteria["weight_edit_refused"].threshold) == "== 1"
    probes = rows["real_probes/linear_probe/capitalised_selectivity"]
    for prop in ("capitalised", "digit", "preposition"):
        crit = probes.criteria[f"{prop}_selectivity"]
        assert (str(crit.threshold), crit.kind) == (">= 0.1", "finding")
        assert probes.criteria[f"{prop}_balanced_accuracy"].kind == "info"
