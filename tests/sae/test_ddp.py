"""Data-parallel training on CPU with the gloo backend and two processes: the copies stay
identical, the result matches one process on the same data up to the per-process loss
normalisation, and the checkpoint is written once."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mechscope.sae.arch import SAEConfig
from mechscope.core.distributed import Comm, DistComm, init_distributed, shard, split_rows
from mechscope.sae.evals import mmcs
from mechscope.sae.train import TrainConfig, train
from mechscope.tasks.synthetic_features import SyntheticConfig, SyntheticFeatures

SAE_CFG = SAEConfig(d_in=32, d_sae=128, arch="topk", k=3)
WORLD_CFG = SyntheticConfig(d=32, n_features=64, expected_l0=3)
STEPS, GLOBAL_BATCH = 100, 1024


def _cfg(out_dir=None, **kw):
    return TrainConfig(steps=STEPS, batch_size=GLOBAL_BATCH, lr=3e-3, dead_tokens=20_000, progress=False,
                       checkpoint_dir=out_dir, checkpoint_every=50 if out_dir else 0, **kw)


def _worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    comm = init_distributed()  # as under torchrun: gloo on CPU
    import mechscope.sae.resume as resume

    writes = []
    original = resume.save_checkpoint
    resume.save_checkpoint = lambda *a, **k: (writes.append(1), original(*a, **k))
    world = SyntheticFeatures(WORLD_CFG)
    data = (split_rows(x, comm) for x in world.batches(GLOBAL_BATCH, seed=1))  # each process: half of each batch
    res = train(SAE_CFG, _cfg(out_dir / "ckpt").replace(batch_size=GLOBAL_BATCH // world_size), data, comm=comm)
    state = {k: v.tolist() for k, v in res.trainer.sae.state_dict().items()}
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"state": state, "writes": len(writes),
                                                           "tokens": res.trainer.tokens}))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_processes_match_one(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["state"] == ranks[1]["state"]  # the copies never drift
    assert [r["writes"] for r in ranks] == [STEPS // 50, 0]  # only process 0 writes checkpoints
    assert ranks[0]["tokens"] == STEPS * GLOBAL_BATCH  # tokens are counted over both processes
    assert list((tmp_path / "ckpt").iterdir()) == [tmp_path / "ckpt" / "trainer.safetensors"]

    world = SyntheticFeatures(WORLD_CFG)
    single = train(SAE_CFG, _cfg(), world.batches(GLOBAL_BATCH, seed=1))
    two = {k: torch.tensor(v) for k, v in ranks[0]["state"].items()}
    # same data, same init; only the FVU denominators differ (each process normalises by its half's variance)
    assert mmcs(world.features, two["W_dec"]) == pytest.approx(mmcs(world.features, single.trainer.sae.W_dec), abs=0.01)
    rel = (two["W_dec"] - single.trainer.sae.W_dec).norm() / single.trainer.sae.W_dec.norm()
    assert rel < 0.05  # measured 0.008 after 100 steps: the decoders differ by the normalisation only


def test_helpers_without_a_process_group():
    comm = init_distributed() if "RANK" not in os.environ else Comm()
    assert isinstance(comm, Comm) and comm.is_main and comm.world_size == 1
    assert list(shard(range(5), comm)) == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="init_distributed"):
        DistComm()

    class Two(Comm):
        rank, world_size = 1, 2

    assert list(shard(range(5), Two())) == [1, 3]
    assert split_rows(torch.arange(6), Two()).tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="does not split evenly"):
        split_rows(torch.arange(5), Two())
