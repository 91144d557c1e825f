"""The activation store of the real suite's SAE row (issue 20, row 3), cached between runs
like the model, and the row's pooled statistics (pure, tested in CI without the model).

The store holds the residual stream of the reference model after block ``LAYER`` over the
first ``STORE_TOKENS`` tokens of the ``python-docs`` corpus, in windows of ``SEQ_LEN``
([BOS] + 127 corpus tokens, corpus order), BOS rows left out. It is written by the same
code as ``mechscope store`` (:func:`mechscope.core.text_store.write_text_store`) into
``cache_root()/stores/``; a later run reuses it when its manifest matches (model file
SHA-256, corpus files, tokenizer, budget), resumes it when it was interrupted, and refuses
it, naming what differs, when it was written from something else. The build is timed apart
from the row (the issue's "first run's cache builds timed separately").

Held-out text for the evaluation starts after the store's windows: the corpus is read in
order, so window ``STORE_WINDOWS`` onwards was never seen in training.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mechscope.core import aliases
from mechscope.core.corpora import corpus_files
from mechscope.core.load import cache_root, model_record
from mechscope.core.site import Site
from mechscope.core.store import Store
from mechscope.core.text_store import write_text_store

CORPUS = "python-docs"
LAYER = 8  # resid_post.8: the stream after 9 of Gemma-3-270M's 18 blocks, the middle of the model
STORE_TOKENS = 2 ** 20
SEQ_LEN = 128
STORE_BATCH = 8  # windows per forward
STORE_WINDOWS = math.ceil(STORE_TOKENS / SEQ_LEN)


def sae_site(model: nn.Module) -> Site:
    return aliases.resid_post(model, LAYER)


def store_dir(name: str, dtype: torch.dtype = torch.float32) -> Path:
    """Where the store of model ``name`` lives: one directory per model, site, budget and row dtype."""
    kind = "" if dtype == torch.float32 else "-" + str(dtype).removeprefix("torch.")
    return cache_root() / "stores" / f"{name}-resid_post.{LAYER}-{CORPUS}-{STORE_TOKENS}x{SEQ_LEN}{kind}"


def cached_store(model: nn.Module, tokenizer: Any, name: str, log: Any = None) -> tuple[Store, dict[str, Any]]:
    """The store (built, or resumed, here when it is missing or unfinished) and what its
    build cost in this call: ``{"built": bool, "seconds": float, "path": str}``."""
    out = store_dir(name, next(model.parameters()).dtype)
    t0 = time.perf_counter()
    if log is not None:
        log.info(f"activation store of the SAE row: {out} (built on the first run: "
                 f"{STORE_TOKENS:,} tokens through {LAYER + 1} blocks)")
    store, windows = write_text_store(model, tokenizer, [sae_site(model)], corpus_files(CORPUS), out,
                                      tokens=STORE_TOKENS, seq_len=SEQ_LEN, batch_size=STORE_BATCH,
                                      record=model_record(name, model), progress=log is not None)
    seconds = time.perf_counter() - t0
    built = windows is not None
    if log is not None and built:
        log.info(f"store built in {seconds:.0f} s ({windows} windows)")
    return store, {"built": built, "seconds": round(seconds, 1), "path": str(out), "rows": store.n_rows}


def fvu_of(parts: Tensor, d: int) -> Tensor:
    """FVU from per-window columns ``[w, 3 + d]`` = (error, rows, squared norms, row sums):
    the error over the variance about the pooled mean."""
    err, n, sq, s = parts[:, 0].sum(), parts[:, 1].sum(), parts[:, 2].sum(), parts[:, 3:3 + d].sum(0)
    return err / (sq - s.pow(2).sum() / n)


def recovered_of(losses: Tensor) -> Tensor:
    """CE loss recovered from per-window summed losses ``[w, 3]`` = (clean, zero-ablated, spliced)."""
    clean, zero, spliced = losses.sum(0)
    return (zero - spliced) / (zero - clean)


__all__ = ["CORPUS", "LAYER", "SEQ_LEN", "STORE_TOKENS", "STORE_WINDOWS", "cached_store", "fvu_of", "recovered_of",
           "sae_site", "store_dir"]
