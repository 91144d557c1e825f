"""Activation store: sharded writing, interruption and resume, shuffled bounded reading."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mechscope.core.batch import collate
from mechscope.core.checkpoint import CheckpointError
from mechscope.core.run import NonFiniteActivationError, cache
from mechscope.core.site import Site, SiteError
from mechscope.core.collect import flatten_rows
from mechscope.core.store import MANIFEST, Store, open_store, site_key, write_store


class Tagger(nn.Module):
    """Float ids [batch, pos] -> rows [batch, pos, 3] whose first column is the id, so rows are traceable."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Identity()
        self.mix = nn.Linear(3, 3)

    def forward(self, x):  # x: [batch, pos]
        h = self.embed(torch.stack([x, 2 * x, -x], dim=-1))  # [batch, pos, 3]
        return self.mix(h)


class MaskedLM(nn.Module):
    """Token-wise toy LM called like an HF model (input_ids, attention_mask, position_ids)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.up = nn.Linear(16, 16)
        self.act = nn.ReLU()
        self.out = nn.Linear(16, 50)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.out(self.act(self.up(self.embed(input_ids))))


def id_batches(n_batches=7, batch=3, pos=5):
    """Deterministic float batches [batch, pos] holding ids 0..N-1 (each id once)."""
    ids = torch.arange(n_batches * batch * pos, dtype=torch.float32)
    return list(ids.view(n_batches, batch, pos))


def token_batches(n_batches=6, seed=0):
    """Deterministic collated batches of varying lengths, right-padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        lens = torch.randint(1, 7, (4,), generator=g).tolist()
        out.append(collate([torch.randint(1, 50, (n,), generator=g) for n in lens]))
    return out


def interrupted(batches, at, exc):
    for i, b in enumerate(batches):
        if i == at:
            raise exc
        yield b


def counting(model):
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


EMBED = Site("embed")


# -- writing -----------------------------------------------------------------------------
def test_write_and_read_back(tmp_path):
    model, data = Tagger(), id_batches()
    store = write_store(model, EMBED, data, tmp_path / "s", shard_rows=20)
    assert len(store) == store.n_rows == 7 * 15 and store.d(EMBED) == 3 and store.complete
    rows = store.to_tensor(EMBED)  # [105, 3]
    assert torch.equal(rows[:, 0], torch.arange(105.0))
    m = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert m["schema_version"] == 1 and m["dtype"] == "float32" and m["complete"] is True
    assert [s["batches"] for s in m["shards"]] == [[0, 2], [2, 4], [4, 6], [6, 7]]  # whole batches, >= 20 rows
    assert sum(s["rows"] for s in m["shards"]) == m["n_rows"] == 105
    assert Site.from_dict(m["sites"][0]["site"]) == EMBED and m["sites"][0]["key"] == site_key(EMBED)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [MANIFEST] + [f"shard-0000{i}.safetensors" for i in range(4)]
    assert open_store(tmp_path / "s").sites == [EMBED]


def test_padding_is_dropped_and_rows_match_unpadded_examples(tmp_path):
    model, data = MaskedLM(), token_batches()
    site = Site("up")
    store = write_store(model, site, data, tmp_path, shard_rows=8, dtype=torch.float16)
    n_real = sum(int(b["attention_mask"].sum()) for b in data)
    rows = store.to_tensor()
    assert rows.shape == (n_real, 16) and rows.dtype == torch.float16
    ids = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in data])  # [n_real]
    expect = model.up(model.embed(ids)).detach().half()
    assert torch.equal(rows, expect)


def test_gpt2_padding_rows_equal_single_example_rows(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50)).eval()
    seqs = [[5, 6, 7], [8, 9], [1, 2, 3, 4]]
    site = Site("transformer.h.0")
    store = write_store(model, site, [collate(seqs, side="left")], tmp_path)
    alone = torch.cat([cache(model, collate([s]), [site])[site][0] for s in seqs])  # [9, 32]
    torch.testing.assert_close(store.to_tensor(), alone, atol=1e-5, rtol=1e-5)


def test_several_sites_write_aligned_rows(tmp_path):
    model = MaskedLM()
    up, act = Site("up"), Site("act")
    store = write_store(model, [up, act], token_batches(), tmp_path, shard_rows=10)
    for b in store.batches([up, act], batch_size=7, seed=3):
        assert set(b) == {up, act}
        assert torch.equal(b[act], b[up].clamp(min=0))  # same token in every row
    assert store.d("up") == 16 and store.row_shape(1) == [16]


