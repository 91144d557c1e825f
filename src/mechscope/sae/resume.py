"""Resumable training checkpoints: one atomic, checksummed safetensors file.

``trainer.safetensors`` holds the dictionary's tensors (``sae.*``, in training units),
Adam's moments (``adam.<param>.exp_avg`` / ``exp_avg_sq`` / ``step``) and the tokens since
each latent fired; its metadata holds both configs, the step and token counts, the
normalisation scales and the history. It is written with
:func:`mechscope.core.checkpoint.save_tensors` (temporary file, fsync, rename), so a crash
leaves the previous checkpoint intact. Loading refuses a checkpoint whose dictionary
config, or whose training settings other than the run length and logging, differ from
the run's, naming the differences.

The metadata also holds the run's **fingerprint** (:func:`fingerprint`): the caller's
record of the data source (site, store, world, corpus, data seed, model), the dictionary
config and every training setting that may not change on resume. A resume whose
fingerprint differs is refused, naming the first differing field. A checkpoint from
before fingerprints (no ``fingerprint`` field) resumes with a :class:`RunWarning` after
the config check, and records the fingerprint from then on.

``steps`` is checked on its own: a run asked for another number of steps than it was
planned for is refused unless ``extend`` (``--continue``), which replans the run for the
new total: every schedule (the learning-rate decay, the L1 warm-up) is recomputed
for it and training goes on from the checkpoint's step of the new schedule. The
continuation is recorded (``continued``: step, steps before, steps after).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from mechscope.core.checkpoint import CheckpointError, config_differences, load_tensors, save_tensors
from mechscope.core.fingerprint import (RunWarning, fingerprint_difference, mismatch, run_error, schedule_rule,
                                        steps_message)

if TYPE_CHECKING:
    from mechscope.sae.train import Trainer

FORMAT = "mechscope.sae.trainer"
VERSION = 1
# fields that may change between a run and its resumption
_FREE = ("steps", "checkpoint_dir", "checkpoint_every", "log_every", "progress")


def _train_fields(cfg: Any) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in _FREE}


def fingerprint(trainer: "Trainer", data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What determines the run's result: the data source first (``data``, the caller's record;
    a key that is also a config field is kept as ``data.KEY``), then both configs."""
    configs = {**trainer.sae_cfg.to_dict(), **_train_fields(trainer.cfg)}
    return {**{(f"data.{k}" if k in configs else k): v for k, v in (data or {}).items()}, **configs}


def save_checkpoint(trainer: "Trainer", path: str | Path) -> None:
    """Write the trainer's full state to ``path`` atomically."""
    tensors = {f"sae.{k}": v for k, v in trainer.sae.state_dict().items()}
    names = {p: n for n, p in trainer.sae.named_parameters()}
    for param, state in trainer.opt.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"adam.{names[param]}.{key}"] = value
    tensors["since_fired"] = trainer.since_fired
    meta = {
        "format": FORMAT, "version": VERSION,
        "sae_config": trainer.sae_cfg.to_dict(), "train_config": trainer.cfg.to_dict(),
        "step": trainer.step_count, "tokens": trainer.tokens,
        "in_scale": trainer.in_scale, "out_scale": trainer.out_scale,
        "rewarm_from": trainer.rewarm_from, "history": trainer.history,
        "fingerprint": trainer.fingerprint, "continued": trainer.continued,
    }
    save_tensors(path, tensors, meta)


def load_checkpoint(trainer: "Trainer", path: str | Path, *, extend: bool = False) -> dict[str, Any]:
    """Restore a trainer built with the same settings from ``path``; returns the metadata.

    ``trainer.fingerprint`` must equal the checkpoint's; ``extend`` allows another ``steps``
    (see the module docstring)."""
    path = Path(path)
    tensors, meta = load_tensors(path, fix="Delete the checkpoint directory to start the run over")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a mechscope SAE trainer checkpoint (format {FORMAT!r}); "
                              "point checkpoint_dir at an empty directory or at a previous run's")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: trainer checkpoint version {meta.get('version')}, this mechscope reads {VERSION}")
    _check_fields(path, meta)
    _check_fingerprint(trainer, path, meta)
    continued = _check_steps(trainer, path.parent, meta, extend)
    try:  # tensors that do not fit the trainer: torch says so with a KeyError or RuntimeError
        _restore_tensors(trainer, tensors)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its tensors do not fit the trainer ({' '.join(str(e).split())[:200]}); "
                              "delete the checkpoint directory to start the run over") from None
    trainer.step_count, trainer.tokens = int(meta["step"]), int(meta["tokens"])
    trainer.in_scale, trainer.out_scale = meta["in_scale"], meta["out_scale"]
    trainer.rewarm_from = int(meta["rewarm_from"])
    trainer.history = list(meta["history"])
    trainer.continued = [*meta.get("continued", []), *continued]
    return meta


