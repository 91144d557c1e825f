"""An activation store written by the ranks of one ``torchrun`` launch into one directory.

Every rank reads the same deterministic dataset and runs every ``world_size``-th input batch
from its rank (global batches ``r, r + N, r + 2N, ...``; the caller slices them, e.g.
:func:`mechscope.core.text_store.write_text_store`). The ranks together run exactly the
batches one process would, each batch whole, so every row is the row a single process
writes (the same forward on the same batch). Rank ``r`` writes only its own files::

    shard-r00001-00000.safetensors   rank 1's shards: rank-distinct names, no file has two writers
    manifest-r00001.json             rank 1's progress: a manifest of its own shards, whose
                                     ``batches`` count the input batches of its slice (0, 1, ...)
    manifest.json                    rank 0's: incomplete and without shards while the ranks
                                     write (it marks the directory, with the world size), then
                                     the merged store

**Order**: once every rank is done (a barrier), rank 0 writes the merged ``manifest.json``
atomically and removes the rank manifests. It lists rank 0's shards in the order written,
then rank 1's, and so on (rank-major); a shard's ``batches`` count input batches in that
order (rank ``r``'s slice follows the slices of ranks ``0 .. r-1``) and the entry keeps
``rank`` and ``rank_batches`` (its range within the rank's slice). ``n_rows`` and
``n_batches`` are the totals, so it is an ordinary store to every reader; its rows are the
single-process store's rows in this order. ``meta`` gains ``world_size`` (absent: 1).

**Resume**: an interrupted store (``manifest.json`` incomplete) continues only with the same
world size and settings: each rank skips the batches its own manifest covers. Another
world size, or one process, is refused naming both numbers. A complete store is reused
as is by any number of processes (its rows do not depend on it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from mechscope.core.checkpoint import load_json, save_json_atomic
from mechscope.core.distributed import Comm
from mechscope.core.lock import lock_dir
from mechscope.core.site import Site
from mechscope.core.store import (
    Store,
    _clean_leftovers,
    _new_manifest,
    _resume_conflicts,
    _ShardWriter,
    _write,
    check_sites,
    existing_manifest,
)
from mechscope.core.store_manifest import (
    MANIFEST,
    RECREATE,
    check_manifest,
    rank_files,
    rank_manifest_name,
    rank_shard_glob,
    rank_shard_name,
)


def write_store_ranks(
    model: nn.Module,
    sites: Site | Sequence[Site],
    batches: Iterable[Any],
    out_dir: str | Path,
    comm: Comm,
    *,
    shard_rows: int = 65536,
    dtype: torch.dtype = torch.float32,
    drop_padding: bool = True,
    resume: bool = True,
    progress: Callable[[int, int], None] | None = None,
    meta: dict[str, Any] | None = None,
    row_mask: Callable[[Any], Tensor] | None = None,
) -> Store:
    """:func:`~mechscope.core.store.write_store` run by every rank of ``comm`` together.

    ``batches`` are this rank's input batches (its slice of the dataset, see the module
    docstring); every other argument is the same on every rank and means what it means for
    ``write_store``. Every rank returns the merged store once rank 0 has written it.
    ``progress(batches_done, rows_done)`` counts this rank's slice.
    """
    sites = check_sites(sites, shard_rows)
    out_dir, rank = Path(out_dir), comm.rank
    fresh = _new_manifest(sites, dtype, drop_padding, shard_rows, {**(meta or {}), "world_size": comm.world_size})
    with lock_dir(out_dir, "activation store"):  # rank 0 takes it, the other ranks of the launch join it
        old = existing_manifest(out_dir, fresh, resume)  # the same answer on every rank: nothing changed yet
        comm.barrier()  # every rank has read the directory before rank 0 changes it
        if old is None or not old["complete"]:
            if rank == 0 and old is None:
                _clean_leftovers(out_dir, 0)
                for p in rank_files(out_dir):
                    p.unlink()
                save_json_atomic(out_dir / MANIFEST, fresh)  # marks the directory: a resume checks it
            comm.barrier()
            mine = _rank_start(out_dir, fresh, rank)
            if not mine["complete"]:
                writer = _ShardWriter(out_dir, mine, dtype, rank_manifest_name(rank), lambda i: rank_shard_name(rank, i),
                                      {"rank": rank, "world_size": comm.world_size})
                _write(model, sites, batches, out_dir, mine, dtype, drop_padding, progress, row_mask, writer)
            comm.barrier()  # every slice is written
            merged = merge_ranks(out_dir, fresh, comm.world_size)  # on every rank: an error is raised by all
            if rank == 0:
                save_json_atomic(out_dir / MANIFEST, merged)
                for r in range(comm.world_size):
                    (out_dir / rank_manifest_name(r)).unlink(missing_ok=True)
            comm.barrier()  # no rank opens the store before rank 0 has written it
    return Store(out_dir)


def _rank_start(out_dir: Path, fresh: dict[str, Any], rank: int) -> dict[str, Any]:
    """This rank's progress manifest to continue from (checked), with its leftovers removed."""
    path = out_dir / rank_manifest_name(rank)
    mine = json.loads(json.dumps(fresh))
    if path.exists():
        mine = read_rank_manifest(out_dir, rank)
        conflicts = _resume_conflicts(mine, fresh)
        if conflicts:  # manifest.json agreed, so this file is not the one its run wrote
            raise ValueError(f"{path}: rank {rank}'s progress does not match the store ({'; '.join(conflicts)}); "
                             f"delete {out_dir} to start over")
        mine["shard_rows"] = fresh["shard_rows"]
    listed = {s["file"] for s in mine["shards"]}
    for p in out_dir.glob(rank_shard_glob(rank)):  # shards a hard-killed rank wrote but never recorded
        if p.name not in listed:
            p.unlink()
    temps = [f".{rank_shard_glob(rank)}.*.tmp", f".{path.name}.*.tmp"] + ([f".{MANIFEST}.*.tmp"] if rank == 0 else [])
    for pattern in temps:  # of a hard-killed write; every rank removes only its own
        for p in out_dir.glob(pattern):
            p.unlink(missing_ok=True)
    return mine