def test_heads_site_keeps_row_shape(tmp_path):
    site = Site("up", heads=(0, 2), head_dim=4)
    store = write_store(MaskedLM(), site, token_batches(2), tmp_path)
    assert store.d(site) == 8 and store.row_shape(site) == [2, 4]


def test_sites_with_different_row_counts_are_refused(tmp_path):
    with pytest.raises(SiteError, match="different numbers of rows"):
        write_store(MaskedLM(), [Site("up"), Site("up", positions="last")], token_batches(2), tmp_path)


def test_flatten_rows_rejects_mismatched_mask():
    with pytest.raises(SiteError, match="cannot drop padding"):
        flatten_rows(torch.zeros(2, 5, 3), Site("x"), torch.ones(2, 4))
    assert flatten_rows(torch.zeros(2, 3), Site("x"), torch.ones(2, 4)).shape == (2, 3)


def test_empty_dataset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="the dataset produced no batches"):
        write_store(Tagger(), EMBED, [], tmp_path)


def test_nan_activation_propagates_naming_the_site(tmp_path):
    bad = [torch.full((2, 3), float("nan"))]
    with pytest.raises(NonFiniteActivationError, match="embed"):
        write_store(Tagger(), EMBED, bad, tmp_path)


# -- interruption and resume ---------------------------------------------------------------
@pytest.mark.parametrize("exc", [RuntimeError("dataset broke"), KeyboardInterrupt()])
def test_interrupted_store_resumes_to_identical_rows(tmp_path, exc):
    model, data = Tagger(), id_batches()
    full = write_store(model, EMBED, data, tmp_path / "full", shard_rows=20).to_tensor()
    out = tmp_path / "cut"
    with pytest.raises(type(exc)):
        write_store(model, EMBED, interrupted(data, 5, exc), out, shard_rows=20)
    with pytest.raises(CheckpointError, match="incomplete.*resume=True"):
        open_store(out)
    partial = open_store(out, allow_incomplete=True)
    assert partial.manifest["n_batches"] == 4 and len(partial) == 60  # two finished shards
    calls = counting(model)
    done = write_store(model, EMBED, data, out, shard_rows=20)
    assert len(calls) == 3  # batches 0..3 were skipped, not run
    assert done.complete and torch.equal(done.to_tensor(), full)
    assert not list(out.glob(".*.tmp"))


def test_resume_with_different_settings_is_refused(tmp_path):
    data = id_batches()
    with pytest.raises(RuntimeError):
        write_store(Tagger(), EMBED, interrupted(data, 3, RuntimeError()), tmp_path, shard_rows=10)
    with pytest.raises(ValueError, match=r"cannot resume.*sites: store has \['embed:output'\], asked for \['mix:output'\]"):
        write_store(Tagger(), Site("mix"), data, tmp_path)
    with pytest.raises(ValueError, match="cannot resume.*dtype: store has 'float32', asked for 'float16'"):
        write_store(Tagger(), EMBED, data, tmp_path, dtype=torch.float16)
    with pytest.raises(ValueError, match="already holds an activation store"):
        write_store(Tagger(), EMBED, data, tmp_path, resume=False)


def test_meta_is_recorded_and_must_match_to_resume(tmp_path):
    data, meta = id_batches(), {"corpus": "a.txt", "model": {"sha": "1", "torch": "2.13"}}
    with pytest.raises(RuntimeError):
        write_store(Tagger(), EMBED, interrupted(data, 3, RuntimeError()), tmp_path, shard_rows=10, meta=meta)
    assert open_store(tmp_path, allow_incomplete=True).meta == meta
    with pytest.raises(ValueError, match='cannot resume.*corpus: store has "a.txt", asked for "b.txt"'):
        write_store(Tagger(), EMBED, data, tmp_path, meta={**meta, "corpus": "b.txt"})
    with pytest.raises(ValueError, match='model.torch: store has "2.13", asked for "2.14"'):
        write_store(Tagger(), EMBED, data, tmp_path, meta={**meta, "model": {"sha": "1", "torch": "2.14"}})
    assert write_store(Tagger(), EMBED, data, tmp_path, meta=meta).meta == meta


