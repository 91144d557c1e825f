"""An SAE run's fingerprint and ``--continue``: a resume on another data source or with other
settings is refused naming the field, a matching resume is bit-identical to an uninterrupted
run, and a finished run is trained on only with ``--continue``, which recomputes the schedules
for the new total and is recorded (issue 19)."""

import itertools

import pytest
import torch

from mechscope.cli import main
from mechscope.core.checkpoint import load_tensors, save_tensors
from mechscope.core.fingerprint import FingerprintError, RunWarning
from mechscope.core.site import Site
from mechscope.core.store import write_store
from mechscope.sae.arch import SAEConfig, SAEError
from mechscope.sae.io import read_sae_metadata
from mechscope.sae.train import TrainConfig, lr_factor, train
from mechscope.tasks.synthetic_features import SyntheticConfig, SyntheticFeatures
from mechscope.zoo import build

WORLD = SyntheticFeatures(SyntheticConfig(d=16, n_features=32, expected_l0=3))
# relu: a learning-rate decay over the last 20 % and an L1 warm-up, so the schedules matter
SAE_CFG = SAEConfig(d_in=16, d_sae=32, arch="relu")
CFG = TrainConfig(steps=20, batch_size=64, lr=1e-3, progress=False, log_every=1)
DATA = {"source": "synthetic", "data_seed": 1}


def _batches(n=None):
    stream = WORLD.batches(64, seed=1)
    return stream if n is None else itertools.islice(stream, n)


def _ckpt(path):
    return load_tensors(path / "trainer.safetensors")[1]


def test_a_matching_resume_is_bit_identical_and_a_different_source_is_refused(tmp_path):
    straight = train(SAE_CFG, CFG, _batches(), fingerprint=DATA)
    with pytest.raises(SAEError, match="ran out after 12 steps"):  # killed at step 12 (its last checkpoint)
        train(SAE_CFG, CFG.replace(checkpoint_dir=tmp_path, checkpoint_every=4), _batches(12), fingerprint=DATA)
    assert _ckpt(tmp_path)["fingerprint"]["data_seed"] == 1
    for changed, field in (({**DATA, "data_seed": 2}, "data_seed 1, not 2"),
                           ({**DATA, "source": "store"}, "source synthetic, not store")):
        with pytest.raises(FingerprintError, match=f"was trained with {field}; use another checkpoint_dir"):
            train(SAE_CFG, CFG.replace(checkpoint_dir=tmp_path), _batches(), fingerprint=changed)
    with pytest.raises(FingerprintError, match="was trained with l1_coefficient 1.0, not 2.0"):
        train(SAE_CFG, CFG.replace(checkpoint_dir=tmp_path, l1_coefficient=2.0), _batches(), fingerprint=DATA)
    # what may change on resume: the checkpoint and logging cadence, the progress bar
    resumed = train(SAE_CFG, CFG.replace(checkpoint_dir=tmp_path, checkpoint_every=7, log_every=5), _batches(),
                    fingerprint=DATA)
    assert resumed.trainer.step_count == 20 and resumed.trainer.continued == []
    for k, v in straight.trainer.sae.state_dict().items():
        assert torch.equal(v, resumed.trainer.sae.state_dict()[k]), k


def test_a_finished_run_is_extended_only_with_continue(tmp_path):
    cfg = CFG.replace(checkpoint_dir=tmp_path)
    train(SAE_CFG, cfg.replace(steps=10), _batches(), fingerprint=DATA)
    with pytest.raises(FingerprintError, match="finished at step 10; to train on to 20 pass extend=True, which "
                                               r"recomputes every schedule for 20 steps .*old plan -> new: lr 0 -> 0.001, "):
        train(SAE_CFG, cfg, _batches(), fingerprint=DATA)
    with pytest.warns(RunWarning, match="continuing the run .* from step 10 to 20"):
        run = train(SAE_CFG, cfg, _batches(), fingerprint=DATA, extend=True)
    assert run.trainer.step_count == 20 and len(run.history) == 20
    record = [{"step": 10, "steps_before": 10, "steps": 20}]
    assert run.trainer.continued == record and _ckpt(tmp_path)["continued"] == record
    # the rule: from step 10 on, the learning rate is the one a 20-step run has there
    assert run.history[9]["lr"] == pytest.approx(1e-3 * lr_factor(9, 10, 0, 0.2))  # the first run's last step
    assert run.history[10]["lr"] == pytest.approx(1e-3 * lr_factor(10, 20, 0, 0.2)) == 1e-3
    # the extended run is now planned for 20 steps: running it again resumes (nothing to do)
    assert train(SAE_CFG, cfg, _batches(), fingerprint=DATA).trainer.continued == record
    with pytest.raises(FingerprintError, match="at step 20 already; to continue it give steps above 20"):
        train(SAE_CFG, cfg.replace(steps=15), _batches(), fingerprint=DATA, extend=True)


