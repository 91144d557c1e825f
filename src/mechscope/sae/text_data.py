"""Dictionaries on a pretrained model's activations over text, with no store in between.

- :class:`TextActivations`: training rows of one site, live: the model runs over windows of
  a corpus (:func:`mechscope.core.text.text_windows`: ``[BOS] + (seq_len - 1)`` tokens,
  seeded buffer shuffle), rows are mixed in :func:`~mechscope.sae.data.live_activations`'
  buffer and served ``[batch_size, d]``. It counts the corpus windows it has read, so a
  checkpoint can say which text trained it and an evaluation can stay off that text.
- :func:`evaluate_on_text`: FVU, L0, dead fraction and CE loss recovered of a dictionary on
  held-out windows (the windows after ``skip_windows``, in corpus order).

BOS / position 0 (the attention sink, an outlier whose residual norm dwarfs a typical
token's) is left out by default, as in stores (:func:`mechscope.core.text.analysis_mask`):
its rows neither train nor score a dictionary, and when the dictionary is spliced in for CE
loss recovered, position 0 keeps the model's own activation (zero ablation, the other end
of the scale, also spares it). ``keep_bos=True`` keeps it everywhere.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from mechscope.core.collect import site_rows
from mechscope.core.run import cache
from mechscope.core.site import Site
from mechscope.core.text import Source, analysis_mask, text_windows, window_batches
from mechscope.core.text_store import corpus_spec, input_device
from mechscope.sae.arch import SAE, SAEError
from mechscope.sae.data import live_activations
from mechscope.sae.evals import evaluate
from mechscope.sae.splice import ce_loss_recovered


@dataclass(frozen=True)
class TextSource:
    """A corpus cut into windows: what identifies the text a dictionary saw."""

    corpus: Source
    seq_len: int = 128
    field: str = "text"
    split: str | None = None
    shuffle_buffer: int = 0
    seed: int = 0
    keep_bos: bool = False

    def windows(self, tokenizer: Any, *, skip: int = 0, limit: int | None = None,
                shuffle: bool = True) -> Iterator[Tensor]:
        """Windows ``[seq_len]`` after the first ``skip`` (at most ``limit``); ``shuffle=False``
        reads them in corpus order (held-out evaluation)."""
        stream = text_windows(self.corpus, tokenizer, self.seq_len, field=self.field, split=self.split,
                              shuffle_buffer=self.shuffle_buffer if shuffle else 0, seed=self.seed)
        return itertools.islice(stream, skip, None if limit is None else skip + limit)

    def record(self, windows_read: int, *, shuffled: bool = True) -> dict[str, Any]:
        """What a checkpoint records: the corpus and how far into it the reading went. With a
        shuffle buffer of K the reader has drawn up to K windows beyond those it served."""
        ahead = self.shuffle_buffer if shuffled else 0
        return {"corpus": corpus_spec(self.corpus, self.field, self.split), "seq_len": self.seq_len,
                "shuffle_buffer": self.shuffle_buffer, "seed": self.seed, "keep_bos": self.keep_bos,
                "windows_read": windows_read, "corpus_windows_touched": windows_read + ahead}


class TextActivations:
    """A stream of training rows ``[batch_size, d]`` of ``site`` over ``text``.

    ``windows_read`` counts the corpus windows the model has run on so far. The stream ends
    when the corpus does (the trainer then says how many steps it got).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, site: Site, text: TextSource, *, batch_size: int = 4096,
                 batch_windows: int = 8, buffer_rows: int = 65536, seed: int = 0,
                 device: torch.device | str | None = None, rank: int = 0, world_size: int = 1) -> None:
        self.model, self.tokenizer, self.site, self.text = model, tokenizer, site, text
        self.batch_size, self.batch_windows, self.buffer_rows, self.seed = batch_size, batch_windows, buffer_rows, seed
        self.device = device if device is not None else input_device(model)
        self.rank, self.world_size = rank, world_size
        self.windows_read = 0

    def _counted(self) -> Iterator[Tensor]:
        """This process's windows: every ``world_size``-th from its rank (each rank runs the
        model on its own text under torchrun)."""
        for window in itertools.islice(self.text.windows(self.tokenizer), self.rank, None, self.world_size):
            self.windows_read += 1
            yield window

    def record(self) -> dict[str, Any]:
        """:meth:`TextSource.record` of what all ranks have read (they read in step)."""
        return self.text.record(self.windows_read * self.world_size)

    def __iter__(self) -> Iterator[Tensor]:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        batches = ({k: v.to(self.device) for k, v in b.items()}
                   for b in window_batches(self._counted(), self.batch_windows))
        rows = live_activations(self.model, batches, [self.site], self.batch_size, buffer_rows=self.buffer_rows,
                                seed=self.seed, row_mask=lambda b: analysis_mask(b, bos, self.text.keep_bos))
        for batch in rows:
            yield batch[self.site]


