"""`mechscope spd train|eval|figures`, the built-in targets' recipes, and the bench registration."""

import json

import pytest
import torch

from mechscope.cli import main
from mechscope.core.checkpoint import MissingCheckpointError
from mechscope.tasks import spd_targets as targets


def test_targets_have_the_published_settings():
    t = targets.target("tms_5_2").spd
    assert (t.C, t.importance_coeff, t.p, t.batch_size, t.steps, t.lr, t.lr_schedule) == (20, 3e-3, 1.0, 4096, 10_000, 1e-3, "cosine")
    t = targets.target("tms_40_10").spd
    assert (t.C, t.importance_coeff, t.p) == (200, 1e-4, 2.0)
    t = targets.target("resid_mlp").spd
    assert (t.C, t.importance_coeff, t.p, t.batch_size, t.steps, t.lr, t.lr_schedule) == (100, 1e-5, 2.0, 2048, 20_000, 2e-3, "constant")
    assert targets.target("tms_5_2_id").spd.sites == ("encoder", "identity", "decoder")
    x = targets.data_fn("tms_40_10")(64, torch.Generator().manual_seed(0))
    assert x.shape == (64, 40) and bool((x != 0).any(-1).all())
    with pytest.raises(KeyError, match="valid: tms_5_2"):
        targets.target("tms_3_1")


def test_tms_recipe_keeps_an_instance_that_represents_every_feature():
    lines = []
    model, record = targets.train_tms_target("tms_5_2", steps=400, n_instances=4, log=lines.append)
    assert record["instance"] in range(4) and min(record["feature_norms"]) > 0.5
    assert "represent all 5 features" in lines[0]
    assert torch.allclose(model.decoder.weight, model.encoder.weight.T)


def test_tms_recipe_says_what_it_does_when_no_seed_represents_every_feature(monkeypatch):
    from mechscope.tasks import tms

    real, calls = tms.best_instance, []

    def first_round_fails(model, threshold=0.5):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("no instance represents all features")
        return real(model, threshold)

    monkeypatch.setattr(tms, "best_instance", first_round_fails)
    lines = []
    model, record = targets.train_tms_target("tms_5_2", steps=400, n_instances=4, log=lines.append)
    assert "round 0 (seed 0): no instance represents all 5 features" in lines[0]
    assert "training the next round of seeds" in lines[0] and "round 1 (seed 1)" in lines[1]
    assert record["recipe"]["seed"] == 1
    with pytest.raises(RuntimeError, match="no seed in 1 rounds"):
        monkeypatch.setattr(tms, "best_instance", lambda m, threshold=0.5: (_ for _ in ()).throw(RuntimeError("x")))
        targets.train_tms_target("tms_5_2", steps=10, n_instances=2, rounds=1, log=lines.append)


def test_a_missing_target_checkpoint_says_how_to_train_it(tmp_path):
    with pytest.raises(MissingCheckpointError, match="mechscope train spd_tms_5_2"):
        targets.load_target("tms_5_2", tmp_path / "none.safetensors")


