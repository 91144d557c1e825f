"""Resumable training checkpoints: one atomic, checksummed safetensors file.

``trainer.safetensors`` holds the dictionary's tensors (``sae.*``, in training units),
Adam's moments (``adam.<param>.exp_avg`` / ``exp_avg_sq`` / ``step``) and the tokens since
each latent fired; its metadata holds both configs, the step and token counts, the
normalisation scales and the history. It is written with
:func:`mechscope.core.checkpoint.save_tensors` (temporary file, fsync, rename), so a crash
leaves the previous checkpoint intact. Loading refuses a checkpoint whose dictionary
config, or whose training settings other than the run length and logging, differ from
the run's, naming the differences.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mechscope.core.checkpoint import CheckpointError, config_differences, load_tensors, save_tensors

if TYPE_CHECKING:
    from mechscope.sae.train import Trainer

FORMAT = "mechscope.sae.trainer"
VERSION = 1
# fields that may change between a run and its resumption
_FREE = ("steps", "checkpoint_dir", "checkpoint_every", "log_every", "progress")


def _train_fields(cfg: Any) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in _FREE}


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
    }
    save_tensors(path, tensors, meta)


def load_checkpoint(trainer: "Trainer", path: str | Path) -> dict[str, Any]:
    """Restore a trainer built with the same configs from ``path``; returns the metadata."""
    path = Path(path)
    tensors, meta = load_tensors(path, fix="Delete the checkpoint directory to start the run over")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a mechscope SAE trainer checkpoint (format {FORMAT!r}); "
                              "point checkpoint_dir at an empty directory or at a previous run's")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: trainer checkpoint version {meta.get('version')}, this mechscope reads {VERSION}")
    _check_fields(path, meta)
    diffs = config_differences(meta["sae_config"], trainer.sae_cfg.to_dict())
    diffs += config_differences(_train_fields(_as_cfg(trainer, meta["train_config"])), _train_fields(trainer.cfg))
    if diffs:
        raise CheckpointError(f"{path}: the checkpoint was written by a run with different settings ("
                              + "; ".join(diffs) + "); resume with the same settings, or use another checkpoint_dir")
    try:  # tensors that do not fit the trainer: torch says so with a KeyError or RuntimeError
        _restore_tensors(trainer, tensors)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its tensors do not fit the trainer ({' '.join(str(e).split())[:200]}); "
                              "delete the checkpoint directory to start the run over") from None
    trainer.step_count, trainer.tokens = int(meta["step"]), int(meta["tokens"])
    trainer.in_scale, trainer.out_scale = meta["in_scale"], meta["out_scale"]
    trainer.rewarm_from = int(meta["rewarm_from"])
    trainer.history = list(meta["history"])
    return meta


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