def held_out_skip(trained: dict[str, Any] | None, text: TextSource, asked: int | None) -> int:
    """Windows of ``text`` to skip so that an evaluation reads no text that trained the dictionary.

    ``trained`` is the ``text`` record the dictionary was saved with (None when it was not
    trained on text). On the same corpus the default skips every corpus token its training
    touched (windows of another ``seq_len`` are converted through the tokens: each window
    holds ``seq_len - 1`` corpus tokens after BOS); an explicit ``asked`` below that is
    refused, naming the number to give.
    """
    if trained is None or trained.get("corpus") != corpus_spec(text.corpus, text.field, text.split):
        return 0 if asked is None else asked
    tokens = int(trained.get("corpus_windows_touched", 0)) * (int(trained.get("seq_len", text.seq_len)) - 1)
    needed = math.ceil(tokens / (text.seq_len - 1))
    if asked is None:
        return needed
    if asked < needed:
        raise SAEError(f"the dictionary was trained on the first {tokens} tokens of this corpus; evaluating "
                       f"after {asked} windows of {text.seq_len} would score it on its training text: give "
                       f"--skip-windows {needed} or more, or another corpus")
    return asked


def evaluate_on_text(sae: SAE, model: nn.Module, tokenizer: Any, site: Site, text: TextSource, *,
                     windows: int, skip_windows: int = 0, batch_windows: int = 8) -> dict[str, Any]:
    """Activation metrics and CE loss recovered of ``sae`` at ``site`` on ``windows`` windows of
    ``text`` after the first ``skip_windows``, in corpus order (no shuffle).

    Rows at BOS / position 0 are left out unless ``text.keep_bos``; so is position 0 from the
    splice. Returns :func:`~mechscope.sae.evals.evaluate`'s numbers (no ``density``), those of
    :func:`~mechscope.sae.splice.ce_loss_recovered`, and ``windows`` / ``skip_windows``.
    """
    if sae.cfg.kind != "sae":
        raise SAEError(f"evaluate_on_text scores an autoencoder; a {sae.cfg.kind} reads one site and writes "
                       "another: evaluate it from a store with both sites")
    held = list(text.windows(tokenizer, skip=skip_windows, limit=windows, shuffle=False))
    if not held:
        raise SAEError(f"no held-out window left after skipping {skip_windows}: the corpus is shorter; "
                       "give a smaller --skip-windows or another corpus")
    device, bos = input_device(model), getattr(tokenizer, "bos_token_id", None)
    batches = [{k: v.to(device) for k, v in b.items()} for b in window_batches(held, batch_windows)]
    stats = {k: v for k, v in evaluate(sae, _rows(model, batches, site, bos, text.keep_bos)).items()
             if k != "density"}
    spliced = site if text.keep_bos or site.positions is not None else site.replace(positions=slice(1, None))
    ce = ce_loss_recovered(model, batches, spliced, sae)
    return {**stats, **ce, "windows": len(held), "skip_windows": skip_windows,
            "positions": "every position, BOS included" if text.keep_bos else "BOS / position 0 excluded"}


def _rows(model: nn.Module, batches: list[dict[str, Tensor]], site: Site, bos: int | None,
          keep_bos: bool) -> Iterator[Tensor]:
    """Rows ``[n, d]`` of ``site`` per batch, at the positions :func:`analysis_mask` keeps."""
    for batch in batches:
        with torch.no_grad():
            acts = cache(model, batch, [site])  # stops after the site
        yield site_rows(acts, {"attention_mask": analysis_mask(batch, bos, keep_bos)}, [site])[site]
