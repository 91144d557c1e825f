"""Training SPD end to end on a case whose answer is known, and resuming a killed run."""

import io

import pytest
import torch
from torch import nn

from mechscope.core.checkpoint import CheckpointError
from mechscope.core.progress import Progress
from mechscope.spd.checkpoint import decomposition_from_state
from mechscope.spd.config import SPDConfig
from mechscope.spd.evals import identity_report, importance_matrix, live_counts, mmcs_ml2r
from mechscope.spd.train import DECOMPOSITION_FILE, STATE_FILE, progress_text, train_spd
from mechscope.tasks.resid_mlp import sparse_features

DIAG = torch.tensor([1.0, 1.5, 2.0, 2.5])


def _diagonal_model() -> nn.Module:
    """``ReLU(W x)`` with W diagonal: four mechanisms, one per input feature, known exactly."""
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(DIAG))
    return model


def _data(b, g):
    return sparse_features(b, 4, 0.25, 0.0, 1.0, at_least_one=True, generator=g)


def test_spd_recovers_the_mechanisms_of_a_diagonal_layer():
    model = _diagonal_model()
    cfg = SPDConfig(sites=("0",), C=8, steps=600, batch_size=256, importance_coeff=1e-2, lr=1e-2,
                    warmup_steps=50, log_every=100)
    run = train_spd(model, _data, cfg, progress=False)
    dec = run.decomposition
    assert live_counts(dec) == {"0": (4, 8)}  # exactly one subcomponent per mechanism, the rest ~0
    report = identity_report(importance_matrix(model, dec, torch.eye(4) * 0.75)["0"])
    assert report["violations"] == 0 and report["n_alive"] == 4
    mechanisms = torch.stack([torch.diag(DIAG)[:, j:j + 1] * torch.eye(4)[j] for j in range(4)])
    match = mmcs_ml2r(dec, "0", mechanisms)
    assert match["mmcs"] >= 0.99
    assert 0.95 <= match["ml2r"] <= 1.05
    assert sorted(match["match"]) == sorted(set(match["match"]))  # four different subcomponents
    # the target was frozen during training and is left as it was
    assert torch.equal(model[0].weight, torch.diag(DIAG)) and model[0].weight.requires_grad
    assert [row["step"] for row in run.history] == [100, 200, 300, 400, 500, 600]


class _Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_result(tmp_path):
    model = _diagonal_model()
    cfg = SPDConfig(sites=("0",), C=6, steps=30, batch_size=64, warmup_steps=5, checkpoint_every=10, log_every=10)
    whole = train_spd(model, _data, cfg, out_dir=tmp_path / "whole", progress=False)

    calls = {"n": 0}

    def dying_data(b, g):
        calls["n"] += 1
        if calls["n"] == 1 + 26:  # one call for the example batch, then die during step 26
            raise _Killed
        return _data(b, g)

    with pytest.raises(_Killed):
        train_spd(model, dying_data, cfg, out_dir=tmp_path / "killed", progress=False)
    assert (tmp_path / "killed" / STATE_FILE).exists() and not (tmp_path / "killed" / DECOMPOSITION_FILE).exists()
    partial, step = decomposition_from_state(tmp_path / "killed" / STATE_FILE, model)  # a run in progress
    assert step == 20 and partial.cfg == cfg.replace()
    resumed = train_spd(model, _data, cfg, out_dir=tmp_path / "killed", progress=False)
    assert resumed.steps_run == 10  # steps 21..30 only
    for (n1, a), (n2, b) in zip(whole.decomposition.state_dict().items(), resumed.decomposition.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1
    assert [r["step"] for r in resumed.history] == [10, 20, 30]
    assert (tmp_path / "killed" / DECOMPOSITION_FILE).exists()
    with pytest.raises(CheckpointError, match="was trained with C 6, not 5"):
        train_spd(model, _data, cfg.replace(C=5), out_dir=tmp_path / "killed", progress=False)


def test_progress_line_shows_losses_and_live_subcomponents():
    stream = io.StringIO()
    bar = Progress(100, label="spd", stream=stream)
    bar.update(50, progress_text({"stochastic": 0.0012, "importance": 2.5}, {"encoder": (5, 20)}))
    text = stream.getvalue()
    assert "50/100" in text and "stochastic 0.0012" in text and "importance 2.5" in text
    assert "live encoder 5/20" in text and "it/s" in text
