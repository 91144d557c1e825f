"""An activation store from text: a model streamed over a corpus into :func:`write_store`.

``write_text_store(model, tokenizer, sites, corpus, out_dir, tokens=N, seq_len=L)`` cuts the
corpus into windows (:func:`mechscope.core.text.text_windows`: ``[BOS] + (L - 1)`` corpus
tokens, seeded buffer shuffle), runs ``ceil(N / L)`` of them in batches and writes the
rows of every site to the sharded store of :mod:`mechscope.core.store`.

- **Positions**: BOS / position 0 (the attention sink, an outlier) is left out of the
  rows by default (:func:`~mechscope.core.text.analysis_mask`); ``keep_bos=True`` keeps
  it. The model always runs on the whole window. The manifest's ``meta`` says which.
- **Resume**: the manifest's ``meta`` records everything that decides which rows the store
  holds: the corpus (resolved paths, sizes, field, split), ``seq_len``, ``batch_size``,
  ``tokens``, ``seed``, ``shuffle_buffer``, the BOS policy, the tokenizer and the model
  record (:func:`mechscope.core.load.model_record`: weights SHA-256, library versions,
  dtype). Run again with the same settings, an interrupted store continues (the batches
  already written are tokenised again but not run); a different setting is refused, naming it.
- **Overlap**: a background thread tokenises the next batches (two ahead) while the model
  runs this one; the order, and so the store, is the same as without it.
- **Ranks**: with ``comm`` (the ranks of one ``torchrun`` launch, from
  :func:`~mechscope.core.distributed.init_distributed`) rank ``r`` of ``N`` tokenises the same
  windows but runs only input batches ``r, r + N, r + 2N, ...`` and writes its own shards
  into the one ``out_dir``; rank 0 then writes one manifest listing every rank's shards,
  rank by rank (:mod:`mechscope.core.store_ranks`). The rows are the single-process store's,
  in that order; ``meta`` records ``world_size``, and an interrupted store resumes only with
  the same one.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import queue
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.distributed import Comm
from mechscope.core.progress import Progress
from mechscope.core.site import Site
from mechscope.core.store import Store, write_store
from mechscope.core.store_manifest import MANIFEST, rank_manifest_name
from mechscope.core.store_ranks import write_store_ranks
from mechscope.core.text import BOS_POLICY, Source, analysis_mask, text_windows, window_batches

POSITIONS = {False: "BOS / position 0 excluded (attention sink)", True: "every position, BOS included"}


def corpus_spec(source: Source, field: str = "text", split: str | None = None) -> dict[str, Any]:
    """What identifies a corpus: its resolved paths with their sizes, the text field, the split."""
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files = []
    for p in paths:
        path = Path(p).expanduser().resolve()
        files.append({"path": str(path), "bytes": path.stat().st_size if path.is_file() else None})
    return {"files": files, "field": field, "split": split}


def tokenizer_spec(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's class, vocabulary size and special ids (what changes the windows)."""
    return {"class": type(tokenizer).__name__, "vocab": len(tokenizer),
            "bos": getattr(tokenizer, "bos_token_id", None), "eos": getattr(tokenizer, "eos_token_id", None)}


def n_windows(tokens: int, seq_len: int) -> int:
    """Windows a token budget asks for: ``tokens`` of model input, rounded up to whole windows."""
    return math.ceil(tokens / seq_len)