def test_cli_train_eval_and_figures_on_a_built_in_target(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["spd", "train", "--target", "tms_5_2", "--out", str(run_dir), "--steps", "12", "--batch-size", "64",
                 "--warmup-steps", "5", "--log-every", "6", "--C", "8"])
    assert code == 0
    assert (run_dir / "decomposition.safetensors").exists() and (run_dir / "history.json").exists()
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["step"] for r in history] == [6, 12]
    capsys.readouterr()
    assert main(["spd", "eval", "--target", "tms_5_2", "--decomposition", str(run_dir / "decomposition.safetensors"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"live", "layers", "encoder_match", "reconstruction"}
    assert out["live"]["encoder"] <= 8
    figs = tmp_path / "figs"
    assert main(["spd", "figures", "--target", "tms_5_2", "--decomposition", str(run_dir / "decomposition.safetensors"),
                 "--out", str(figs)]) == 0
    names = sorted(p.name for p in figs.iterdir())
    assert names == ["tms_5_2__importance_matrix.png", "tms_5_2__subcomponent_norms.png",
                     "tms_5_2__subcomponents_vs_features.png"]


def test_cli_bad_usage_exits_2(tmp_path, capsys):
    assert main(["spd", "eval"]) == 2
    assert "exactly one of --target" in capsys.readouterr().err
    assert main(["spd", "eval", "--target", "tms_9_9"]) == 2
    assert main(["spd", "train", "--target", "tms_5_2", "--out", str(tmp_path), "--C", "0"]) == 2
    assert "C must be >= 1" in capsys.readouterr().err
    # a decomposition of another target is refused
    run_dir = tmp_path / "run"
    assert main(["spd", "train", "--target", "tms_5_2", "--out", str(run_dir), "--steps", "2", "--batch-size", "16",
                 "--warmup-steps", "1", "--C", "4"]) == 0
    capsys.readouterr()
    assert main(["spd", "eval", "--target", "tms_5_2_id", "--decomposition",
                 str(run_dir / "decomposition.safetensors")]) == 2
    assert "another target" in capsys.readouterr().err


def test_cli_on_a_random_hugging_face_model(tmp_path):
    pytest.importorskip("transformers")
    cfg = json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 30,
                      "n_positions": 16})
    run_dir = tmp_path / "hf"
    assert main(["spd", "train", "--hf-config", cfg, "--sites", "transformer.h.0.mlp.c_fc", "--out", str(run_dir),
                 "--steps", "3", "--warmup-steps", "2", "--seq-len", "8", "--C", "6"]) == 0
    assert main(["spd", "eval", "--hf-config", cfg, "--decomposition", str(run_dir / "decomposition.safetensors"),
                 "--seq-len", "8"]) == 0
    assert main(["spd", "train", "--hf-config", cfg, "--out", str(run_dir)]) == 2  # no --sites


def test_bench_checks_are_registered_with_the_published_thresholds():
    from mechscope.bench import REGISTRY
    from mechscope.bench.catalog import load_catalog

    assert not [name for name, _ in load_catalog(["mechscope.bench.spd_checks"])]
    checks = {c.name: c for c in REGISTRY if c.method.startswith("spd")}
    t = checks["tms_5_2/spd/live_encoder"].thresholds
    assert str(t["live_encoder"]) == "== 5" and str(t["mmcs"]) == ">= 0.99"
    assert str(t["ml2r_abs_error"]) == "<= 0.05" and str(t["ci_violations"]) == "== 0"
    assert str(t["ci_diag_min"]) == ">= 0.9" and str(t["ci_offdiag_max"]) == "<= 0.1"
    t = checks["tms_40_10/spd/live_encoder"].thresholds
    assert (str(t["live_encoder"]), str(t["mmcs"]), str(t["ci_violations"])) == ("== 40", ">= 0.99", "<= 2")
    t = checks["tms_5_2_id/spd/identity_live"].thresholds
    assert (str(t["identity_live"]), str(t["identity_importance_min"])) == ("== 2", ">= 0.9")
    t = checks["resid_mlp/spd/w_in_live"].thresholds
    assert (str(t["w_in_ci_alive"]), str(t["w_in_violations"])) == ("== 100", "<= 5")
    assert t["w_in_live"] is None  # information since 2026-12-06: at most C = 100, and 100 at initialisation
    assert str(checks["resid_mlp/spd/w_in_live"].criteria["w_in_live"].amended_from.original) == "== 100"
    t = checks["resid_mlp/spd_surgery/lost_fraction"].thresholds
    assert (str(t["lost_fraction"]), str(t["others_error_change"])) == (">= 0.9", "<= 0.1")


def test_cli_ship_records_the_step_count(tmp_path, monkeypatch, capsys):
    # ship into a copy of the zoo, so that the bench can label a shortened run
    import shutil

    from mechscope.spd.checkpoint import read_extra

    zoo = tmp_path / "zoo"
    zoo.mkdir()
    shutil.copy(targets.target("tms_5_2").checkpoint, zoo / "spd_tms_5_2.safetensors")
    monkeypatch.setattr(targets, "CHECKPOINTS", zoo)
    assert main(["spd", "train", "--target", "tms_5_2", "--out", str(tmp_path / "run"), "--steps", "3",
                 "--batch-size", "16", "--warmup-steps", "1", "--C", "4", "--ship"]) == 0
    extra = read_extra(zoo / "spd_tms_5_2_decomposition.safetensors")
    assert (extra["steps"], extra["published_steps"], extra["steps_run"]) == (3, 10_000, 3)
