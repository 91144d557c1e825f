"""The built-in SPD targets: their recipes, checkpoints, data and decomposition settings.

| name          | model                                      | decomposed sites              |
|---------------|--------------------------------------------|-------------------------------|
| ``tms_5_2``    | TMS 5 → 2, tied, p = 0.05                  | encoder, decoder (tied)       |
| ``tms_40_10``  | TMS 40 → 10, tied, p = 0.05                | encoder, decoder (tied)       |
| ``tms_5_2_id`` | TMS 5 → 2 with a frozen hidden identity    | encoder, identity, decoder    |
| ``resid_mlp``  | residual MLP, 100 features, 50 neurons     | mlp_in, mlp_out               |

Targets are trained by the recipes of ``spd.md`` (``mechscope train spd_tms_5_2`` ...) and
shipped as ``zoo/checkpoints/spd_<name>.safetensors``. A TMS recipe trains several seeds
as instances and keeps one that represents every feature (‖W_i‖ > 0.5): the reference
recipe learns all 5 features for only some seeds, so a target that drops one would make
the decomposition's "one subcomponent per feature" check meaningless. When no seed of a
round represents every feature the recipe says so and trains the next round of seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mechscope.core.checkpoint import MissingCheckpointError, load_module_state, load_tensors, save_module
from mechscope.spd.config import SPDConfig
from mechscope.tasks import resid_mlp as rm
from mechscope.tasks import tms

CHECKPOINTS = Path(__file__).resolve().parent.parent / "zoo" / "checkpoints"
TMS_P = 0.05


@dataclass(frozen=True)
class Target:
    """One built-in target: how to train it, where it ships, its data and SPD settings."""

    name: str
    description: str
    spd: SPDConfig
    n_features: int
    identity_site: str | None = None  # the +ID layer, whose CI should be dense

    @property
    def checkpoint(self) -> Path:
        return CHECKPOINTS / f"spd_{self.name}.safetensors"

    @property
    def decomposition_checkpoint(self) -> Path:
        return CHECKPOINTS / f"spd_{self.name}_decomposition.safetensors"


_TMS_SITES = dict(sites=("encoder", "decoder"), tied=("decoder=encoder",))
TARGETS: dict[str, Target] = {
    "tms_5_2": Target("tms_5_2", "TMS 5-2 (tied, p=0.05)", SPDConfig(
        **_TMS_SITES, C=20, importance_coeff=3e-3, p=1.0, batch_size=4096, steps=10_000, lr=1e-3,
        lr_schedule="cosine"), 5),
    "tms_40_10": Target("tms_40_10", "TMS 40-10 (tied, p=0.05)", SPDConfig(
        **_TMS_SITES, C=200, importance_coeff=1e-4, p=2.0, batch_size=4096, steps=10_000, lr=1e-3,
        lr_schedule="cosine"), 40),
    "tms_5_2_id": Target("tms_5_2_id", "TMS 5-2 with a frozen identity in the hidden space", SPDConfig(
        sites=("encoder", "identity", "decoder"), tied=("decoder=encoder",), C=20, importance_coeff=3e-3, p=1.0,
        batch_size=4096, steps=10_000, lr=1e-3, lr_schedule="cosine"), 5, identity_site="identity"),
    "resid_mlp": Target("resid_mlp", "residual MLP: 100 features, 50 ReLU neurons", SPDConfig(
        sites=("mlp_in", "mlp_out"), C=100, importance_coeff=1e-5, p=2.0, batch_size=2048, steps=20_000,
        lr=2e-3, lr_schedule="constant"), 100),
}


def target(name: str) -> Target:
    if name not in TARGETS:
        raise KeyError(f"unknown SPD target {name!r}; valid: {', '.join(TARGETS)}")
    return TARGETS[name]


# ------------------------------------------------------------------------------ data


def data_fn(name: str) -> Callable[[int, torch.Generator], torch.Tensor]:
    """``data(batch_size, generator)`` for a target: its training input distribution."""
    t = target(name)
    if name == "resid_mlp":
        return rm.sampler(rm.ResidMLPConfig())
    n = t.n_features
    return lambda b, g: rm.sparse_features(b, n, TMS_P, 0.0, 1.0, at_least_one=True, generator=g)


# ------------------------------------------------------------------------------ recipes


def _tms_shape(name: str) -> tuple[str, bool]:
    return {"tms_5_2": ("5-2", False), "tms_40_10": ("40-10", False), "tms_5_2_id": ("5-2", True)}[name]


def train_tms_target(name: str, seed: int = 0, rounds: int = 3, n_instances: int = 8, steps: int | None = None,
                     log: Callable[[str], None] = print) -> tuple[tms.TMSInstance, dict[str, Any]]:
    """Train seeds as instances until one represents every feature; return it and its record."""
    shape, identity = _tms_shape(name)
    for r in range(rounds):
        changes = {"seed": seed + r} | ({"steps": steps} if steps is not None else {})
        cfg = tms.spd_config(shape, identity=identity, n_instances=n_instances, **changes)
        model, history = tms.train_tms(cfg)
        norms = tms.feature_norms(model.W)  # [inst, n]
        counts = (norms > 0.5).sum(-1).tolist()
        try:
            i = tms.best_instance(model)
        except RuntimeError:
            log(f"{name}: round {r} (seed {seed + r}): no instance represents all {cfg.n_features} features "
                f"(represented per instance: {counts}); training the next round of seeds")
            continue
        log(f"{name}: round {r} (seed {seed + r}): {sum(c == cfg.n_features for c in counts)}/{n_instances} instances "
            f"represent all {cfg.n_features} features; keeping instance {i} (shortest ‖W_i‖ "
            f"{float(norms[i].min()):.3f})")
        record = {"target": name, "recipe": cfg.to_dict(), "instance": i, "feature_norms": norms[i].tolist(),
                  "represented_per_instance": counts, "seconds": history["seconds"]}
        return model.instance(i), record
    raise RuntimeError(f"{name}: no seed in {rounds} rounds of {n_instances} represented every feature; "
                       "train more rounds (rounds=) or more instances")


def _tms_config(m: tms.TMSInstance) -> dict[str, Any]:
    return {"n_features": m.n_features, "n_hidden": m.n_hidden, "hidden_identity": m.identity is not None,
            "tied": m.tied}


def train_target(name: str, out: str | Path | None = None, quick: bool = False,
                 log: Callable[[str], None] = print) -> Path:
    """Train a target by its recipe and save it (default: the shipped checkpoint's path)."""
    path = Path(out) if out is not None else target(name).checkpoint
    if name == "resid_mlp":
        cfg = rm.ResidMLPConfig(steps=100) if quick else rm.ResidMLPConfig()
        model, history = rm.train_resid_mlp(cfg, log=log)
        metrics = rm.evaluate(model, cfg)
        log(f"resid_mlp: loss {metrics['loss']:.3e} (without the MLP: {metrics['no_mlp_loss']:.3e})")
        save_module(path, model, {"target": name, "recipe": cfg.to_dict(), **metrics})
    else:
        model, record = train_tms_target(name, steps=300 if quick else None, log=log)
        save_module(path, model, {**_tms_config(model), **record})
    log(f"saved {path}")
    return path


def load_target(name: str, path: str | Path | None = None) -> nn.Module:
    """The shipped (or given) target checkpoint, in eval mode."""
    path = Path(path) if path is not None else target(name).checkpoint
    try:
        _, meta = load_tensors(path)
    except MissingCheckpointError:
        raise MissingCheckpointError(f"{path}: no checkpoint of SPD target {name!r}. Train it with "
                                     f"`mechscope train spd_{name}`") from None
    cfg = meta["config"]
    if name == "resid_mlp":
        model: nn.Module = rm.ResidMLP(rm.ResidMLPConfig.from_dict(cfg["recipe"]))
    else:
        model = tms.TMSInstance(cfg["n_features"], cfg["n_hidden"], cfg["hidden_identity"], cfg["tied"])
    load_module_state(path, model)
    return model.eval()


def target_record(name: str, path: str | Path | None = None) -> dict[str, Any]:
    """The metadata a target was saved with (recipe, chosen instance, feature norms)."""
    _, meta = load_tensors(Path(path) if path is not None else target(name).checkpoint)
    return meta["config"]


def decompose_target(name: str, out_dir: str | Path, steps: int | None = None, seed: int = 0,
                     ship: bool = False, progress: bool = True, **changes: Any) -> Any:
    """Decompose a built-in target at its published settings (``steps`` overrides the count).

    Writes the run (resumable) to ``out_dir``; with ``ship`` also copies the final
    decomposition to the zoo (``spd_<name>_decomposition.safetensors``).
    """
    from mechscope.spd.checkpoint import save_decomposition
    from mechscope.spd.train import train_spd

    t = target(name)
    cfg = t.spd.replace(seed=seed, **({"steps": steps} if steps is not None else {}), **changes)
    model = load_target(name)
    run = train_spd(model, data_fn(name), cfg, out_dir=out_dir, progress=progress)
    if ship:
        save_decomposition(t.decomposition_checkpoint, run.decomposition,
                           {"target": name, "steps_per_second": run.steps_per_second, "seconds": run.seconds})
    return run