def test_row_mask_chooses_the_stored_positions(tmp_path):
    data = token_batches()
    first_out = lambda batch: batch["attention_mask"].bool() & (torch.arange(batch["input_ids"].shape[1]) > 0)  # noqa: E731
    store = write_store(MaskedLM(), Site("up"), data, tmp_path, row_mask=first_out)
    model = MaskedLM()
    want = torch.cat([cache(model, b, [Site("up")])[Site("up")][first_out(b)] for b in data])
    assert store.n_rows == sum(int(first_out(b).sum()) for b in data) and torch.equal(store.to_tensor(), want)


def test_complete_store_is_reused_without_running(tmp_path):
    model, data = Tagger(), id_batches()
    write_store(model, EMBED, data, tmp_path)
    calls = counting(model)
    assert len(write_store(model, EMBED, data, tmp_path)) == 105 and not calls


def test_resume_with_a_shorter_dataset_is_refused(tmp_path):
    data = id_batches()
    with pytest.raises(RuntimeError):
        write_store(Tagger(), EMBED, interrupted(data, 6, RuntimeError()), tmp_path, shard_rows=10)
    with pytest.raises(ValueError, match="produced 2 batches.*already covers"):
        write_store(Tagger(), EMBED, data[:2], tmp_path)


# -- reading -------------------------------------------------------------------------------
def test_every_row_once_per_epoch_in_bounded_shuffled_batches(tmp_path):
    store = write_store(Tagger(), EMBED, id_batches(), tmp_path, shard_rows=10)  # 7 shards of 15 rows
    epoch = list(store.batches(EMBED, batch_size=16, seed=1, buffer_shards=2))
    assert [len(b) for b in epoch] == [16] * 6 + [9]
    ids = torch.cat(epoch)[:, 0]
    assert torch.equal(ids.sort().values, torch.arange(105.0))
    assert not torch.equal(ids, torch.arange(105.0))  # shuffled
    again = torch.cat(list(store.batches(EMBED, batch_size=16, seed=1, buffer_shards=2)))[:, 0]
    other = torch.cat(list(store.batches(EMBED, batch_size=16, seed=2, buffer_shards=2)))[:, 0]
    assert torch.equal(ids, again) and not torch.equal(ids, other)
    dropped = list(store.batches(batch_size=16, drop_last=True))
    assert len(dropped) == 6
    ordered = torch.cat(list(store.batches(batch_size=10, shuffle=False)))
    assert torch.equal(ordered, store.to_tensor())


def test_truncated_shard_is_an_error_naming_the_file(tmp_path):
    store = write_store(Tagger(), EMBED, id_batches(), tmp_path, shard_rows=20)
    shard = tmp_path / "shard-00002.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 12)
    with pytest.raises(CheckpointError, match=r"shard-00002\.safetensors: truncated: header says \d+ bytes of data"):
        list(store.batches(batch_size=8))
    with pytest.raises(CheckpointError, match="shard-00002"):
        store.to_tensor()


def test_flipped_byte_in_shard_is_caught(tmp_path):
    store = write_store(Tagger(), EMBED, id_batches(), tmp_path, shard_rows=20)
    shard = tmp_path / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x40
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"shard-00001\.safetensors: corrupted data"):
        store.verify()
    with pytest.raises(CheckpointError, match="shard-00001"):
        list(store.batches(batch_size=8, shuffle=False))


def test_row_count_is_checked_against_the_manifest(tmp_path):
    write_store(Tagger(), EMBED, id_batches(), tmp_path, shard_rows=20)
    m = json.loads((tmp_path / MANIFEST).read_text())
    m["shards"][0]["rows"] -= 1
    m["n_rows"] -= 1
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"shard-00000\.safetensors: holds \[30\] rows.*manifest says 29 rows"):
        open_store(tmp_path).to_tensor()


