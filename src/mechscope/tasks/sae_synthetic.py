"""Recipes of the shipped dictionaries: synthetic ground truth (TopK with and without AuxK).

``mechscope train sae_synthetic`` runs :func:`train_and_ship_synthetic`, which trains both
dictionaries of the spec's reference run (§6) and writes them to
``zoo/checkpoints/sae_synthetic_topk_{auxk,no_auxk}.safetensors``:

- world: d = 256, 512 Gaussian-then-normalised features, p_i ∝ 0.99^i with Σp = 5,
  magnitudes U[0, 1] (:mod:`mechscope.tasks.synthetic_features`, seed 0);
- dictionary: TopK, 1024 latents (2x overcomplete), k = 5, unit-norm decoder with
  gradient projection, b_dec from the first batch's mean, no input scaling;
- training: FVU loss, Adam lr 1e-3, batch 4096, 3000 steps (12 M vectors); AuxK with
  k_aux = 128, α = 1/32, dead after 200 k tokens, or no AuxK at all.

Weights are stored at half precision (the shipped files must stay under 2 MB); the
metadata keeps the training history (with the MMCS every 100 steps) and the final scores
computed in fp32 before rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from mechscope.sae.arch import SAEConfig
from mechscope.sae.evals import matched_correlation, mmcs, recovered_fraction
from mechscope.sae.io import save_sae
from mechscope.sae.train import TrainConfig, TrainResult, train
from mechscope.tasks.synthetic_features import SyntheticConfig, SyntheticFeatures

CHECKPOINTS = Path(__file__).resolve().parent.parent / "zoo" / "checkpoints"
SYNTHETIC_FILES = {"auxk": "sae_synthetic_topk_auxk.safetensors", "no_auxk": "sae_synthetic_topk_no_auxk.safetensors"}


def synthetic_setting(auxk: bool, steps: int = 3000, tied_init: bool = True) -> tuple[SyntheticConfig, SAEConfig, TrainConfig]:
    """The reference run's world, dictionary and training (``auxk``: with or without AuxK)."""
    world = SyntheticConfig(d=256, n_features=512, expected_l0=5.0, decay=0.99, seed=0)
    sae = SAEConfig(d_in=256, d_sae=1024, arch="topk", k=5)
    cfg = TrainConfig(steps=steps, batch_size=4096, lr=1e-3, normalize="none", dead_fix="auxk" if auxk else "none",
                      aux_k=128, aux_alpha=1 / 32, dead_tokens=200_000, log_every=100, seed=0,
                      tied_init=tied_init)
    return world, sae, cfg


def train_synthetic(auxk: bool, steps: int = 3000, log: Callable[[str], None] | None = None,
                    progress: bool = False, tied_init: bool = True) -> tuple[TrainResult, SyntheticFeatures, dict[str, Any]]:
    """Train one reference dictionary; returns the result, the world and its scores.

    ``tied_init=False`` starts the encoder at random directions instead of ``W_decᵀ``
    (an ablation: see the bench's ``topk_untied_*`` rows).
    """
    world_cfg, sae_cfg, cfg = synthetic_setting(auxk, steps, tied_init)
    world = SyntheticFeatures(world_cfg)

    def on_log(entry: dict[str, float], trainer: Any) -> None:  # MMCS along the way, for the training figure
        entry["mmcs"] = mmcs(world.features, trainer.sae.W_dec)
        if log is not None:
            log(f"synthetic topk {'+AuxK' if auxk else 'no AuxK'} step {int(entry['step'])}: FVU {entry['fvu']:.4f}, "
                f"L0 {entry['l0']:.2f}, dead {100 * entry['dead']:.1f}%, MMCS {entry['mmcs']:.4f}")

    result = train(sae_cfg, cfg.replace(progress=progress), world.batches(cfg.batch_size, seed=1), on_log=on_log)
    scores = synthetic_scores(result, world)
    return result, world, scores


def synthetic_scores(result: TrainResult, world: SyntheticFeatures) -> dict[str, float]:
    """MMCS, Hungarian MCC, fraction recovered at cos > 0.9, trainer's dead fraction, FVU, L0."""
    w = result.sae.W_dec
    last = result.history[-1]
    return {"mmcs": mmcs(world.features, w), "mcc": matched_correlation(world.features, w),
            "recovered": recovered_fraction(world.features, w), "dead": result.trainer.dead_fraction(),
            "fvu": last["fvu"], "l0": last["l0"]}


def train_and_ship_synthetic(out_dir: Path, log: Callable[[str], None] = print, steps: int = 3000,
                             tied_init: bool = True) -> list[Path]:
    """Train both reference dictionaries and write them to ``out_dir`` (``mechscope train sae_synthetic``)."""
    paths = []
    for name, auxk in (("auxk", True), ("no_auxk", False)):
        result, world, scores = train_synthetic(auxk, steps, log, tied_init=tied_init)
        world_cfg, _, cfg = synthetic_setting(auxk, steps, tied_init)
        path = Path(out_dir) / SYNTHETIC_FILES[name]
        save_sae(path, result.sae, dtype=torch.float16, extra={
            "recipe": "mechscope.tasks.sae_synthetic:train_and_ship_synthetic", "world": world_cfg.to_dict(),
            "train": {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_dir"},
            "history": result.history, "scores_fp32": scores})
        log(f"wrote {path}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        paths.append(path)
    return paths
