"""JSON-lines data and text files damaged or made of random bytes: every reader gives a
DataError or rows that pass its checks, one per non-blank line (nothing skipped, nothing
half-read), never another exception. Readers: ``core.jsonl.read_jsonl`` and the text
readers of ``core.text`` (``read_documents``, ``labelled_text``, ``read_prompts``, ``row_kind``)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from damage import byte_damage, examples, json_damage, load_or_typed_error
from hypothesis import example, given
from hypothesis import strategies as st

from mechscope.core.jsonl import integer, read_jsonl, token_ids
from mechscope.core.text import labelled_text, read_documents, read_prompts, row_kind

VOCAB = 50
TOKEN_ROWS = [{"tokens": [5, 6, 7], "label": 1}, {"tokens": [49], "label": 0}, {"tokens": [0, 1], "label": 1}]
TEXT_ROWS = [{"text": "The film was wonderful.", "label": 1}, {"text": "Dull.", "label": 0},
             {"text": "ünïcode — fine", "label": 1}]


def lines_of(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def non_blank_lines(raw: bytes) -> int:
    """Lines as a text-mode read sees them: \r\n and \r are newlines, U+2028 and \x1c are not."""
    text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    return sum(1 for line in text.split("\n") if line.strip())


def read_all(path: Path, raw: bytes) -> None:
    """Every reader on one file; each result is checked against the file's own lines."""
    rows = read_jsonl(path, {"tokens": token_ids(VOCAB), "label": integer((0, 1))})
    assert len(rows) == non_blank_lines(raw), "read_jsonl skipped or split a line"
    assert all(r["label"] in (0, 1) and all(0 <= t < VOCAB for t in r["tokens"]) for r in rows)


def read_text(path: Path, raw: bytes) -> None:
    rows = labelled_text(path, integer((0, 1)))
    assert len(rows) == non_blank_lines(raw) and all(isinstance(r["text"], str) and r["text"].strip() for r in rows)


def read_corpus(path: Path, raw: bytes) -> None:
    documents = [t for _, t in read_documents(path)]
    assert all(isinstance(t, str) for t in documents)
    if path.suffix == ".jsonl":
        assert len(documents) == non_blank_lines(raw), "read_documents skipped or split a line"
    else:  # a plain text file comes back whole, paragraph by paragraph
        assert "".join(documents) == raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def read_as_prompts(path: Path, raw: bytes) -> None:
    prompts = read_prompts(str(path))
    assert prompts and all(p.strip() for p in prompts)


def check(raw: bytes, what: str, readers=(read_all, read_text, read_corpus, read_as_prompts)) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".jsonl", ".txt"):
            path = Path(tmp) / f"data{suffix}"
            path.write_bytes(raw)
            assert row_kind(path) in ("text", "tokens", None)  # a guess: never raises
            for reader in readers:
                if reader is read_corpus or reader is read_as_prompts or suffix == ".jsonl":
                    load_or_typed_error(lambda: reader(path, raw), f"{reader.__name__}({suffix}): {what}")


@examples(100)
@example(damage=("null at [0, 'tokens', 0]", [{"tokens": [None, 6], "label": 1}]))  # once a TypeError in max()
@given(damage=st.one_of(json_damage(TOKEN_ROWS), json_damage(TEXT_ROWS)))
def test_damaged_rows_are_an_error_or_checked_rows(damage):
    check(lines_of(damage[1]), damage[0])


@examples(100)
@given(damage=st.one_of(byte_damage(lines_of(TOKEN_ROWS)), byte_damage(lines_of(TEXT_ROWS))))
def test_damaged_bytes_are_an_error_or_checked_rows(damage):
    check(damage[1], damage[0])


@examples(60)
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(lambda t: t.encode("utf-8")))
def test_any_bytes_are_an_error_or_checked_rows(raw):
    check(raw, f"the file {raw!r}")


@examples(60)
@example(texts=["a\u2028b", "c\x1cd", "e\x85f\u2029"])  # once split into two lines by str.splitlines
@given(texts=st.lists(st.text(min_size=1, max_size=20).filter(str.strip), min_size=1, max_size=4))
def test_valid_rows_read_back_exactly(texts):
    # any text JSON allows, written unescaped (U+2028, \x1c, \r inside a string are one line in JSON-lines)
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(texts)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_bytes(lines_of(rows))
        assert labelled_text(path, integer((0, 1))) == rows
        assert [t for _, t in read_documents(path)] == texts