def test_missing_or_corrupt_manifest(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        Store(tmp_path)
    (tmp_path / MANIFEST).write_text('{"format": "mechscope.st')
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        Store(tmp_path)


def test_unknown_site_lists_the_stored_ones(tmp_path):
    store = write_store(Tagger(), EMBED, id_batches(2), tmp_path)
    with pytest.raises(KeyError, match="embed:output"):
        store.d(Site("mix"))
    assert "105" not in repr(store) and "30 rows" in repr(store)


def test_resume_removes_leftovers_of_a_hard_kill(tmp_path):
    data = id_batches()
    with pytest.raises(RuntimeError):
        write_store(Tagger(), EMBED, interrupted(data, 5, RuntimeError()), tmp_path, shard_rows=20)
    (tmp_path / ".shard-00002.safetensors.abc123.tmp").write_bytes(b"half")
    (tmp_path / "shard-00002.safetensors").write_bytes(b"renamed, but not in the manifest")
    seen = []
    store = write_store(Tagger(), EMBED, data, tmp_path, shard_rows=20, progress=lambda b, r: seen.append((b, r)))
    assert seen == [(5, 75), (6, 90), (7, 105)]
    assert not list(tmp_path.glob(".*.tmp")) and len(store.shards) == 4
    store.verify()


def test_missing_shard_is_named(tmp_path):
    store = write_store(Tagger(), EMBED, id_batches(), tmp_path, shard_rows=20)
    (tmp_path / "shard-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard-00003\.safetensors: missing"):
        store.to_tensor()


# -- locks and a manifest that is not trusted ------------------------------------------------
def test_a_second_writer_of_the_directory_fails_at_once(tmp_path):
    import os
    import socket

    from mechscope.core.lock import LOCK_NAME, LockError

    holder = {"pid": os.getppid(), "host": socket.gethostname(), "started": "now", "job": None, "token": "x"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(holder))  # another live process writes this store
    model = Tagger()
    calls = counting(model)
    with pytest.raises(LockError, match=rf"activation store {tmp_path} is in use by another job \(PID {os.getppid()}"):
        write_store(model, EMBED, id_batches(), tmp_path)
    assert not calls and not (tmp_path / MANIFEST).exists()
    (tmp_path / LOCK_NAME).unlink()
    write_store(model, EMBED, id_batches(), tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()  # released when the writer finished


def edit_manifest(path, change):
    m = json.loads((path / MANIFEST).read_text())
    change(m)
    (path / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("ref", ["../outside.safetensors", "/etc/hostname", "link.safetensors"])
def test_shard_files_outside_the_store_are_refused(tmp_path, ref):
    store_dir = tmp_path / "store"
    write_store(Tagger(), EMBED, id_batches(), store_dir, shard_rows=20)
    (tmp_path / "outside.safetensors").write_bytes((store_dir / "shard-00000.safetensors").read_bytes())
    (store_dir / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    edit_manifest(store_dir, lambda m: m["shards"][1].update(file=ref))
    with pytest.raises(CheckpointError, match=f"shard 1: the path '{ref}' (is absolute|leads outside)"):
        open_store(store_dir)


def test_dropped_shards_and_broken_fields_are_caught(tmp_path):
    write_store(Tagger(), EMBED, id_batches(), tmp_path, shard_rows=20)  # 4 shards: batches [0,2) [2,4) [4,6) [6,7)

    def drop(i):
        def change(m):
            gone = m["shards"].pop(i)
            m["n_rows"] -= gone["rows"]
            if i == len(m["shards"]):
                m["n_batches"] = gone["batches"][0]
        return change

    original = (tmp_path / MANIFEST).read_text()
    edit_manifest(tmp_path, drop(1))  # consistently edited: the rows still add up
    with pytest.raises(CheckpointError, match=r"shard 1 \(shard-00002.safetensors\) covers input batches \[4, 6\].*end at "
                                              r"batch 2.*no gap"):
        open_store(tmp_path)
    (tmp_path / MANIFEST).write_text(original)
    edit_manifest(tmp_path, drop(3))
    with pytest.raises(CheckpointError, match=r"shard-00003.safetensors'\] are in the store's directory but not in the "
                                              "manifest"):
        open_store(tmp_path)
    for change, message in [(lambda m: m.update(shards={"a": 1}), "'shards' must be a list, got dict"),
                            (lambda m: m["shards"].__setitem__(0, "shard-00000.safetensors"), "shard 0 must be an object"),
                            (lambda m: m["shards"][0].update(rows="30"), "shard 0 .* has rows='30', not a count"),
                            (lambda m: m.update(sites="embed"), "'sites' must be a non-empty list")]:
        (tmp_path / MANIFEST).write_text(original)
        edit_manifest(tmp_path, change)
        with pytest.raises(CheckpointError, match=message):
            open_store(tmp_path)
