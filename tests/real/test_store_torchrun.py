"""``mechscope store`` under torchrun: the ranks write one store whose rows are the single-process
store's rows, rank by rank (rank r runs input batches r, r+N, ...); an interrupted store resumes
with the same world size only; a complete one is reused by any; readers see an ordinary store."""

import os
import subprocess
import sys

import pytest
import torch

from mechscope.cli import main
from mechscope.core import store as store_module
from mechscope.core.checkpoint import CheckpointError
from mechscope.core.distributed import Comm
from mechscope.core.load import load_model
from mechscope.core.models import resolve
from mechscope.core.store import open_store
from mechscope.core.text_store import write_text_store

pytestmark = pytest.mark.usefixtures("one_thread")

SITES = ["resid_post.0", "mlp_out.1"]
WINDOWS, BATCH, ROWS = 10, 3, 15  # ceil(160 / 16) windows of 16 tokens, BOS rows left out


def store_args(model_dir, corpus, out, *extra):
    return ["store", "--model", str(model_dir), "--corpus", str(corpus), "--field", "body", "--sites", ",".join(SITES),
            "--tokens", "160", "--seq-len", "16", "--batch-size", str(BATCH), "--out", str(out), "--shuffle-buffer",
            "4", "--seed", "1", "--shard-rows", "40", "--threads", "1", *extra]


def rank_major(single, world_size):
    """The single-process store's rows of every site, in the order a store of ``world_size``
    ranks lists them: rank 0's input batches (0, N, 2N, ...), then rank 1's, ..."""
    sizes = [min(BATCH, WINDOWS - b) * ROWS for b in range(0, WINDOWS, BATCH)]  # rows per input batch
    out = {}
    for s in single.sites:
        parts = torch.split(single.to_tensor(s), sizes)
        out[s] = torch.cat([parts[b] for r in range(world_size) for b in range(r, len(parts), world_size)])
    return out


def assert_same_store(merged, single, world_size):
    assert merged.complete and merged.n_rows == single.n_rows == WINDOWS * ROWS
    assert merged.manifest["n_batches"] == single.manifest["n_batches"]
    assert merged.meta == {**single.meta, "world_size": world_size}
    want = rank_major(single, world_size)
    for s in single.sites:
        got = merged.to_tensor(s)
        assert torch.equal(got, want[s])  # the documented order, bit for bit
        assert torch.equal(got.sort(dim=0).values, single.to_tensor(s).sort(dim=0).values)  # the same rows
    ranks = [sh["rank"] for sh in merged.shards]
    assert ranks == sorted(ranks) and set(ranks) == set(range(world_size))
    assert all(sh["file"].startswith(f"shard-r{sh['rank']:05d}-") for sh in merged.shards)
    assert not list(merged.out_dir.glob("manifest-r*.json"))  # the rank manifests are merged and gone


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo, tested on Linux")
def test_torchrun_writes_the_single_process_rows(tmp_path, model_dir, body_corpus, capsys):
    single, merged = tmp_path / "single", tmp_path / "merged"
    assert main(store_args(model_dir, body_corpus, single)) == 0
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "mechscope",
           *store_args(model_dir, body_corpus, merged)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[:3000]  # the ranks' own messages come before torchrun's traceback
    assert done.stdout.count("wrote") == 1  # rank 0 reports
    store = open_store(merged)
    assert_same_store(store, open_store(single), 2)
    assert sum(1 for _ in store.batches(SITES[0], batch_size=32)) == -(-store.n_rows // 32)
    capsys.readouterr()
    assert main(store_args(model_dir, body_corpus, merged)) == 0  # complete: one process reuses it as is
    assert "nothing to do" in capsys.readouterr().err
    sae = tmp_path / "sae.safetensors"
    assert main(["sae", "train", "--store", str(merged), "--site", "resid_post.0", "--out", str(sae), "--d-sae", "16",
                 "--k", "2", "--steps", "3", "--batch-size", "32"]) == 0 and sae.is_file()


class OneRank(Comm):
    """Rank ``rank`` of ``world_size`` run alone in this process: the ranks run one after the
    other, so a barrier has nothing to wait for."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size


def test_interrupted_ranks_resume_with_the_same_world_size(tmp_path, model_dir, body_corpus, monkeypatch, capsys):
    single, out = tmp_path / "single", tmp_path / "ranks"
    assert main(store_args(model_dir, body_corpus, single)) == 0
    model, tok = load_model(str(model_dir))
    sites = [resolve(model, s) for s in SITES]
    record = open_store(single).meta["model"]

    def rank(r, world_size=2):
        return write_text_store(model, tok, sites, body_corpus, out, tokens=160, seq_len=16, batch_size=BATCH,
                                field="body", seed=1, shuffle_buffer=4, shard_rows=40, record=record,
                                comm=OneRank(r, world_size))

    with pytest.raises(ValueError, match="rank 1 of 2 wrote no progress manifest"):
        rank(0)  # rank 0's slice is written; rank 1 never ran: an interrupted store
    assert not open_store(out, allow_incomplete=True).complete
    capsys.readouterr()
    assert main(store_args(model_dir, body_corpus, out)) == 2  # one process may not resume it
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mechscope store: error: cannot resume") and "world size: store has 2" in err
    with pytest.raises(ValueError, match="world size: store has 2 process.*asked for 3"):
        rank(0, world_size=3)
    real_cache, calls = store_module.cache, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_cache(*args, **kwargs)

    monkeypatch.setattr(store_module, "cache", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rank(1)  # stopped after its first shard
    monkeypatch.setattr(store_module, "cache", real_cache)
    assert '"complete": false' in (out / "manifest-r00001.json").read_text()  # rank 1's progress, kept
    with pytest.raises(ValueError, match="rank 1 of 2 did not finish"):
        rank(0)  # rank 0 has nothing left to run, rank 1 is not done
    with pytest.raises(CheckpointError, match="incomplete"):
        rank(1)  # resumes its slice, then opens the store, which only rank 0 writes (alone here: not yet)
    assert '"complete": true' in (out / "manifest-r00001.json").read_text()
    store, _ = rank(0)
    assert_same_store(store, open_store(single), 2)
    again, windows = rank(0, world_size=3)  # complete: reused as is by another world size
    assert windows is None and again.shards == store.shards
