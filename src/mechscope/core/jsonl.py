"""JSON-lines data files and token ids, checked before a model sees them.

The command line reads a user's examples from a JSON-lines file (one JSON object per
line: ``{"tokens": [5, 6, 7], "label": 1}``). :func:`read_jsonl` checks every line before
anything runs and reports the first problem as a :class:`DataError` naming the file,
the line and the field: a missing file, a directory, an empty file, a line that is not
JSON or not an object, a missing field, a label that is a string, a token id that is
not an integer or is outside the model's vocabulary. The fields' checks are small
functions (:func:`token_ids`, :func:`integer`, :func:`one_of`, :func:`text`).

:func:`check_token_ids` is the one vocabulary check for token tensors, run before a
forward so that an id the embedding does not have is an error that says so, not
torch's "index out of range in self".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from mechscope.core.batch import collate
from mechscope.core.detect import input_embeddings

Check = Callable[[Any], "str | None"]  # a field's value -> what is wrong with it, or None


class DataError(ValueError):
    """Input data (a JSON-lines file, a token batch) that cannot be used as it is."""


# -- checks of one field ----------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(choices: tuple[int, ...] | None = None) -> Check:
    """An integer (not a string, float or boolean), one of ``choices`` when given."""
    def check(value: Any) -> str | None:
        if not _is_int(value):
            return f"must be an integer, got {json.dumps(value)[:40]} ({type(value).__name__})"
        if choices is not None and value not in choices:
            return f"must be one of {list(choices)}, got {value}"
        return None
    return check


def one_of(*choices: str) -> Check:
    """One of the strings ``choices``."""
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {list(choices)}, got {json.dumps(value)[:40]}"
    return check


def text() -> Check:
    """A string with something other than whitespace in it."""
    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return f"must be a string, got {json.dumps(value)[:40]} ({type(value).__name__})"
        return None if value.strip() else "must be a non-empty string, got only whitespace"
    return check


def token_ids(vocab: int | None = None) -> Check:
    """A non-empty list of integer token ids, each in ``[0, vocab)`` when ``vocab`` is known."""
    def check(value: Any) -> str | None:
        if not isinstance(value, list) or not value:
            return f"must be a non-empty list of token ids, got {json.dumps(value)[:40]}"
        bad = [t for t in value if not _is_int(t) or t < 0]  # a list: the bad id may itself be None
        if bad:
            return f"must hold integer token ids >= 0, got {json.dumps(bad[0])[:40]}"
        if vocab is not None and max(value) >= vocab:
            return (f"holds token id {max(value)}, outside the model's vocabulary of {vocab} (ids 0..{vocab - 1}); "
                    "tokenize with the model's own tokenizer")
        return None
    return check


# -- files ------------------------------------------------------------------------------
def _text(path: Path, flag: str) -> str:
    if path.is_dir():
        raise DataError(f"{flag} {path} is a directory; give a JSON-lines file (one JSON object per line)")
    if not path.is_file():
        raise DataError(f"{flag} {path}: no such file; give a JSON-lines file (one JSON object per line) "
                        "or the name of a built-in dataset (see --help)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); give a JSON-lines file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None


def first_row(path: str | Path) -> dict[str, Any] | None:
    """The first non-blank line of a JSON-lines file as a dict, or None when it cannot be read
    that far (a peek to choose a reader; the full read reports what is wrong)."""
    try:
        with open(path, encoding="utf-8") as f:
            row = json.loads(next((line for line in f if line.strip()), "null"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return row if isinstance(row, dict) else None


def json_object(line: str, where: str, example: str) -> dict[str, Any]:
    """One JSON-lines line as a dict, or a DataError at ``where`` (``file:line``) showing ``example``."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); each line must be one JSON "
                        f"object, e.g. {example}") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: a JSON {type(row).__name__}, not an object; each line must be like {example}")
    return row


def _row(path: Path, number: int, line: str, fields: Mapping[str, Check], optional: Mapping[str, Check],
         example: str) -> dict[str, Any]:
    where = f"{path}:{number}"
    row = json_object(line, where, example)
    missing = [k for k in fields if k not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; each line must be like {example}")
    for name, check in [*fields.items(), *((k, c) for k, c in optional.items() if k in row)]:
        problem = check(row[name])
        if problem is not None:
            raise DataError(f"{where}: field {name!r} {problem}")
    return row


def read_jsonl(path: str | Path, fields: Mapping[str, Check], optional: Mapping[str, Check] | None = None, *,
               example: str = '{"tokens": [5, 6, 7], "label": 1}', flag: str = "--data") -> list[dict[str, Any]]:
    """Rows of a JSON-lines file, every line checked: ``fields`` are required, ``optional``
    ones are checked where present. Blank lines are skipped; the first problem is a
    :class:`DataError` naming the file and line. ``flag`` names the option in messages."""
    path = Path(path)
    # split at newlines only (read_text has made \r\n and \r into \n): str.splitlines would also
    # split at U+2028, \x1c or \x85, which JSON allows unescaped inside a string
    rows = [_row(path, i, line, fields, optional or {}, example)
            for i, line in enumerate(_text(path, flag).split("\n"), 1) if line.strip()]
    if not rows:
        raise DataError(f"{path} holds no rows (the file is empty); write one JSON object per line, e.g. {example}")
    return rows


def token_batch(rows: list[dict[str, Any]], key: str = "tokens", pad_id: int = 0) -> dict[str, Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` from rows' token-id lists (checked by :func:`token_ids`)."""
    check = token_ids()
    for i, row in enumerate(rows):
        problem = check(row.get(key))
        if problem is not None:
            raise DataError(f"row {i}: field {key!r} {problem}")
    batch = collate([r[key] for r in rows], pad_id=pad_id, side="right")
    batch.pop("position_ids")  # Hugging Face models make their own; ours count from 0 anyway
    return batch


# -- vocabulary -------------------------------------------------------------------------
def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's token embedding: its input embedding, its config's ``vocab_size``,
    else its first ``nn.Embedding``; None when it has none (a model that takes vectors)."""
    emb = input_embeddings(model)
    if isinstance(emb, nn.Embedding):
        return int(emb.num_embeddings)
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if _is_int(size):
        return int(size)
    return next((int(m.num_embeddings) for m in model.modules() if isinstance(m, nn.Embedding)), None)


def check_token_ids(ids: Tensor, vocab: int | None, where: str = "input_ids") -> None:
    """Refuse token ids outside ``[0, vocab)`` before a forward (``ids [batch, pos]``), naming the first."""
    if vocab is None or not isinstance(ids, Tensor) or ids.numel() == 0 or ids.is_floating_point():
        return
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        first = [int(i) for i in torch.nonzero(bad)[0]]
        value = int(ids[tuple(first)])
        raise DataError(f"{where}: token id {value} at index {first} is outside the model's vocabulary of {vocab} "
                        f"(ids 0..{vocab - 1}); tokenize with the model's own tokenizer")


__all__ = ["DataError", "check_token_ids", "integer", "one_of", "read_jsonl", "text", "token_batch", "token_ids",
           "vocab_size"]
