"""Text corpora in: streamed documents, tokenised into fixed-length windows.

Sources (:func:`read_documents`), each read as a stream, never held whole in memory:

- a **plain text file** (any suffix but ``.jsonl`` / ``.parquet`` / ``.arrow``): one
  document per file, read and tokenised a paragraph at a time (split after blank lines);
- a **JSON-lines file** (``.jsonl``, ``.ndjson``): one document per line, the string in
  field ``field`` (default ``"text"``); a missing field, a non-string value or a line that
  is not a JSON object is a :class:`~mechscope.core.jsonl.DataError` naming the file and line;
- a **local Hugging Face dataset**: a directory written by ``Dataset.save_to_disk``
  (``datasets.load_from_disk``; a ``DatasetDict`` needs ``split=``), a ``.parquet`` file
  (streamed), an ``.arrow`` file (memory-mapped). ``datasets`` is imported only here;
- a list of any of these, read in order.

**Windows and the BOS policy** (:func:`text_windows`): documents are tokenised without
special tokens, joined with the tokenizer's EOS token between documents (when it has one)
and packed; the stream is cut into windows of ``seq_len - 1`` corpus tokens, each with the
tokenizer's BOS prepended, so every window is ``[BOS, t1 .. t_{seq_len-1}]`` and position 0
is always BOS (``bos=False``: windows of ``seq_len`` corpus tokens, no BOS). A final piece
shorter than a window is dropped. A corpus that yields no window is a :class:`DataError`.

**Shuffling** is a buffer shuffle of windows (``shuffle_buffer`` windows held at a time),
deterministic for a given ``seed``; ``shuffle_buffer=0`` keeps corpus order.

**Excluded positions** (:func:`analysis_mask`): position 0 / the BOS token is an attention
sink whose residual norm is an outlier (16x a typical token's in Gemma-3-270M), so
statistics, stores and dictionaries exclude it by default (``keep_bos=True`` keeps it).

**Labelled text** (probes, steering contrast sets): :func:`labelled_text` reads JSON-lines
rows ``{"text": ..., "label": ...}``; :func:`text_batch` tokenises each text on its own as
``[BOS] + tokens`` (right-padded); :func:`read_mask` picks where a site is read: each
text's last real token (``"last"``, the default) or every real token but BOS / position 0
(``"all"``); position 0 is never read. :func:`text_rows` returns the site's rows there.
:func:`read_prompts` reads generation prompts from a file or takes a literal text.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechscope.core.batch import collate
from mechscope.core.collect import activations
from mechscope.core.jsonl import Check, DataError, first_row, json_object, read_jsonl
from mechscope.core.jsonl import text as text_field

BOS_POLICY = ("each window is [BOS] + (seq_len - 1) corpus tokens; documents are packed, joined by EOS; "
              "position 0 (BOS, an attention sink) is excluded from statistics unless keep_bos=True")
_JSONL = (".jsonl", ".ndjson")
_DATASET_FILES = (".parquet", ".arrow")
_PARAGRAPH_CHARS = 1 << 16  # a paragraph longer than this is tokenised in pieces of about this size

Source = str | os.PathLike | Sequence[str | os.PathLike]


# -- documents ----------------------------------------------------------------------------
def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError("reading a Hugging Face dataset (save_to_disk directory, .parquet, .arrow) needs the "
                          "datasets package: `pip install datasets`; plain text and JSON-lines files need nothing"
                          ) from None
    return datasets


def _text_chunks(path: Path) -> Iterator[str]:
    """A plain text file a paragraph at a time (each chunk ends after a blank line)."""
    try:
        with open(path, encoding="utf-8") as f:
            parts: list[str] = []
            size = 0
            for line in f:
                parts.append(line)
                size += len(line)
                if not line.strip() or size >= _PARAGRAPH_CHARS:
                    yield "".join(parts)
                    parts, size = [], 0
            if parts:
                yield "".join(parts)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); expected a UTF-8 text file") from None


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    example = json.dumps({field: "some text"})
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                row = json_object(line, where, example)
                if field not in row:
                    raise DataError(f"{where}: no field {field!r} (fields: {sorted(row)[:8]}); each line must be "
                                    f"like {example}, or name the text field with field=")
                if not isinstance(row[field], str):
                    raise DataError(f"{where}: field {field!r} must be a string, got "
                                    f"{type(row[field]).__name__} {json.dumps(row[field])[:40]}")
                yield row[field]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); expected a JSON-lines file") from None


def _dataset_rows(path: Path, split: str | None) -> Iterable[dict[str, Any]]:
    datasets = _datasets()
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                raise DataError(f"{path} is a dataset with splits {sorted(ds)}; choose one with split=")
            if split not in ds:
                raise DataError(f"{path} has no split {split!r}; it has {sorted(ds)}")
            ds = ds[split]
        return ds
    if path.suffix == ".arrow":
        return datasets.Dataset.from_file(str(path))  # memory-mapped
    return datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)


def _dataset_documents(path: Path, field: str, split: str | None) -> Iterator[str]:
    for i, row in enumerate(_dataset_rows(path, split)):
        value = row.get(field) if isinstance(row, dict) else None
        if not isinstance(value, str):
            have = sorted(row)[:8] if isinstance(row, dict) else type(row).__name__
            problem = f"no field {field!r} (fields: {have})" if not isinstance(row, dict) or field not in row \
                else f"field {field!r} is {type(value).__name__}, not a string"
            raise DataError(f"{path}: row {i}: {problem}; name the text column with field=")
        yield value


def _is_dataset_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def read_documents(source: Source, field: str = "text", split: str | None = None) -> Iterator[tuple[str, str]]:
    """``(name, text)`` pieces of every document of ``source``, streamed; a new ``name``
    starts a new document (a plain text file yields several pieces of one document)."""
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not paths:
        raise DataError("no corpus given: expected a text file, a JSON-lines file or a Hugging Face dataset")
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            if not _is_dataset_dir(path):
                raise DataError(f"{path} is a directory but not a saved Hugging Face dataset (no dataset_info.json "
                                "or dataset_dict.json); expected a text file, a .jsonl file, a .parquet/.arrow file "
                                "or a directory written by Dataset.save_to_disk")
            for i, text in enumerate(_dataset_documents(path, field, split)):
                yield f"{path}#{i}", text
        elif not path.is_file():
            raise DataError(f"{path}: no such file; expected a text file, a .jsonl file (field {field!r}), a "
                            ".parquet/.arrow file or a Hugging Face dataset directory")
        elif path.suffix in _JSONL:
            for i, text in enumerate(_jsonl_documents(path, field)):
                yield f"{path}:{i}", text
        elif path.suffix in _DATASET_FILES:
            for i, text in enumerate(_dataset_documents(path, field, split)):
                yield f"{path}#{i}", text
        else:
            for text in _text_chunks(path):
                yield str(path), text


# -- tokens and windows ---------------------------------------------------------------------
def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_stream(source: Source, tokenizer: Any, field: str = "text", split: str | None = None,
                 separator: int | None = None) -> Iterator[int]:
    """Token ids of the corpus, documents joined by ``separator`` (None: nothing between)."""
    current = None
    for name, text in read_documents(source, field, split):
        if name != current:
            if current is not None and separator is not None:
                yield separator
            current = name
        yield from _encode(tokenizer, text)


def _bos_id(tokenizer: Any) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise DataError(f"the tokenizer ({type(tokenizer).__name__}) has no BOS token, but windows prepend one; "
                        "pass bos=False for windows without BOS, or set tokenizer.bos_token")
    return int(bos)


def _windows(tokens: Iterator[int], seq_len: int, bos: int | None) -> Iterator[Tensor]:
    body = seq_len - (bos is not None)
    buf: list[int] = []
    for t in tokens:
        buf.append(t)
        if len(buf) == body:
            yield torch.tensor(([bos] if bos is not None else []) + buf, dtype=torch.long)
            buf = []


def buffer_shuffle(items: Iterable[Any], buffer: int, seed: int) -> Iterator[Any]:
    """Items in a pseudo-random order fixed by ``seed``, holding at most ``buffer`` at a time."""
    if buffer <= 1:
        yield from items
        return
    rng = random.Random(seed)
    held: list[Any] = []
    for item in items:
        if len(held) < buffer:
            held.append(item)
            continue
        i = rng.randrange(buffer)
        yield held[i]
        held[i] = item
    rng.shuffle(held)
    yield from held


def text_windows(
    source: Source,
    tokenizer: Any,
    seq_len: int,
    *,
    field: str = "text",
    split: str | None = None,
    bos: bool = True,
    shuffle_buffer: int = 0,
    seed: int = 0,
    max_windows: int | None = None,
) -> Iterator[Tensor]:
    """Windows ``[seq_len]`` of token ids from ``source`` under the BOS policy above, streamed.

    Raises :class:`DataError` (when the stream ends) if the corpus yielded no window.
    """
    if not isinstance(seq_len, int) or seq_len < 1 + bos:
        raise ValueError(f"seq_len must be an integer >= {1 + bos} (BOS plus at least one token), got {seq_len!r}")
    bos_id = _bos_id(tokenizer) if bos else None
    eos = getattr(tokenizer, "eos_token_id", None)
    tokens = token_stream(source, tokenizer, field, split, separator=eos)
    count = 0
    for window in buffer_shuffle(_windows(tokens, seq_len, bos_id), shuffle_buffer, seed):
        if max_windows is not None and count >= max_windows:
            return
        count += 1
        yield window
    if count == 0:
        raise DataError(f"the corpus {_name(source)} yielded no window of {seq_len} tokens "
                        f"({seq_len - bos} corpus tokens{' after BOS' if bos else ''}): it is empty or shorter "
                        "than one window; give more text or a smaller seq_len")


def _name(source: Source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return ", ".join(str(s) for s in source)


def window_batches(windows: Iterable[Tensor], batch_size: int, drop_last: bool = False) -> Iterator[dict[str, Tensor]]:
    """``{"input_ids", "attention_mask"}`` batches ``[batch, seq_len]`` of windows."""
    held: list[Tensor] = []
    for w in windows:
        held.append(w)
        if len(held) == batch_size:
            ids = torch.stack(held)
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            held = []
    if held and not drop_last:
        ids = torch.stack(held)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# -- positions to leave out ------------------------------------------------------------------
def analysis_mask(batch: dict[str, Tensor] | Tensor, bos_token_id: int | None = None,
                  keep_bos: bool = False) -> Tensor:
    """``[batch, pos]`` bool: True at positions that statistics, stores and SAEs should use.

    Excluded unless ``keep_bos``: each row's first real token (position 0 of a window; the
    first unpadded position under left padding) and any token equal to ``bos_token_id``
    (the attention sink, an outlier). Padding is always excluded.
    """
    ids = batch["input_ids"] if isinstance(batch, dict) else batch
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    if keep_bos:
        return real
    keep = real.clone()
    first = real.long().argmax(dim=1)  # first real position of each row
    keep[torch.arange(ids.shape[0]), first] = False
    if bos_token_id is not None:
        keep &= ids != bos_token_id
    return keep


# -- labelled text: probes and steering contrast sets --------------------------------------
TEXT_EXAMPLE = '{"text": "The film was wonderful.", "label": 1}'
READ_AT = ("last", "all")
_PROMPT_SUFFIXES = (".txt", *_JSONL)


def row_kind(path: str | os.PathLike) -> str | None:
    """``"text"`` or ``"tokens"``: the field the first row of a JSON-lines file has (``"text"``
    when it has both); None when it has neither or cannot be read (the full read reports why)."""
    row = first_row(path)
    if row is None:
        return None
    return "text" if "text" in row else "tokens" if "tokens" in row else None


def labelled_text(path: str | os.PathLike, label: Check, optional: dict[str, Check] | None = None,
                  flag: str = "--data") -> list[dict[str, Any]]:
    """Rows ``{"text": str, "label": ...}`` of a JSON-lines file, every line checked; the first
    missing or wrong-typed field is a :class:`DataError` naming the file and the line."""
    return read_jsonl(path, {"text": text_field(), "label": label}, optional, example=TEXT_EXAMPLE, flag=flag)


def text_batch(texts: Sequence[str], tokenizer: Any, where: str = "text") -> dict[str, Tensor]:
    """``{"input_ids", "attention_mask"}`` ``[n, pos]``: each text tokenised on its own as
    ``[BOS] + tokens`` (no BOS when the tokenizer has none), right-padded."""
    bos = getattr(tokenizer, "bos_token_id", None)
    rows = []
    for i, t in enumerate(texts):
        ids = _encode(tokenizer, t)
        if not ids:
            raise DataError(f"{where}: text {i + 1} ({t[:40]!r}) has no tokens under the model's tokenizer")
        rows.append(([int(bos)] if bos is not None else []) + ids)
    pad = next((p for p in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                if p is not None), 0)
    batch = collate(rows, pad_id=int(pad), side="right")
    batch.pop("position_ids")  # Hugging Face models make their own
    return batch


def read_mask(batch: dict[str, Tensor], read_at: str = "last", bos_token_id: int | None = None) -> Tensor:
    """``[n, pos]`` bool: where a site is read for each text of a right-padded ``batch``:
    its last real token (``"last"``), or every real token but position 0 / BOS (``"all"``).
    A text with nothing to read (only BOS, or one token without a BOS) is a DataError."""
    if read_at not in READ_AT:
        raise ValueError(f"read_at must be one of {list(READ_AT)}, got {read_at!r}")
    keep = analysis_mask(batch, bos_token_id)
    if read_at == "last":
        last = batch["attention_mask"].long().sum(1) - 1
        only = torch.zeros_like(keep)
        only[torch.arange(keep.shape[0]), last] = True
        keep &= only
    empty = torch.nonzero(~keep.any(1)).flatten()
    if empty.numel():
        raise DataError(f"text {int(empty[0]) + 1} has no token to read after position 0 (BOS); "
                        "every text needs at least one token of its own")
    return keep


def text_rows(model: Any, batch: dict[str, Tensor], site: Any, keep: Tensor) -> Tensor:
    """Rows ``[n_kept, d]`` of ``site``'s view (all positions) where ``keep [n, pos]`` is true,
    text-major; ``keep.nonzero()[:, 0]`` gives each row's text."""
    rows = activations(model, batch, site.replace(positions=None), drop_padding=False)  # [n * pos, d]
    return rows[keep.flatten().to(rows.device)]


