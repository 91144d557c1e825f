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
from mechscope.spd.checkpoint import decomposition_from_state, save_decomposition
from mechscope.spd.config import SPDConfig
from mechscope.spd.train import STATE_FILE, train_spd
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


def train_tms_target(name: str, seed: int = 0, rounds: int = 3, n_instances: int | None = None,
                     steps: int | None = None, log: Callable[[str], None] = print) -> tuple[tms.TMSInstance, dict[str, Any]]:
    """Train seeds as instances until one represents every feature; return it and its record.

    Instances per round: 8 for 5-2 (cheap), 3 for 40-10 (a 40-10 step over 8 instances of
    8192 examples costs ~0.17 s of CPU; 3 keep the recipe near 10 CPU-minutes).
    """
    shape, identity = _tms_shape(name)
    n_instances = n_instances or (3 if shape == "40-10" else 8)
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


def ship_partial(name: str, run_dir: str | Path) -> Path:
    """Ship the decomposition of a run still in progress (its last checkpoint), recording how
    many of the published steps it has had, so that the bench says the setting was reduced."""
    t = target(name)
    dec, step = decomposition_from_state(Path(run_dir) / STATE_FILE, load_target(name))
    save_decomposition(t.decomposition_checkpoint, dec, {"target": name, "steps": step, "published_steps": t.spd.steps,
                                                         "partial": True})
    return t.decomposition_checkpoint


# ------------------------------------------------------------------------------ `mechscope train` entries


def _ship_target(name: str) -> Callable[[Path, Callable[[str], None]], list[Path]]:
    def train_and_ship(out_dir: Path, log: Callable[[str], None]) -> list[Path]:
        return [train_target(name, Path(out_dir) / f"spd_{name}.safetensors", log=log)]

    train_and_ship.__name__ = f"train_and_ship_{name}"
    return train_and_ship


def _ship_decomposition(name: str) -> Callable[[Path, Callable[[str], None]], list[Path]]:
    def decompose_and_ship(out_dir: Path, log: Callable[[str], None]) -> list[Path]:
        """Decompose the target in ``out_dir`` (else the shipped one) at the published settings."""
        t = target(name)
        own = Path(out_dir) / t.checkpoint.name
        model = load_target(name, own if own.exists() else None)
        run = train_spd(model, data_fn(name), t.spd, out_dir=Path(out_dir) / f"spd_{name}_run", log=log,
                        progress=False)
        path = Path(out_dir) / t.decomposition_checkpoint.name
        save_decomposition(path, run.decomposition, {"target": name, "steps": t.spd.steps,
                                                     "published_steps": t.spd.steps,
                                                     "steps_per_second": run.steps_per_second, "seconds": run.seconds})
        log(f"{name}: decomposed in {run.seconds:.0f}s ({run.steps_per_second:.1f} steps/s)")
        return [path]

    decompose_and_ship.__name__ = f"decompose_and_ship_{name}"
    return decompose_and_ship


train_and_ship_tms_5_2 = _ship_target("tms_5_2")
train_and_ship_tms_40_10 = _ship_target("tms_40_10")
train_and_ship_tms_5_2_id = _ship_target("tms_5_2_id")
train_and_ship_resid_mlp = _ship_target("resid_mlp")
decompose_and_ship_tms_5_2 = _ship_decomposition("tms_5_2")
decompose_and_ship_tms_40_10 = _ship_decomposition("tms_40_10")
decompose_and_ship_tms_5_2_id = _ship_decomposition("tms_5_2_id")
decompose_and_ship_resid_mlp = _ship_decomposition("resid_mlp")
