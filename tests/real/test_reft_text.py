"""``mechscope reft`` on text pairs: prompt and answer tokenised apart ([BOS] + prompt, answer +
EOS), the intervention trained and scored by exact greedy match; bad rows are usage errors."""

import json

import pytest

from mechscope.cli import main
from mechscope.core.jsonl import DataError
from mechscope.core.text_pairs import pair_kind, text_pairs
from real_helpers import NAMES, PLACES


def write_pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def place_rows():
    """Each name goes to one place: the answer is that place."""
    rows = []
    for i, name in enumerate(NAMES):
        for split in ("train",) * 4 + ("test",):
            rows.append({"prompt": f"{name} went to the", "answer": f" {PLACES[i % len(PLACES)]}", "split": split})
    rows.append({"prompt": "the book went to the", "answer": " store", "split": "unrelated"})
    return rows


def test_pairs_are_tokenised_apart_with_bos_and_eos(tmp_path, tokenizer):
    path = write_pairs(tmp_path / "pairs.jsonl", place_rows())
    assert pair_kind(path) == "text"
    pairs = text_pairs(path, tokenizer)
    prompt, answer = pairs["train"][0]
    assert prompt[0] == tokenizer.bos_token_id and answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(prompt[1:]).split() == f"{NAMES[0]} went to the".split()
    assert len(pairs["train"]) == 4 * len(NAMES) and len(pairs["unrelated"]) == 1
    bad = write_pairs(tmp_path / "bad.jsonl", [{"prompt": "x", "answer": 3}])
    with pytest.raises(DataError, match="bad.jsonl:1.*answer"):
        text_pairs(bad, tokenizer)


def test_reft_learns_text_pairs(tmp_path, model_dir, capsys):
    """Untrained (1 step) the random model answers none; 150 steps teach it some answers (0.33 measured),
    which needs the answer tokens to be the labels at the right positions."""
    data = write_pairs(tmp_path / "pairs.jsonl", place_rows())
    accuracy = {}
    for steps in (1, 150):
        assert main(["reft", "--model", str(model_dir), "--data", str(data), "--steps", str(steps), "--batch", "8",
                     "--layers", "0,1", "--json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)["rows"]
        assert row["method"] == "loreft" and row["trainable_params"] > 0
        accuracy[steps] = row["accuracy"]
    assert accuracy[1] == 0.0 and accuracy[150] > 0.0


def test_text_pairs_need_a_tokenizer(tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", place_rows())
    assert main(["reft", "--data", str(data), "--steps", "1"]) == 2
    assert "give a --model with a tokenizer" in capsys.readouterr().err
