"""An activation store written by several ranks (core.store_ranks), with the ranks run one after
the other in this process: the merged store holds the single-process rows rank by rank, each rank
resumes its own slice, a rank with no batch is fine, leftovers of a hard-killed rank go, a
different world size is refused while the store is incomplete, and a complete one is reused."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn

from mechscope.core.checkpoint import CheckpointError
from mechscope.core.distributed import Comm
from mechscope.core.site import Site
from mechscope.core.store import write_store
from mechscope.core.store_ranks import write_store_ranks


class Tagger(nn.Module):
    """Float ids [batch, pos] -> rows [batch, pos, 3] whose first column is the id."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Identity()

    def forward(self, x):  # x: [batch, pos]
        return self.embed(torch.stack([x, 2 * x, -x], dim=-1))


EMBED = Site("embed")
N_BATCHES, BATCH, POS = 7, 3, 5


def id_batches():
    """Deterministic batches [batch, pos] holding ids 0..N-1 (each id once)."""
    return list(torch.arange(N_BATCHES * BATCH * POS, dtype=torch.float32).view(N_BATCHES, BATCH, POS))


class OneRank(Comm):
    """Rank ``rank`` of ``world_size``, run alone: the ranks run one after the other, so a barrier waits for nothing."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size


def write_rank(out, rank, world_size, batches=None, **kwargs):
    mine = itertools.islice(batches if batches is not None else id_batches(), rank, None, world_size)
    return write_store_ranks(Tagger(), EMBED, mine, out, OneRank(rank, world_size), shard_rows=20,
                             meta={"data": "ids"}, **kwargs)


def write_all(out, world_size):
    """Every rank's slice, one after the other, then rank 0 again: it merges once they are all done."""
    for rank in range(world_size):  # alone, a rank cannot wait for the others (nor for rank 0's merge)
        with pytest.raises((ValueError, CheckpointError), match="wrote no progress manifest|incomplete"):
            write_rank(out, rank, world_size)
    return write_rank(out, 0, world_size)


def rank_major_ids(world_size):
    return [float(i) for r in range(world_size) for b in range(r, N_BATCHES, world_size)
            for i in range(b * BATCH * POS, (b + 1) * BATCH * POS)]


@pytest.mark.parametrize("world_size", [2, 3, 8])  # 8 > 7 batches: rank 7 has none
def test_merged_store_holds_the_single_process_rows_rank_by_rank(tmp_path, world_size):
    single = write_store(Tagger(), EMBED, id_batches(), tmp_path / "single", shard_rows=20, meta={"data": "ids"})
    store = write_all(tmp_path / "ranks", world_size)
    assert store.complete and store.n_rows == single.n_rows and store.manifest["n_batches"] == N_BATCHES
    assert store.meta == {**single.meta, "world_size": world_size}
    rows = store.to_tensor()
    assert rows[:, 0].tolist() == rank_major_ids(world_size)  # the documented order
    assert torch.equal(rows.sort(dim=0).values, single.to_tensor().sort(dim=0).values)  # the same rows
    assert [s["rank"] for s in store.shards] == sorted(s["rank"] for s in store.shards)
    assert not list((tmp_path / "ranks").glob("manifest-r*.json"))
    assert sum(b.shape[0] for b in store.batches(batch_size=16)) == store.n_rows
    store.verify()


def test_a_rank_resumes_its_own_slice_and_its_leftovers_go(tmp_path):
    def broken(rank, at):
        for i, b in enumerate(itertools.islice(id_batches(), rank, None, 2)):
            if i == at:
                raise RuntimeError("killed")
            yield b

    with pytest.raises(ValueError, match="rank 1 of 2 wrote no progress manifest"):
        write_rank(tmp_path, 0, 2)  # rank 0 starts the store and writes its slice
    with pytest.raises(RuntimeError, match="killed"):  # rank 1 is stopped at its third batch
        write_store_ranks(Tagger(), EMBED, broken(1, 2), tmp_path, OneRank(1, 2), shard_rows=20, meta={"data": "ids"})
    with pytest.raises(ValueError, match="rank 1 of 2 did not finish"):
        write_rank(tmp_path, 0, 2)
    part = json.loads((tmp_path / "manifest-r00001.json").read_text())
    assert not part["complete"] and part["n_batches"] == 2  # one shard of batches 1 and 3
    (tmp_path / ".shard-r00001-00001.safetensors.abc123.tmp").write_bytes(b"half")
    (tmp_path / "shard-r00001-00001.safetensors").write_bytes(b"renamed, but not in the manifest")
    seen = []
    with pytest.raises(CheckpointError, match="incomplete"):
        write_rank(tmp_path, 1, 2, progress=lambda b, r: seen.append(b))
    assert seen == [3]  # its first two batches (global 1 and 3) were skipped, not run
    store = write_rank(tmp_path, 0, 2)
    assert store.to_tensor()[:, 0].tolist() == rank_major_ids(2)
    assert not list(tmp_path.glob(".*.tmp"))


def test_world_size_must_match_while_incomplete(tmp_path):
    with pytest.raises(ValueError, match="rank 1 of 2 wrote no progress manifest"):
        write_rank(tmp_path, 0, 2)
    with pytest.raises(ValueError, match=r"world size: store has 2 process\(es\), asked for 3;.*--nproc-per-node 2"):
        write_rank(tmp_path, 0, 3)
    with pytest.raises(ValueError, match=r"world size: store has 2 process\(es\), asked for 1;.*--nproc-per-node 2"):
        write_store(Tagger(), EMBED, id_batches(), tmp_path, shard_rows=20, meta={"data": "ids"})
    with pytest.raises(ValueError, match="cannot resume.*data: store has"):  # the other settings, as before
        write_store_ranks(Tagger(), EMBED, [], tmp_path, OneRank(1, 2), shard_rows=20, meta={"data": "other"})
    single = tmp_path / "single"
    with pytest.raises(RuntimeError, match="killed"):
        write_store(Tagger(), EMBED, stopped_at(3), single, shard_rows=20, meta={"data": "ids"})
    with pytest.raises(ValueError, match=r"world size: store has 1 process\(es\), asked for 2;.*without torchrun"):
        write_rank(single, 0, 2)  # an interrupted single-process store is not resumed under torchrun


def stopped_at(index):
    for i, b in enumerate(id_batches()):
        if i == index:
            raise RuntimeError("killed")
        yield b


def test_a_complete_store_is_reused_by_any_world_size(tmp_path):
    store = write_all(tmp_path, 2)
    files = sorted(p.name for p in tmp_path.iterdir())
    again = write_rank(tmp_path, 0, 3, batches=[])  # nothing is run: the dataset is never read
    assert again.shards == store.shards and sorted(p.name for p in tmp_path.iterdir()) == files
    single = write_store(Tagger(), EMBED, [], tmp_path, shard_rows=20, meta={"data": "ids"})
    assert single.shards == store.shards and single.meta["world_size"] == 2