def read_rank_manifest(out_dir: Path, rank: int) -> dict[str, Any]:
    """Rank ``rank``'s progress manifest, checked like a store's (its own shards only)."""
    path = out_dir / rank_manifest_name(rank)
    return check_manifest(path, load_json(path, f"rank {rank}'s store manifest", RECREATE), rank_shard_glob(rank))


def merge_ranks(out_dir: Path, fresh: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The merged manifest of every rank's slice (see the module docstring for the order)."""
    merged = json.loads(json.dumps(fresh))
    parts = []
    for rank in range(world_size):
        if not (out_dir / rank_manifest_name(rank)).exists():
            raise ValueError(f"{out_dir}: rank {rank} of {world_size} wrote no progress manifest, so the store "
                             "cannot be merged; run the same torchrun command again to resume it")
        part = read_rank_manifest(out_dir, rank)
        if not part["complete"]:
            raise ValueError(f"{out_dir}: rank {rank} of {world_size} did not finish its slice; run the same "
                             "torchrun command again to resume it")
        parts.append(part)
    for i, entry in enumerate(merged["sites"]):  # a rank with an empty slice never saw a row
        shapes = {json.dumps(p["sites"][i]["row_shape"]): p["sites"][i] for p in parts if p["sites"][i]["d"] is not None}
        if len(shapes) > 1:
            raise ValueError(f"{out_dir}: the ranks wrote rows of different shapes {sorted(shapes)} for site "
                             f"{entry['key']}; did the model differ between ranks? Delete the directory and write it again")
        for seen in shapes.values():
            entry["d"], entry["row_shape"] = seen["d"], seen["row_shape"]
    offset = 0
    for rank, part in enumerate(parts):
        for shard in part["shards"]:
            first, stop = shard["batches"]
            merged["shards"].append({**shard, "batches": [first + offset, stop + offset], "rank": rank,
                                     "rank_batches": [first, stop]})
        offset += part["n_batches"]
        merged["n_rows"] += part["n_rows"]
    if offset == 0:
        raise ValueError(f"the dataset produced no batches on any of the {world_size} ranks, so there is nothing to "
                         f"write to {out_dir}; check that the batch iterable is not empty")
    merged["n_batches"], merged["complete"] = offset, True
    return merged


__all__ = ["merge_ranks", "read_rank_manifest", "write_store_ranks"]
