"""Dictionaries on the toy worlds and the synthetic recipe: data, scoring by CE loss
recovered, shipping and loading (tiny step counts; the bench runs the real settings)."""

import pytest
import torch

from mechscope.tasks import sae_synthetic as recipes, sae_worlds as worlds
from mechscope.sae.arch import SAE, SAEConfig
from mechscope.sae.io import save_sae


def _exact(d: int) -> SAE:
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, arch="relu"))
    with torch.no_grad():
        eye = torch.eye(d)
        sae.W_enc.copy_(torch.cat([eye, -eye], 1)), sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_(), sae.b_dec.zero_()
    return sae.eval()


@pytest.mark.parametrize("name,d", [("induction", 64), ("grokking", 512)])
def test_worlds_score_an_exact_dictionary_as_fully_recovered(name, d):
    world = worlds.induction_world(n_sequences=256) if name == "induction" else worlds.grokking_world()
    rows = next(world.stream(32, 0))
    assert rows.shape == (32, d)
    s = worlds.score(world, _exact(d))
    assert s["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4) and s["fvu"] == pytest.approx(0.0, abs=1e-8)
    assert s["ce_zero_ablation"] > s["ce_clean"] + 0.5  # the site matters to the model


def test_train_ship_and_load_a_toy_dictionary(tmp_path):
    world = worlds.induction_world(n_sequences=256)
    res = worlds.train_toy_sae(world, "topk", steps=5)
    assert res.sae.cfg.k == 16 and res.sae.d_sae == 512
    save_sae(tmp_path / worlds.checkpoint_name("induction", "topk"), res.sae, extra={"model_file": world.model_file})
    sae, meta = worlds.load_shipped("induction", "topk", tmp_path)
    assert meta["model_file"] == "induction_2l.safetensors" and torch.equal(sae.W_dec, res.sae.W_dec)
    with pytest.raises(ValueError, match="no setting"):
        worlds.sae_setting("tms", "topk", 8)
    with pytest.raises(ValueError, match="unknown toy world"):
        worlds.load_world("othello")
    with pytest.raises(ValueError, match="unknown toy world or architecture"):
        worlds.train_and_ship_toy_worlds(tmp_path, worlds=("induction",), archs=("relu",))


def test_every_shipped_dictionary_has_a_retraining_command():
    from mechscope.cli.train import resolve
    from mechscope.tasks.registry import names

    assert resolve("sae_induction") is worlds.train_and_ship_induction  # after retraining the induction model
    assert resolve("sae_grokking") is worlds.train_and_ship_grokking
    assert resolve("sae_toy_worlds") is worlds.train_and_ship_toy_worlds
    assert resolve("sae_synthetic") is recipes.train_and_ship_synthetic
    shipped = sorted(p.name for p in worlds.CHECKPOINTS.glob("sae_*.safetensors"))
    made = {worlds.checkpoint_name(w, a) for w in worlds.WORLDS for a in worlds.ARCHS} | set(recipes.SYNTHETIC_FILES.values())
    assert set(shipped) <= made and "sae_toy_worlds" in names()
    for name in shipped:
        assert (worlds.CHECKPOINTS / name).stat().st_size < 2 * 2 ** 20, name


def test_toy_settings_aim_below_the_checks_l0():
    for world, d in (("induction", 64), ("grokking", 512)):
        for arch in worlds.ARCHS:
            sae_cfg, cfg = worlds.sae_setting(world, arch, d)
            assert sae_cfg.k < 32 or (arch == "topk" and sae_cfg.k == 32)  # TopK's L0 cannot exceed k


def test_synthetic_recipe_records_mmcs_along_training():
    result, world, scores = recipes.train_synthetic(auxk=True, steps=20)
    assert [e["step"] for e in result.history] == [20] and "mmcs" in result.history[-1]
    assert set(scores) == {"mmcs", "mcc", "recovered", "dead", "fvu", "l0"}
    w, s, cfg = recipes.synthetic_setting(auxk=False)
    assert (w.n_features, s.d_sae, s.k, cfg.steps, cfg.dead_fix, cfg.batch_size) == (512, 1024, 5, 3000, "none", 4096)


def test_bench_checks_are_registered_with_their_thresholds():
    import mechscope.bench.sae_checks  # noqa: F401 - registers the checks
    from mechscope.bench import REGISTRY

    checks = {c.name: c for c in REGISTRY if c.run.__module__ == "mechscope.bench.sae_checks"}
    assert str(checks["synthetic_features/topk_auxk/mmcs"].threshold) == ">= 0.99"
    assert str(checks["synthetic_features/topk_no_auxk/mmcs"].thresholds["mmcs_gain_from_auxk"]) == ">= 0.05"
    for world in ("induction", "grokking"):
        for arch in ("topk", "jumprelu"):
            c = checks[f"{world}/sae_{arch}/ce_loss_recovered"]
            assert str(c.threshold) == ">= 0.9"
            # TopK's L0 cannot exceed k = 32: information, the original criterion kept (issue 18)
            l0 = c.criteria["l0"]
            if arch == "topk":
                assert l0.kind == "info" and str(l0.amended_from.original) == "<= 32"
            else:
                assert str(l0.threshold) == "<= 32"
    assert checks["hierarchical_equality/sae_search/iia"].threshold is None  # the IIA is reported ...
    assert str(checks["hierarchical_equality/sae_search/iia"].thresholds["das_minus_iia"]) == ">= 0.05"  # ... DAS judged