def read_prompts(spec: str) -> list[str]:
    """Prompts from ``spec``: a ``.jsonl`` file (field ``"text"`` of each line), another text
    file (one prompt per non-blank line), or else ``spec`` itself as the one prompt. A name
    ending in .txt/.jsonl that is not a file is a DataError, not a prompt."""
    path = Path(spec).expanduser()
    if path.suffix in _JSONL and path.is_file():
        prompts = [t for _, t in read_documents(path)]
    elif path.is_file():
        try:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}); expected one prompt per line") from None
    elif path.is_dir() or path.suffix in _PROMPT_SUFFIXES:
        raise DataError(f"--prompts {spec}: no such file; give a text file (one prompt per line), a .jsonl file "
                        "with a \"text\" field, or the prompt itself")
    else:
        prompts = [spec]
    if not prompts or not all(p.strip() for p in prompts):
        raise DataError(f"--prompts {spec}: no prompt in it; give at least one non-empty prompt")
    return prompts


__all__ = ["BOS_POLICY", "READ_AT", "TEXT_EXAMPLE", "analysis_mask", "buffer_shuffle", "labelled_text",
           "read_documents", "read_mask", "read_prompts", "row_kind", "text_batch", "text_rows", "text_windows",
           "token_stream", "window_batches"]
