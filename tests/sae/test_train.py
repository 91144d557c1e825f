"""Training: every architecture recovers known features, the JumpReLU traps are avoided,
dead latents are tracked by tokens and revived, transcoders learn known maps,
checkpoints resume exactly, and bad input is a clear error."""

import itertools

import pytest
import torch

from mechscope.core.checkpoint import CheckpointError
from mechscope.core.config import ConfigError
from mechscope.sae.arch import SAEConfig, SAEError
from mechscope.sae.evals import evaluate, mmcs, recovered_fraction
from mechscope.sae.train import TrainConfig, Trainer, lr_factor, recipe, train
from mechscope.tasks.synthetic_features import SyntheticConfig, SyntheticFeatures

WORLD = SyntheticFeatures(SyntheticConfig(d=32, n_features=64, expected_l0=3))


def _fit(arch, steps=300, batch_size=1024, **kw):
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=3e-3, progress=False, dead_tokens=50_000, **kw)
    return train(SAEConfig(d_in=32, d_sae=128, arch=arch, k=3), cfg, WORLD.batches(batch_size, seed=1))


def test_the_world_is_not_the_initialisation():
    """A world seeded s and a dictionary initialised under manual_seed(s) must not share directions
    (they did: both drew Gaussian rows from the same stream, so MMCS was 1 before training)."""
    for seed in range(3):
        world = SyntheticFeatures(SyntheticConfig(d=32, n_features=64, expected_l0=3, seed=seed))
        for init_seed in range(3):
            sae = Trainer(SAEConfig(d_in=32, d_sae=128, k=3), TrainConfig(seed=init_seed)).sae
            assert mmcs(world.features, sae.W_dec) < 0.6  # chance level for 128 random rows in d 32: 0.44-0.45


def test_topk_with_auxk_recovers_the_known_features():
    res = _fit("topk")
    assert mmcs(WORLD.features, res.sae.W_dec) >= 0.95
    assert recovered_fraction(WORLD.features, res.sae.W_dec) >= 0.9
    assert res.history[-1]["l0"] <= 3
    # the exported dictionary takes raw activations: its FVU on fresh data matches training's
    ev = evaluate(res.sae, WORLD.batches(1024, seed=9, n_batches=3))
    assert ev["fvu"] == pytest.approx(res.history[-1]["fvu"], abs=0.05)


# JumpReLU's θ climbs from 0.001 by about lr per Adam step, so it needs more (smaller) steps
@pytest.mark.parametrize("arch,kw", [("relu", {}), ("batchtopk", {}), ("jumprelu", dict(steps=1000, batch_size=256))])
def test_every_architecture_learns_the_features(arch, kw):
    res = _fit(arch, **kw)
    assert mmcs(WORLD.features, res.sae.W_dec) >= 0.9, arch


def test_matryoshka_puts_frequent_features_first():
    """Each prefix must reconstruct on its own: the first 16 latents carry the most frequent
    features, unlike BatchTopK's, whose order is arbitrary (spec §1.6)."""
    world = SyntheticFeatures(SyntheticConfig(d=32, n_features=64, expected_l0=3, decay=0.95))  # p_0 / p_63 = 25
    x = next(world.batches(8192, seed=9))
    scores = {}
    for arch in ("matryoshka", "batchtopk"):
        kw = dict(matryoshka_widths=(16, 128)) if arch == "matryoshka" else {}
        cfg = TrainConfig(steps=300, batch_size=1024, lr=3e-3, progress=False, dead_tokens=50_000)
        sae = train(SAEConfig(d_in=32, d_sae=128, arch=arch, k=3, **kw), cfg, world.batches(1024, seed=1)).sae
        f = sae.encode(x)  # [8192, 128]
        head = f.clone()
        head[:, 16:] = 0
        fvu = lambda x_hat: float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())  # noqa: E731
        density = (f != 0).float().mean(0)
        scores[arch] = {"mmcs": mmcs(world.features, sae.W_dec), "fvu": fvu(sae.decode(f)), "head_fvu": fvu(sae.decode(head)),
                        "head_density": float(density[:16].mean()), "tail_density": float(density[16:].mean())}
    m, b = scores["matryoshka"], scores["batchtopk"]
    assert m["fvu"] < 0.3 and m["mmcs"] > 0.8  # it still learns the features
    assert m["head_fvu"] < 0.6 * b["head_fvu"]  # measured 0.40 against 0.88
    assert m["head_density"] > 5 * m["tail_density"]  # measured 0.12 against 0.008


