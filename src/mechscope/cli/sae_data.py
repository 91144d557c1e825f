"""Where ``mechscope sae`` reads activations from, and what a run records of it.

:func:`data_stream` opens a store, a world or synthetic data; :func:`live_model` and
:func:`live_stream` run a pretrained model over a text corpus. :func:`run_fingerprint` is the
data source as a checkpoint's fingerprint checks it on resume (the store's identity, the
world model's weights, the corpus files and the model record); :func:`provenance` is what the
dictionary file records of a real model and its text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechscope.cli import UsageError
from mechscope.cli.model_source import ModelSource
from mechscope.core.config import config, config_from_args

if TYPE_CHECKING:
    from mechscope.cli.sae import DataConfig


@config
class LiveModel(ModelSource):
    """A pretrained model with its tokenizer, run live over --corpus."""

    FIELD_HELP = {"model": "a pretrained model with its tokenizer (a Hugging Face directory, a .gguf file, "
                           "gemma-3-270m): with --corpus, the dictionary reads its activations at --site live",
                  "device": "where the dictionary trains and a live model runs: cpu, cuda, cuda:N or auto (a live "
                            "model on accelerate's device map, the dictionary on the first GPU, else the CPU); "
                            "under torchrun, cuda is each rank's own GPU"}


def data_stream(data: DataConfig, batch_size: int, kind: str = "sae") -> tuple[Any, int, int | None, Any]:
    """``(batches, d_in, d_out, source)``: rows, or (x, y) pairs for a transcoder read from a store."""
    if data.synthetic:
        from mechscope.tasks.synthetic_features import SyntheticFeatures

        world = SyntheticFeatures()
        return world.batches(batch_size, seed=data.data_seed), world.cfg.d, None, world
    if data.world is not None:
        from mechscope.tasks.sae_worlds import load_world

        world = load_world(data.world)
        first = next(world.stream(8, 0))
        return world.stream(batch_size, data.data_seed), int(first.shape[-1]), None, world
    from mechscope.core.store import open_store
    from mechscope.sae.data import store_batches

    store = open_store(data.store)
    if kind == "sae":
        return store_batches(store, data.site, batch_size, seed=data.data_seed), store.d(data.site), None, store
    if data.target_site is None:
        raise UsageError(f"a {kind} reads --site and predicts --target-site; give --target-site")
    x_site, y_site = _resolve(store, data.site), _resolve(store, data.target_site)
    pairs = store_batches(store, [x_site, y_site], batch_size, seed=data.data_seed)
    return ((b[x_site], b[y_site]) for b in pairs), store.d(x_site), store.d(y_site), store


def _resolve(store: Any, ref: str) -> Any:
    key = store.key(ref)
    return next(s for s in store.sites if store.key(s) == key)



def live_model(args: argparse.Namespace, data: DataConfig) -> tuple[Any, Any, Any, Any]:
    """``(model, tokenizer, site, text source)`` for ``--model M --corpus C --site S``."""
    from mechscope.cli.model_source import load, resolve_site
    from mechscope.sae.text_data import TextSource

    source = config_from_args(LiveModel, args)
    if source.model is None:
        raise UsageError("--corpus needs --model: a pretrained model with its tokenizer (a Hugging Face "
                         "directory, a .gguf file or gemma-3-270m)")
    model, tokenizer = load(source)
    if tokenizer is None:
        raise UsageError(f"--model {source.model} has no tokenizer, so it cannot read --corpus; give a pretrained "
                         "model, or write a store of its activations with your own inputs")
    from mechscope.core.corpora import resolve_corpus

    text = TextSource(resolve_corpus(data.corpus), data.seq_len, data.field, data.split, data.shuffle_buffer,
                      data.data_seed, data.keep_bos)
    return model, tokenizer, resolve_site(model, data.site), (text, source)


def live_stream(args: argparse.Namespace, data: DataConfig, batch_size: int, comm: Any) -> tuple[Any, int, Any]:
    """Training rows of a live model over the corpus, their width, and the stream (for its record)."""
    import itertools

    from mechscope.sae.text_data import TextActivations

    model, tokenizer, site, (text, source) = live_model(args, data)
    live = TextActivations(model, tokenizer, site, text, batch_size=batch_size, batch_windows=data.batch_windows,
                           buffer_rows=data.buffer_rows, seed=data.data_seed, rank=comm.rank,
                           world_size=comm.world_size)
    rows = iter(live)
    first = next(rows, None)
    if first is None:
        raise UsageError(f"--corpus {data.corpus} gave fewer rows than one batch of {batch_size}; give more text "
                         "or a smaller --batch-size")
    return itertools.chain([first], rows), int(first.shape[-1]), (live, source.model)


def run_fingerprint(data: DataConfig, source: Any, live: Any) -> dict[str, Any]:
    """What a checkpoint records of the data source, checked on resume: every data option (the
    store's path resolved), the store's identity (a hash of its manifest's meta, sites and shard
    checksums), the world model's weights, or the corpus read and the live model's weights."""
    import hashlib

    from mechscope.core.checkpoint import tensor_sha256

    found = data.to_dict()
    if data.store is not None:
        m = source.manifest
        ident = {"meta": m.get("meta"), "sites": m["sites"], "shards": [s.get("sha256") for s in m["shards"]]}
        found["store"] = str(Path(data.store).resolve())
        found["store_manifest"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    if data.world is not None:
        weights = "".join(f"{n} {tensor_sha256(t)}\n" for n, t in sorted(source.model.state_dict().items()))
        found["world_model"] = hashlib.sha256(weights.encode()).hexdigest()[:16]
    if live is not None:
        from mechscope.core.load import model_record

        stream, spec = live
        found["corpus"] = stream.text.record(0)["corpus"]  # the resolved files and their sizes
        record = model_record(_spec(spec), stream.model)
        found["model"] = {k: record.get(k) for k in ("model", "model_sha256", "dtype")}
    return found


def provenance(data: DataConfig, live: Any) -> dict[str, Any]:
    """What a checkpoint records of a real model and its text: the model record (weights SHA-256,
    library versions, dtype) and the corpus read, from the live run or the store's manifest."""
    from mechscope.core.load import model_record

    if live is not None:
        stream, spec = live
        return {"model": model_record(_spec(spec), stream.model), "text": stream.record()}
    if data.store is None:
        return {}
    from mechscope.core.store import open_store

    meta = open_store(data.store).meta or {}
    text = None
    if meta.get("source") == "text":
        text = {"corpus": meta["corpus"], "seq_len": meta["seq_len"], "shuffle_buffer": meta["shuffle_buffer"],
                "seed": meta["seed"], "keep_bos": meta["keep_bos"], "windows_read": meta["windows"],
                "corpus_windows_touched": meta["windows"] + meta["shuffle_buffer"]}
    return {k: v for k, v in (("model", meta.get("model")), ("text", text)) if v is not None}


def _spec(model: str) -> str:
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model
