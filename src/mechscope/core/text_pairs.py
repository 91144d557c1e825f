"""Prompt / answer pairs as text, for supervised interventions (``mechscope reft``) on a model
with a tokenizer.

A JSON-lines file of ``{"prompt": "...", "answer": "...", "split": "train" | "test" |
"unrelated"}`` rows (``split`` defaults to ``train``) becomes token ids the way the model saw
text in pretraining: the prompt as ``[BOS] + tokens`` (no BOS when the tokenizer has none),
the answer as its tokens followed by EOS, so that a greedy answer is complete when the
model stops. The prompt and the answer are tokenised apart: the boundary between them is
a token boundary, which is what teacher forcing and exact-match scoring need (tokenising
``prompt + answer`` together could merge the last prompt token with the first answer token).
Whether the answer starts with a space is the file's business: write ``"answer": " Paris"``
after ``"prompt": "The capital of France is"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mechscope.core.jsonl import DataError, first_row, one_of, read_jsonl, text

PAIR_EXAMPLE = '{"prompt": "The capital of France is", "answer": " Paris", "split": "train"}'
SPLITS = ("train", "test", "unrelated")


def pair_kind(path: str | Path) -> str | None:
    """``"text"`` when the first row's ``prompt`` is a string, ``"tokens"`` when it is a list,
    None when the file cannot be read that far (the full read says why)."""
    prompt = (first_row(path) or {}).get("prompt")
    return "text" if isinstance(prompt, str) else "tokens" if isinstance(prompt, list) else None


def _ids(tokenizer: Any, value: str) -> list[int]:
    return [int(t) for t in tokenizer(value, add_special_tokens=False)["input_ids"]]


def text_pairs(path: str | Path, tokenizer: Any, flag: str = "--data") -> dict[str, list[tuple[list[int], list[int]]]]:
    """``{split: [(prompt ids, answer ids)]}`` of a JSON-lines file of text pairs (see the module
    docstring); a missing or wrong-typed field, or a text with no tokens, is a DataError
    naming the file and the line."""
    rows = read_jsonl(path, {"prompt": text(), "answer": text()}, {"split": one_of(*SPLITS)},
                      example=PAIR_EXAMPLE, flag=flag)
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(f"{flag} {path}: the tokenizer ({type(tokenizer).__name__}) has no EOS token, which ends "
                        "every answer so that a greedy answer can be scored; set tokenizer.eos_token")
    out: dict[str, list[tuple[list[int], list[int]]]] = {s: [] for s in SPLITS}
    for i, row in enumerate(rows, 1):
        prompt, answer = _ids(tokenizer, row["prompt"]), _ids(tokenizer, row["answer"])
        if not prompt or not answer:
            which = "prompt" if not prompt else "answer"
            raise DataError(f"{path}: row {i}: the {which} {row[which][:40]!r} has no tokens under the model's "
                            "tokenizer")
        out[row.get("split", "train")].append(([int(bos)] * (bos is not None) + prompt, answer + [int(eos)]))
    return out