def text_store_meta(corpus: Source, tokenizer: Any, *, tokens: int, seq_len: int, batch_size: int, field: str,
                    split: str | None, seed: int, shuffle_buffer: int, keep_bos: bool,
                    record: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's ``meta`` of a text store: every setting that decides its rows."""
    return {"source": "text", "corpus": corpus_spec(corpus, field, split), "tokens": tokens, "seq_len": seq_len,
            "windows": n_windows(tokens, seq_len), "batch_size": batch_size, "seed": seed,
            "shuffle_buffer": shuffle_buffer, "keep_bos": keep_bos, "positions": POSITIONS[keep_bos],
            "bos_policy": BOS_POLICY, "tokenizer": tokenizer_spec(tokenizer), "model": record}


def _done_batches(out_dir: Path, name: str = MANIFEST) -> int:
    """Input batches an existing (interrupted) store (or a rank's slice: ``name``) already covers; 0 when none."""
    try:
        return int(json.loads((out_dir / name).read_text()).get("n_batches", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0  # write_store reads and checks it properly


def input_device(model: nn.Module) -> torch.device:
    """Where the model takes its token ids: its input embedding's device (the first device
    of an accelerate device map), else its first parameter's."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embed, "weight", None)
    if isinstance(weight, Tensor):
        return weight.device
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _to(device: torch.device, batches: Iterator[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
    for batch in batches:
        yield {k: v.to(device) for k, v in batch.items()}


def _prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """``items`` made by a background thread up to ``depth`` ahead, so that tokenising the next
    batches overlaps the forward of this one; an error there is raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, end))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put((False, e))

    thread = threading.Thread(target=produce, name="mechscope-store-windows", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is end:
                return
            yield item
    finally:  # the consumer stopped (done, an error, Ctrl-C): let the producer go
        stop.set()
        thread.join()


class _Counted:
    """Windows of a text stream, counted as they pass."""

    def __init__(self, windows: Iterator[Tensor]) -> None:
        self.windows, self.count = windows, 0

    def __iter__(self) -> Iterator[Tensor]:
        for w in self.windows:
            self.count += 1
            yield w


def write_text_store(
    model: nn.Module,
    tokenizer: Any,
    sites: Site | Sequence[Site],
    corpus: Source,
    out_dir: str | os.PathLike,
    *,
    tokens: int,
    seq_len: int = 128,
    batch_size: int = 8,
    field: str = "text",
    split: str | None = None,
    seed: int = 0,
    shuffle_buffer: int = 0,
    keep_bos: bool = False,
    dtype: torch.dtype | None = None,
    shard_rows: int = 65536,
    record: dict[str, Any] | None = None,
    progress: bool = False,
    comm: Comm | None = None,
) -> tuple[Store, int | None]:
    """Write ``sites`` of ``model`` over ``ceil(tokens / seq_len)`` windows of ``corpus``
    to a store in ``out_dir`` (see the module docstring); returns ``(store, windows read)``
    (None when the store was complete already and nothing was read).

    ``dtype`` of the rows defaults to the model's; ``record`` (a
    :func:`~mechscope.core.load.model_record`) goes into the manifest's ``meta``.
    ``progress`` shows a bar of input batches on stderr. A corpus with fewer windows than
    asked gives a smaller store (the count returned says how many); one with none is a
    :class:`~mechscope.core.jsonl.DataError`. ``comm`` with more than one rank: every rank
    calls this with the same arguments and writes its share (see the module docstring); only
    rank 0 shows progress.
    """
    if tokens < 1 or batch_size < 1:
        raise ValueError(f"tokens and batch_size must be at least 1, got {tokens} and {batch_size}")
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters()), torch.float32)
    out_dir = Path(out_dir)
    meta = text_store_meta(corpus, tokenizer, tokens=tokens, seq_len=seq_len, batch_size=batch_size, field=field,
                           split=split, seed=seed, shuffle_buffer=shuffle_buffer, keep_bos=keep_bos, record=record)
    windows = _Counted(text_windows(corpus, tokenizer, seq_len, field=field, split=split, shuffle_buffer=shuffle_buffer,
                                    seed=seed, max_windows=meta["windows"]))
    bos = tokenizer.bos_token_id
    rank, world = (comm.rank, comm.world_size) if comm is not None else (0, 1)
    total = len(range(rank, math.ceil(meta["windows"] / batch_size), world))  # this rank's input batches
    done = _done_batches(out_dir, MANIFEST if world == 1 else rank_manifest_name(rank))
    label = "store" if world == 1 else f"store (rank 0 of {world})"  # rank 0's bar: its own slice
    bar = Progress(total, label=label, enabled=progress and rank == 0, start=done)
    every = 1 if bar.shows_bar else max(1, total // 20)  # logs get about 20 lines

    def show(done: int, rows: int) -> None:
        if done % every == 0 or done == total:
            bar.update(done, f"{rows:,} rows")

    mine = itertools.islice(window_batches(windows, batch_size), rank, None, world)  # every rank tokenises all
    ahead = _prefetch(mine)  # its thread starts at the first batch
    kwargs = dict(shard_rows=shard_rows, dtype=dtype, progress=show, meta=meta,
                  row_mask=lambda batch: analysis_mask(batch, bos, keep_bos))
    try:
        if world > 1:
            store = write_store_ranks(model, sites, _to(input_device(model), ahead), out_dir, comm, **kwargs)
        else:
            store = write_store(model, sites, _to(input_device(model), ahead), out_dir, **kwargs)
    finally:
        ahead.close()  # stops the tokenising thread when write_store stopped early
        bar.close()
    return store, (windows.count if windows.count or not store.complete else None)


__all__ = ["POSITIONS", "corpus_spec", "input_device", "n_windows", "text_store_meta", "tokenizer_spec", "write_text_store"]
