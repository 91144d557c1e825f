"""An SPD run's fingerprint and ``--continue``: a resume with another target, Hugging Face
config, seed or config is refused naming the field, a matching resume is bit-identical to an
uninterrupted run, and a finished run is trained on only with ``--continue``, which
recomputes the learning-rate schedule and the annealing of p for the new total (issue 19)."""

import json
import re

import pytest
import torch
from torch import nn

from mechscope.cli import main
from mechscope.core.checkpoint import load_tensors, save_tensors
from mechscope.core.fingerprint import FingerprintError, RunWarning
from mechscope.spd.checkpoint import read_extra
from mechscope.spd.config import SPDConfig
from mechscope.spd.losses import annealed_p, lr_factor
from mechscope.spd.train import DECOMPOSITION_FILE, STATE_FILE, train_spd
from mechscope.tasks.resid_mlp import sparse_features

CFG = SPDConfig(sites=("0",), C=4, steps=12, batch_size=32, warmup_steps=2, checkpoint_every=4, log_every=1,
                p=2.0, p_final=1.0)
TARGET = {"target": "diagonal"}


def _model():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.tensor([1.0, 1.5, 2.0, 2.5])))
    return model


def _data(b, g):
    return sparse_features(b, 4, 0.25, 0.0, 1.0, at_least_one=True, generator=g)


class _Killed(Exception):
    pass


def _killed_at(n):
    calls = {"n": 0}

    def data(b, g):
        calls["n"] += 1
        if calls["n"] == 1 + n:  # one call for the example batch, then die during step n
            raise _Killed
        return _data(b, g)
    return data


def _train(cfg, out, data=_data, fingerprint=TARGET, **kw):
    return train_spd(_model(), data, cfg, out_dir=out, progress=False, fingerprint=fingerprint, **kw)


def test_a_matching_resume_is_bit_identical_and_another_target_or_config_is_refused(tmp_path):
    whole = _train(CFG, tmp_path / "whole")
    with pytest.raises(_Killed):
        _train(CFG, tmp_path / "run", _killed_at(10))  # the last checkpoint: step 8
    for cfg, fingerprint, said in ((CFG, {"target": "other"}, "target diagonal, not other"),
                                   (CFG.replace(seed=1), TARGET, "seed 0, not 1"),
                                   (CFG.replace(importance_coeff=1e-2), TARGET, "importance_coeff 0.003, not 0.01")):
        with pytest.raises(FingerprintError, match=f"was trained with {said}; use another out_dir"):
            _train(cfg, tmp_path / "run", fingerprint=fingerprint)
    resumed = _train(CFG.replace(log_every=3, checkpoint_every=5), tmp_path / "run")  # cadence may change
    assert resumed.steps_run == 4 and resumed.continued == []
    for (n1, a), (n2, b) in zip(whole.decomposition.state_dict().items(), resumed.decomposition.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1


def test_a_finished_run_is_extended_only_with_continue(tmp_path):
    _train(CFG, tmp_path)
    with pytest.raises(FingerprintError, match=r"finished at step 12; to train on to 20 pass extend=True, which "
                                               r"recomputes every schedule for 20 steps .*lr 0 -> 0.000"):
        _train(CFG.replace(steps=20), tmp_path)
    with pytest.warns(RunWarning, match="from step 12 to 20"):
        run = _train(CFG.replace(steps=20), tmp_path, extend=True)
    record = [{"step": 12, "steps_before": 12, "steps": 20}]
    assert run.steps_run == 8 and run.continued == record
    assert load_tensors(tmp_path / STATE_FILE)[1]["continued"] == record
    assert read_extra(tmp_path / DECOMPOSITION_FILE)["continued"] == record
    # the rule: from step 12 on, the learning rate and p are those of a 20-step run there
    first = run.history[12]  # the record after step index 12
    assert first["step"] == 13 and first["lr"] == pytest.approx(CFG.lr * lr_factor(12, 20, "cosine"))
    assert first["p"] == pytest.approx(annealed_p(12 / 20, 2.0, 1.0, 0.0, 1.0))
    assert run.history[11]["lr"] == pytest.approx(CFG.lr * lr_factor(11, 12, "cosine"))  # the first plan's end
    with pytest.raises(FingerprintError, match="at step 20 already; to continue it give steps above 20"):
        _train(CFG.replace(steps=16), tmp_path, extend=True)


def test_an_unfinished_run_resumes_to_its_own_steps_and_an_old_state_with_a_warning(tmp_path):
    with pytest.raises(_Killed):
        _train(CFG, tmp_path, _killed_at(6))
    with pytest.raises(FingerprintError, match=r"planned for 12 steps \(at step 4\); resume it with steps 12"):
        _train(CFG.replace(steps=30), tmp_path)
    tensors, meta = load_tensors(tmp_path / STATE_FILE)
    del meta["fingerprint"], meta["continued"]  # as an older mechscope wrote it
    save_tensors(tmp_path / STATE_FILE, tensors, meta)
    with pytest.warns(RunWarning, match="records no fingerprint of its target"):
        assert _train(CFG, tmp_path).steps_run == 8
    assert load_tensors(tmp_path / STATE_FILE)[1]["fingerprint"]["target"] == "diagonal"


def _error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mechscope spd: error: "), err
    return err[0]


def test_cli_names_the_option_and_continues(tmp_path, capsys):
    out = tmp_path / "run"
    run = ["spd", "train", "--out", str(out), "--steps", "2", "--batch-size", "16", "--warmup-steps", "1", "--C", "4"]
    assert main(run + ["--target", "tms_5_2"]) == 0
    capsys.readouterr()
    for changes, said in ((["--target", "tms_5_2_id"], "--target tms_5_2, not tms_5_2_id"),
                          (["--target", "tms_5_2", "--seed", "1"], "--seed 0, not 1")):
        assert main(run + changes) == 2
        assert _error(capsys).endswith(f"--out {out} was trained with {said}; use another --out or the same settings")
    assert main(run + ["--target", "tms_5_2", "--steps", "4"]) == 2
    assert re.search(r"finished at step 2; to train on to 4 pass --continue, which recomputes every schedule for 4 "
                     r"steps .*; or give --steps 2$", _error(capsys))
    assert main(run + ["--target", "tms_5_2", "--steps", "4", "--continue"]) == 0
    assert "warning: continuing the run in" in capsys.readouterr().err
    assert read_extra(out / DECOMPOSITION_FILE)["continued"] == [{"step": 2, "steps_before": 2, "steps": 4}]


def test_cli_refuses_another_hf_config(tmp_path, capsys):
    hf = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 40, "n_positions": 16,
          "bos_token_id": 0, "eos_token_id": 0}
    config = tmp_path / "config.json"
    config.write_text(json.dumps(hf))
    run = ["spd", "train", "--hf-config", str(config), "--sites", "transformer.h.0.mlp.c_fc", "--out",
           str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--warmup-steps", "0", "--C", "2",
           "--seq-len", "4"]
    assert main(run) == 0
    capsys.readouterr()
    config.write_text(json.dumps({**hf, "vocab_size": 48}))  # the same file, edited
    assert main(run) == 2
    assert "was trained with --hf-config (vocab_size) 40, not 48" in _error(capsys)
    config.write_text(json.dumps(hf))
    assert main(run[:-1] + ["5"]) == 2
    assert "was trained with --seq-len 4, not 5" in _error(capsys)