def test_an_unfinished_run_resumes_to_its_own_steps(tmp_path):
    with pytest.raises(SAEError):
        train(SAE_CFG, CFG.replace(checkpoint_dir=tmp_path, checkpoint_every=5), _batches(5), fingerprint=DATA)
    with pytest.raises(FingerprintError, match="planned for 20 steps \\(at step 5\\); resume it with steps 20"):
        train(SAE_CFG, CFG.replace(checkpoint_dir=tmp_path, steps=30), _batches(), fingerprint=DATA)
    assert train(SAE_CFG, CFG.replace(checkpoint_dir=tmp_path), _batches(), fingerprint=DATA).trainer.step_count == 20


def test_a_checkpoint_without_a_fingerprint_resumes_with_a_warning(tmp_path):
    with pytest.raises(SAEError):
        train(SAE_CFG, CFG.replace(checkpoint_dir=tmp_path, checkpoint_every=5), _batches(5), fingerprint=DATA)
    path = tmp_path / "trainer.safetensors"
    tensors, meta = load_tensors(path)
    del meta["fingerprint"], meta["continued"]  # as an older mechscope wrote it
    save_tensors(path, tensors, meta)
    with pytest.warns(RunWarning, match="records no fingerprint of its data source"):
        run = train(SAE_CFG, CFG.replace(checkpoint_dir=tmp_path), _batches(), fingerprint=DATA)
    assert run.trainer.step_count == 20 and _ckpt(tmp_path)["fingerprint"]["data_seed"] == 1


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two stores of one model's residual stream after blocks 0 and 1, on different token batches."""
    root, model = tmp_path_factory.mktemp("stores"), build("transformer", seed=0)
    sites = [Site("blocks.0"), Site("blocks.1")]
    for name, seed in (("a", 0), ("b", 1)):
        gen = torch.Generator().manual_seed(seed)
        write_store(model, sites, [torch.randint(0, 64, (8, 16), generator=gen) for _ in range(2)], root / name)
    return root, [str(s) for s in sites]


def _cli_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mechscope sae: error: "), err
    return err[0]


def test_cli_refuses_another_store_site_world_or_data_seed(tmp_path, stores, capsys):
    root, (site0, site1) = stores
    ck = tmp_path / "ck"
    run = ["sae", "train", "--d-sae", "32", "--k", "4", "--batch-size", "64", "--steps", "4", "--no-progress",
           "--checkpoint-dir", str(ck), "--out", str(tmp_path / "sae.safetensors")]
    assert main(run + ["--store", str(root / "a"), "--site", site0]) == 0
    capsys.readouterr()
    for changes, said in (
            (["--store", str(root / "a"), "--site", site1], f"--site {site0}, not {site1}"),
            (["--store", str(root / "b"), "--site", site0], f"--store {root / 'a'}, not {root / 'b'}"),
            (["--store", str(root / "a"), "--site", site0, "--data-seed", "2"], "--data-seed 1, not 2"),
            (["--world", "induction"], f"--store {root / 'a'}, not (none)")):
        assert main(run + changes) == 2
        assert _cli_error(capsys).endswith(f"--checkpoint-dir {ck} was trained with {said}; use another "
                                           "--checkpoint-dir or the same settings")
    assert main(run + ["--store", str(root / "a"), "--site", site0, "--steps", "6"]) == 2
    assert "holds a run that finished at step 4; to train on to 6 pass --continue, which recomputes every " \
           "schedule for 6 steps" in _cli_error(capsys)
    assert main(run + ["--store", str(root / "a"), "--site", site0, "--steps", "6", "--continue"]) == 0
    assert "warning: continuing the run in" in capsys.readouterr().err
    assert read_sae_metadata(tmp_path / "sae.safetensors")["continued"] == [{"step": 4, "steps_before": 4,
                                                                             "steps": 6}]
    assert main(["sae", "train", "--synthetic", "--d-sae", "32", "--continue", "--out", str(tmp_path / "x.st")]) == 2
    assert "--continue extends the run in a --checkpoint-dir" in _cli_error(capsys)