def test_jumprelu_threshold_moves_and_l0_falls():
    """Spec §1.4 traps: θ is trained directly in fp32 at the paper's lr, and L0 falls."""
    trainer = Trainer(SAEConfig(d_in=32, d_sae=128, arch="jumprelu", k=3), TrainConfig(steps=200, batch_size=1024))
    assert trainer.recipe.lr == 7e-5 and trainer.recipe.betas == (0.0, 0.999)
    theta0 = trainer.sae.threshold.detach().clone()
    l0 = [trainer.step(x).l0 for x in WORLD.batches(1024, seed=1, n_batches=200)]
    assert trainer.sae.threshold.dtype == torch.float32
    moved = float((trainer.sae.threshold.detach() - theta0).abs().mean())
    # a log-θ parameter would move θ by about θ·lr per step: 0.001 * 7e-5 * 200 = 1.4e-5 in total
    assert moved > 100 * 0.001 * 7e-5 * 200
    assert sum(l0[-10:]) / 10 < 0.9 * sum(l0[:10]) / 10


def test_batchtopk_threshold_keeps_l0_at_inference():
    res = _fit("batchtopk")
    assert res.sae.cfg.arch == "jumprelu"  # exported with its global threshold
    ev = evaluate(res.sae, WORLD.batches(1024, seed=5, n_batches=4))
    assert abs(ev["l0"] - 3) / 3 < 0.25


def test_dead_latents_are_counted_in_tokens():
    cfg = TrainConfig(steps=10, batch_size=100, dead_tokens=450, lr=1e-4)
    trainer = Trainer(SAEConfig(d_in=32, d_sae=128, k=3), cfg)
    with torch.no_grad():
        trainer.sae.b_enc[7] = -1e4  # latent 7 can never be among the top k
    batches = WORLD.batches(100, seed=2)
    for step in range(1, 6):
        trainer.step(next(batches))
        assert int(trainer.since_fired[7]) == 100 * step
        assert (trainer.dead_fraction() > 0) == (100 * step >= 450)


def test_resampling_revives_dead_latents():
    cfg = TrainConfig(steps=60, batch_size=512, dead_fix="resample", resample_every=20, dead_tokens=2048,
                      resample_warmup_steps=5, lr=1e-3)
    trainer = Trainer(SAEConfig(d_in=32, d_sae=128, arch="relu"), cfg)
    killed = torch.arange(0, 128, 4)
    with torch.no_grad():
        trainer.sae.b_enc[killed] = -100.0
    before = trainer.sae.W_dec[killed].clone()
    for x in WORLD.batches(512, seed=3, n_batches=20):
        trainer.step(x)
    assert trainer.rewarm_from == 20
    assert torch.all(trainer.sae.b_enc[killed] == 0)
    assert not torch.allclose(trainer.sae.W_dec[killed], before)
    assert torch.all(trainer.opt.state[trainer.sae.b_enc]["exp_avg"][killed] == 0)
    fired = torch.zeros(128, dtype=torch.bool)
    for x in WORLD.batches(512, seed=4, n_batches=5):
        fired |= trainer.step(x).fired
    assert fired[killed].float().mean() > 0.5


def test_unit_norm_decoder_is_kept_and_recipes_differ_by_architecture():
    res = _fit("topk", steps=20)
    assert torch.allclose(res.trainer.sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5)
    relu = recipe(SAEConfig(d_in=32, d_sae=128, arch="relu"), TrainConfig())
    assert (relu.normalize, relu.decay_fraction, relu.grad_clip, relu.unit_norm_decoder) == ("sqrt_d", 0.2, 1.0, False)
    topk = recipe(SAEConfig(d_in=32, d_sae=2 ** 14), TrainConfig())
    assert (topk.lr, topk.dead_fix, topk.aux_k, topk.normalize) == (2e-4, "auxk", 16, "unit")


def test_untied_initialisation():
    tied = Trainer(SAEConfig(d_in=32, d_sae=128), TrainConfig())
    untied = Trainer(SAEConfig(d_in=32, d_sae=128), TrainConfig(tied_init=False))
    assert torch.equal(tied.sae.W_enc, tied.sae.W_dec.T) and torch.equal(untied.sae.W_dec, tied.sae.W_dec)
    assert torch.allclose(untied.sae.W_enc.norm(dim=0), torch.ones(128))
    assert float((untied.sae.W_enc * untied.sae.W_dec.T).sum(0).abs().mean().detach()) < 0.3  # unrelated directions


def test_learning_rate_schedule():
    assert lr_factor(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, 0.2) == 1.0
    assert lr_factor(90, 100, 0, 0.2) == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, 0.2) == pytest.approx(0.05)