def _check_fingerprint(trainer: "Trainer", path: Path, meta: dict[str, Any]) -> None:
    saved = meta.get("fingerprint")
    if isinstance(saved, dict):
        diff = fingerprint_difference(saved, trainer.fingerprint)
        if diff is not None:
            raise mismatch(path.parent, *diff, option="checkpoint_dir")
        return
    # a checkpoint from before fingerprints: its configs are all there is to check
    diffs = config_differences(meta["sae_config"], trainer.sae_cfg.to_dict())
    diffs += config_differences(_train_fields(_as_cfg(trainer, meta["train_config"])), _train_fields(trainer.cfg))
    if diffs:
        raise CheckpointError(f"{path}: the checkpoint was written by a run with different settings ("
                              + "; ".join(diffs) + "); resume with the same settings, or use another checkpoint_dir")
    warnings.warn(f"{path} records no fingerprint of its data source (an older mechscope wrote it): resuming "
                  "without checking that the site, store, world, corpus and data seed are the same; the "
                  "fingerprint is recorded from now on", RunWarning, stacklevel=4)


def _check_steps(trainer: "Trainer", run_dir: Path, meta: dict[str, Any], extend: bool) -> list[dict[str, int]]:
    """Refuse another ``steps`` without ``extend``; with it, the continuation's record (and a warning)."""
    step, asked = int(meta["step"]), trainer.cfg.steps
    planned = meta["train_config"].get("steps", step)
    if not isinstance(planned, int) or asked == planned:
        return []
    rule = schedule_rule(trainer.schedule(step, planned), trainer.schedule(step, asked), step, asked)
    if extend and asked > step:
        warnings.warn(f"continuing the run in {run_dir} from step {step} to {asked}: {rule}", RunWarning, stacklevel=4)
        return [{"step": step, "steps_before": planned, "steps": asked}]
    raise run_error("checkpoint_dir", run_dir, "steps", planned, asked,
                    steps_message(run_dir, step, planned, asked, extend, rule, "steps"))


_FIELDS = {"sae_config": dict, "train_config": dict, "step": int, "tokens": int, "rewarm_from": int, "history": list}


def _check_fields(path: Path, meta: dict[str, Any]) -> None:
    """The metadata fields a resume reads, each of its type (a file from another version may differ)."""
    wrong = [k for k, t in _FIELDS.items() if not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool)]
    wrong += [k for k in ("in_scale", "out_scale") if k not in meta or meta[k] is not None
              and (isinstance(meta[k], bool) or not isinstance(meta[k], (int, float)))]
    if wrong:
        raise CheckpointError(f"{path}: corrupted trainer checkpoint: field(s) {wrong} missing or of the wrong type; "
                              "delete the checkpoint directory to start the run over")


def _restore_tensors(trainer: "Trainer", tensors: dict[str, torch.Tensor]) -> None:
    sae_state = {k[4:]: v for k, v in tensors.items() if k.startswith("sae.")}
    trainer.sae.load_state_dict(sae_state)
    params = dict(trainer.sae.named_parameters())
    for key, value in tensors.items():
        if key.startswith("adam."):
            name, slot = key[5:].rsplit(".", 1)
            trainer.opt.state[params[name]][slot] = value.clone()
    trainer.since_fired.copy_(tensors["since_fired"])


def _as_cfg(trainer: "Trainer", data: dict[str, Any]) -> Any:
    return type(trainer.cfg).from_dict(data)

