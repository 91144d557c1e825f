"""``mechscope sae train|eval|pages`` end to end on tiny settings, and its usage errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mechscope.cli import main
from mechscope.core.site import Site
from mechscope.core.store import write_store
from mechscope.sae.io import load_sae, read_sae_metadata
from mechscope.sae.saelens import load_saelens
from mechscope.zoo import build


def test_train_and_eval_on_synthetic_data(tmp_path, capsys):
    out = tmp_path / "sae.safetensors"
    code = main(["sae", "train", "--synthetic", "--d-sae", "512", "--k", "5", "--steps", "20", "--batch-size", "512",
                 "--lr", "1e-3", "--no-progress", "--out", str(out), "--saelens", str(tmp_path / "lens")])
    assert code == 0 and "final: FVU" in capsys.readouterr().out
    sae = load_sae(out)
    assert sae.cfg.d_in == 256 and read_sae_metadata(out)["data"]["synthetic"] is True
    assert load_saelens(tmp_path / "lens")[0].cfg.k == 5
    assert main(["sae", "eval", "--synthetic", "--sae", str(out), "--batches", "2", "--batch-size", "512", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"fvu", "l0", "mmcs", "mcc", "dead_fraction"} <= set(result) and result["l0"] <= 5


def test_transcoder_from_a_store(tmp_path, capsys):
    model = build("transformer", seed=0)
    mlp_in, mlp_out = Site("blocks.1.mlp", io="input"), Site("blocks.1.mlp")
    gen = torch.Generator().manual_seed(0)
    write_store(model, [mlp_in, mlp_out], [torch.randint(0, 64, (16, 16), generator=gen) for _ in range(4)],
                tmp_path / "store", shard_rows=512)
    out = tmp_path / "tc.safetensors"
    args = ["sae", "train", "--store", str(tmp_path / "store"), "--target-site", str(mlp_out), "--kind", "transcoder",
            "--d-sae", "128", "--k", "8", "--steps", "10", "--batch-size", "256", "--no-progress", "--out", str(out)]
    assert main(args + ["--site", "blocks.1.mlp.in"]) == 2
    err = capsys.readouterr().err
    assert "is not in the store" in err and "blocks.1.mlp:input" in err  # the valid keys are listed
    assert main(args + ["--site", str(mlp_in)]) == 0
    assert load_sae(out).cfg.kind == "transcoder"


def test_pages_on_the_induction_world(tmp_path, capsys):
    sae_path = tmp_path / "ind.safetensors"
    assert main(["sae", "train", "--world", "induction", "--d-sae", "128", "--k", "8", "--steps", "5",
                 "--batch-size", "512", "--no-progress", "--out", str(sae_path)]) == 0
    assert main(["sae", "pages", "--sae", str(sae_path), "--world", "induction", "--out", str(tmp_path / "pages"),
                 "--n-features", "3", "--n-examples", "2"]) == 0
    assert (tmp_path / "pages" / "index.html").exists() and len(list((tmp_path / "pages").glob("feature_*.html"))) == 3


def test_usage_errors(tmp_path, capsys):
    assert main(["sae", "train", "--d-sae", "64", "--out", str(tmp_path / "x")]) == 2
    assert "exactly one data source" in capsys.readouterr().err
    assert main(["sae", "train", "--synthetic", "--world", "induction", "--d-sae", "64", "--out", "x"]) == 2
    assert main(["sae", "eval", "--synthetic", "--sae", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["sae", "train", "--synthetic", "--d-sae", "4", "--k", "8", "--out", "x"]) == 2
    assert "k=8 exceeds d_sae=4" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo, tested on Linux")
def test_torchrun_two_processes(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "ddp.safetensors"
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "mechscope", "sae", "train", "--synthetic",
           "--d-sae", "256", "--k", "5", "--steps", "6", "--batch-size", "256", "--no-progress",
           "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "3", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("final: FVU") == 1  # only process 0 reports and writes
    assert load_sae(out).cfg.d_sae == 256 and read_sae_metadata(out)["history"][-1]["tokens"] == 6 * 256 * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_train_refuses_a_device_it_cannot_use(tmp_path, capsys):
    """--device is where the dictionary trains: a CUDA device torch cannot see is refused, not
    silently replaced by the CPU."""
    code = main(["sae", "train", "--synthetic", "--d-sae", "64", "--k", "4", "--steps", "2", "--batch-size", "64",
                 "--out", str(tmp_path / "sae.safetensors"), "--device", "cuda"])
    assert code == 2
    assert "--device cuda: device='cuda', but torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "sae.safetensors").exists()


def test_train_trains_on_the_device_asked_for(tmp_path, monkeypatch):
    import importlib

    sae_train = importlib.import_module("mechscope.sae.train")  # the module: the package exports a function `train`
    seen = []
    real = sae_train.train

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sae_train, "train", spy)
    assert main(["sae", "train", "--synthetic", "--d-sae", "64", "--k", "4", "--steps", "2", "--batch-size", "64",
                 "--out", str(tmp_path / "sae.safetensors"), "--device", "auto"]) == 0
    assert seen == ["cuda" if torch.cuda.is_available() else "cpu"]
