"""``mechscope store``: activations of a model over a text corpus, written to an activation store.

The model (``--model``: a local Hugging Face directory, a .gguf file, gemma-3-270m; it needs
its tokenizer) runs over windows of the corpus (``--corpus``: a text file, a .jsonl file
with a text ``--field``, a .parquet/.arrow file or a saved Hugging Face dataset): each
window is [BOS] + (seq_len - 1) corpus tokens, ceil(tokens / seq_len) windows in all,
shuffled by --seed through a buffer of --shuffle-buffer windows (0: corpus order). The rows
of every site go to a sharded safetensors store in --out (``mechscope sae train --store``
reads it). BOS / position 0, the attention sink, is left out of the rows unless --keep-bos.

--out is locked while the command runs. Run again with the same options, an interrupted
store continues where it stopped; with a different corpus, seq-len, seed, shuffle buffer,
token budget, batch size or model the command refuses (exit 2) and names what differs. Rows
are stored in the model's --dtype. The manifest records the model
file's SHA-256, the library versions, the dtype and the position policy.

Under torchrun (``torchrun --nproc-per-node N -m mechscope store ...``) the N processes write
one store together: each tokenises the same windows, runs every N-th input batch (rank r:
batches r, r+N, ...) and writes its own shards (shard-rRRRRR-IIIII.safetensors) into --out;
rank 0 then writes one manifest listing every shard, rank 0's first. The store holds the
rows one process would write, in that order; the manifest records the world size. An
interrupted store resumes with the same N (another N is refused, exit 2); a complete one
is reused by any N. With --device cuda each rank uses its own GPU (cuda:LOCAL_RANK, round-robin
when there are more ranks than GPUs).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import ClassVar, Optional

from mechscope.cli import UsageError
from mechscope.cli.model_source import ModelSource, compute_device, load, resolve_site
from mechscope.core.config import Config, add_config_arguments, config, config_from_args, param

DESCRIPTION = __doc__.split("\n\n", 1)[1]
HELP = "write a model's activations over a text corpus to an activation store"


@config
class StoreModel(ModelSource):
    """The model whose activations are stored: pretrained, with its tokenizer."""

    model_required: ClassVar[bool] = True


@config
class StoreConfig(Config):
    """Options of ``mechscope store`` besides the model."""

    corpus: Path = param(metavar="PATH", help="a text file, a .jsonl file, a .parquet/.arrow file, a saved "
                                              "Hugging Face dataset directory, or an installed corpus by name "
                                              "(python-docs: see `mechscope corpus`)")
    sites: tuple[str, ...] = param(metavar="SITE[,SITE...]", help="site aliases (resid_post.6, mlp_out.3, ...) or "
                                                                  "module paths, comma-separated")
    tokens: int = param(ge=1, help="tokens of model input to run (rounded up to whole windows)")
    out: Path = param(metavar="DIR", help="the store directory (resumed when it holds an interrupted store)")
    seq_len: int = param(128, ge=2, help="tokens per window, BOS included")
    batch_size: int = param(8, ge=1, help="windows per forward")
    field: str = param("text", help="the text field of a .jsonl file or a dataset")
    split: Optional[str] = param(None, help="the split of a dataset saved with splits")
    seed: int = param(0, help="seed of the window shuffle")
    shuffle_buffer: int = param(0, ge=0, metavar="K", help="shuffle windows through a buffer of K (0: corpus order)")
    keep_bos: bool = param(False, help="keep the BOS / position-0 rows (the attention sink)")
    shard_rows: int = param(65536, ge=1, help="rows per shard file (at least; shards hold whole batches)")
    threads: int = param(0, ge=0, help="torch threads (0: torch's default)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("store", help=HELP, description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser.add_argument_group("model"), StoreModel)
    add_config_arguments(parser.add_argument_group("data and output"), StoreConfig)
    return parser


def _record_spec(spec: str) -> str:
    """The model as the manifest records it: an existing path made absolute (so that a resume
    from another directory matches), else the name as given."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def run(args: argparse.Namespace) -> int:
    source, cfg = config_from_args(StoreModel, args), config_from_args(StoreConfig, args)
    if source.model is None:
        raise UsageError("mechscope store needs a pretrained model with its tokenizer: give --model "
                         "(a Hugging Face directory, a .gguf file or gemma-3-270m); --hf-config has no tokenizer")
    import torch

    from mechscope.core.corpora import resolve_corpus
    from mechscope.core.distributed import finish, init_distributed
    from mechscope.core.lock import lock_dir
    from mechscope.core.text_store import POSITIONS, write_text_store

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    comm = None
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # under torchrun: the ranks write one store together
        comm = init_distributed("gloo")  # the store's collectives are barriers: gloo, whatever the device
        if source.device == "cuda":  # one GPU per rank, not every rank on the first
            source = source.replace(device=compute_device(source.device))
    with lock_dir(cfg.out, "--out"):  # checked and locked before the model loads (write_store takes it again)
        model, tokenizer = load(source)
        if tokenizer is None:
            raise UsageError(f"--model {source.model} has no tokenizer (a built-in model works on its own tokens); "
                             "mechscope store needs a pretrained model with its tokenizer")
        sites = [resolve_site(model, spec) for spec in cfg.sites]
        from mechscope.core.load import model_record

        record = model_record(_record_spec(source.model), model)
        store, windows = write_text_store(
            model, tokenizer, sites, resolve_corpus(cfg.corpus), cfg.out, tokens=cfg.tokens, seq_len=cfg.seq_len,
            batch_size=cfg.batch_size, field=cfg.field, split=cfg.split, seed=cfg.seed,
            shuffle_buffer=cfg.shuffle_buffer, keep_bos=cfg.keep_bos, shard_rows=cfg.shard_rows, record=record,
            progress=True, comm=comm)
    if comm is not None:
        finish(comm)  # only after success: a failed rank exits and torchrun stops the others
        if comm.rank != 0:
            return 0  # rank 0 reports the store the ranks wrote
    asked = store.meta["windows"]
    if windows is None:
        print(f"{cfg.out} already holds this complete store: nothing to do", file=sys.stderr)
    elif windows < asked:
        print(f"note: the corpus gave {windows} windows of {cfg.seq_len} tokens, fewer than the {asked} asked for",
              file=sys.stderr)
    widths = ", ".join(f"{s} (d={store.d(i)})" for i, s in enumerate(store.sites))
    print(f"wrote {cfg.out}: {store.n_rows:,} rows of {widths} in {len(store.shards)} shard(s); "
          f"{POSITIONS[cfg.keep_bos]}")
    return 0
