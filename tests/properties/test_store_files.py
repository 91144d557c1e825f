"""An activation store's manifest and shards, damaged: every read is a typed error or the
store's own rows, never another exception and never a silently shorter store."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from damage import (
    Written,
    byte_damage,
    examples,
    json_damage,
    load_or_typed_error,
    safetensors_header_end,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from mechscope.core.site import Site
from mechscope.core.store import MANIFEST, open_store, write_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three shards of two sites over 6 batches [2, 3] of ids: small, but every field set."""
    model = nn.Sequential(nn.Linear(1, 4), nn.ReLU())
    batches = list(torch.arange(36, dtype=torch.float32).view(6, 2, 3, 1))
    out = tmp_path_factory.mktemp("store")
    s = write_store(model, [Site("0"), Site("1")], batches, out, shard_rows=12, meta={"corpus": "ids"})
    assert len(s.shards) == 3
    return Written("store", dir=out, rows={k: s.to_tensor(k) for k in (0, 1)})


def read_all(directory: Path) -> dict[int, torch.Tensor]:
    s = open_store(directory)
    s.verify()
    rows = {k: s.to_tensor(k) for k in (0, 1)}
    batches = list(s.batches(0, batch_size=5, seed=1))  # the shuffled reader, on every row
    assert sum(b.shape[0] for b in batches) == s.n_rows
    return rows


def check(directory: Path, original: dict[int, torch.Tensor], what: str) -> None:
    ok, rows = load_or_typed_error(lambda: read_all(directory), what)
    if ok:  # accepted: then it is the store as written, not a shorter or different one
        for k, t in original.items():
            assert torch.equal(rows[k], t), f"{what}: the store reads back different rows for site {k}"


def damaged_copy(source: Path, name: str, data: bytes) -> tuple[tempfile.TemporaryDirectory, Path]:
    holder = tempfile.TemporaryDirectory()
    directory = Path(holder.name) / "store"
    shutil.copytree(source, directory)
    (directory / name).write_bytes(data)
    return holder, directory


@examples(150)
@given(data=st.data())
def test_a_damaged_manifest_is_an_error_or_the_same_store(store, data):
    source, original = store.dir, store.rows
    doc = json.loads((source / MANIFEST).read_text())
    what, damaged = data.draw(json_damage(doc))
    holder, directory = damaged_copy(source, MANIFEST, json.dumps(damaged).encode())
    with holder:
        check(directory, original, what)


@examples(100)
@given(data=st.data())
def test_manifest_bytes_damaged_are_an_error_or_the_same_store(store, data):
    source, original = store.dir, store.rows
    what, raw = data.draw(byte_damage((source / MANIFEST).read_bytes()))
    holder, directory = damaged_copy(source, MANIFEST, raw)
    with holder:
        check(directory, original, what)


@examples(100)
@given(data=st.data(), shard=st.sampled_from(["shard-00000.safetensors", "shard-00002.safetensors"]))
def test_a_damaged_shard_is_an_error_or_the_same_rows(store, data, shard):
    # the manifest's checksums are what a read trusts: damage to a shard's own record (its
    # metadata) leaves the rows as written, any other damage must be an error
    raw = (store.dir / shard).read_bytes()
    what, damaged = data.draw(byte_damage(raw, header=safetensors_header_end(raw)))
    holder, directory = damaged_copy(store.dir, shard, damaged)
    with holder:
        check(directory, store.rows, f"{what} in {shard}")


def test_a_missing_shard_is_an_error(store):
    source = store.dir
    holder, directory = damaged_copy(source, MANIFEST, (source / MANIFEST).read_bytes())
    with holder:
        (directory / "shard-00001.safetensors").unlink()
        ok, _ = load_or_typed_error(lambda: read_all(directory), "shard 1 deleted")
        assert not ok