def test_transcoders_learn_known_maps():
    gen = torch.Generator().manual_seed(0)
    out_dirs = torch.nn.functional.normalize(torch.randn(64, 16, generator=gen), dim=1)  # [n_features, d_out]

    def pairs(seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            _, codes = WORLD.sample(1024, g)
            yield codes @ WORLD.features, codes @ out_dirs  # same sparse causes, other directions

    cfg = TrainConfig(steps=300, batch_size=1024, lr=3e-3, progress=False)
    res = train(SAEConfig(d_in=32, d_sae=128, kind="transcoder", d_out=16, k=3), cfg, pairs(1))
    ev = evaluate(res.sae, (b for _, b in zip(range(3), pairs(7))))
    assert ev["fvu"] < 0.2 and mmcs(out_dirs, res.sae.W_dec) > 0.9
    # a dense linear target: two latents per token cannot carry it, the skip term can
    A = torch.randn(16, 32, generator=gen) / 32 ** 0.5
    fvu = {}
    for kind in ("skip_transcoder", "transcoder"):
        lin = ((x, x @ A.T) for x in WORLD.batches(1024, seed=2))
        res = train(SAEConfig(d_in=32, d_sae=64, kind=kind, d_out=16, k=2), cfg.replace(steps=200), lin)
        fvu[kind] = evaluate(res.sae, ((x, x @ A.T) for x in WORLD.batches(1024, seed=7, n_batches=2)))["fvu"]
    assert fvu["skip_transcoder"] < 0.05 and fvu["transcoder"] > 3 * fvu["skip_transcoder"]


def test_checkpoints_resume_exactly(tmp_path):
    sae_cfg = SAEConfig(d_in=32, d_sae=128, arch="topk", k=3)
    cfg = TrainConfig(steps=30, batch_size=256, lr=1e-3, dead_tokens=2000, progress=False)
    straight = train(sae_cfg, cfg, WORLD.batches(256, seed=1))
    with pytest.raises(SAEError, match="ran out after 15 steps"):  # interrupted at step 15 (its last checkpoint)
        train(sae_cfg, cfg.replace(checkpoint_dir=tmp_path, checkpoint_every=5),
              itertools.islice(WORLD.batches(256, seed=1), 15))
    assert (tmp_path / "trainer.safetensors").exists()
    resumed = train(sae_cfg, cfg.replace(checkpoint_dir=tmp_path), WORLD.batches(256, seed=1))
    assert resumed.trainer.step_count == 30
    for k, v in straight.trainer.sae.state_dict().items():
        assert torch.equal(v, resumed.trainer.sae.state_dict()[k]), k
    assert torch.equal(straight.trainer.since_fired, resumed.trainer.since_fired)
    with pytest.raises(CheckpointError, match="was trained with lr 0.001, not 0.002"):
        train(sae_cfg, cfg.replace(lr=2e-3, checkpoint_dir=tmp_path), WORLD.batches(256, seed=1))


def test_bad_training_input_is_a_clear_error():
    trainer = Trainer(SAEConfig(d_in=32, d_sae=64, k=3), TrainConfig(steps=5, batch_size=8))
    with pytest.raises(SAEError, match=r"rows \[batch, d_in=32\], got \[8, 31\]"):
        trainer.step(torch.randn(8, 31))
    bad = torch.randn(8, 32)
    bad[0, 0] = float("nan")
    with pytest.raises(SAEError, match="NaN or inf"):
        trainer.step(bad)
    with pytest.raises(SAEError, match="all zeros"):
        trainer.step(torch.zeros(8, 32))
    tc = Trainer(SAEConfig(d_in=32, d_sae=64, kind="transcoder", d_out=4, k=3), TrainConfig(batch_size=8))
    with pytest.raises(SAEError, match="give \\(x, y\\) batches"):
        tc.step(torch.randn(8, 32))
    with pytest.raises(SAEError, match="data ran out after 2 steps"):
        train(SAEConfig(d_in=32, d_sae=64, k=3), TrainConfig(steps=5, batch_size=8, progress=False),
              WORLD.batches(8, n_batches=2))
    with pytest.raises(ConfigError, match="dead_fix='auxk' needs a topk-family"):
        Trainer(SAEConfig(d_in=32, d_sae=64, arch="relu"), TrainConfig(dead_fix="auxk"))
    with pytest.raises(SAEError, match="has not seen any data"):
        trainer.export()
    for arch in ("topk", "batchtopk", "relu", "jumprelu"):  # an empty batch: not a ZeroDivisionError
        with pytest.raises(SAEError, match=r"step 0: the batch has no rows \(\[0, 32\]\)"):
            Trainer(SAEConfig(d_in=32, d_sae=64, arch=arch, k=3), TrainConfig(batch_size=8)).step(torch.empty(0, 32))


def test_progress_bar_shows_loss_l0_fvu_and_dead():
    import io

    from mechscope.core.progress import Progress
    from mechscope.sae.train import progress_text

    out = io.StringIO()
    bar = Progress(100, label="sae", stream=out)
    bar.update(50, progress_text({"loss": 0.25, "l0": 31.5, "fvu": 0.0123, "dead": 0.125}))
    bar.close()
    line = out.getvalue()
    assert "50/100" in line and "loss 0.25" in line and "L0 31.5" in line and "FVU 0.0123" in line
    assert "dead 12.5%" in line and "\r" not in line  # not a terminal: plain lines
