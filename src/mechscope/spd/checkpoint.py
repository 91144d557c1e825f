"""Files of a decomposition: the decomposition itself and the resumable training state.

Both are written atomically with checksums by :mod:`mechscope.core.checkpoint`. Each
records the SHA-256 fingerprint of the target it was trained on; loading one onto another
target is an error that says so (a decomposition only means something for its target).

- ``save_decomposition`` / ``load_decomposition``: subcomponents and importance
  functions, with the config and the layer shapes in the metadata.
- ``save_training_state`` / ``load_training_state``: the same plus the optimiser's
  moments, the random generators' states, the step and the history, so that a killed
  run resumes where it stopped. It also holds the run's fingerprint (:func:`fingerprint`:
  what the target and its data were, and the config), which :func:`check_resume` compares
  before a resume, and the record of every ``--continue`` (``continued``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mechscope.core.checkpoint import CheckpointError, checkpoint_error, load_tensors, read_header, save_tensors
from mechscope.core.fingerprint import (RunWarning, fingerprint_difference, mismatch, run_error, schedule_rule,
                                        steps_message)
from mechscope.spd.components import SPDError
from mechscope.spd.config import SPDConfig
from mechscope.spd.decomposition import Decomposition, target_fingerprint
from mechscope.spd.losses import annealed_p, lr_factor

DECOMPOSITION = "spd_decomposition"
TRAINING_STATE = "spd_training_state"
_COMMON = {"config": dict, "target_fingerprint": str}
_FIELDS = {DECOMPOSITION: {**_COMMON, "extra": dict},
           TRAINING_STATE: {**_COMMON, "step": int, "history": list, "param_groups": list, "opt_scalars": dict}}


def _check_target(path: Path, meta: dict[str, Any], model: nn.Module) -> None:
    found = target_fingerprint(model)
    saved = meta.get("target_fingerprint")
    if saved != found:
        raise checkpoint_error(
            path, f"is a decomposition of another target (its target fingerprint is {str(saved)[:12]}..., this "
            f"model's is {found[:12]}...)", "Load it onto the model it was trained on, or decompose this model "
            "with `mechscope spd train`")


def save_decomposition(path: str | Path, dec: Decomposition, extra: dict[str, Any] | None = None) -> None:
    """Write the decomposition (subcomponents, importance functions, config) atomically."""
    save_tensors(path, dec.state_dict(), {"kind": DECOMPOSITION, **dec.describe(), "extra": extra or {}})


def _read(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    tensors, meta = load_tensors(path)
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        found = meta.get("kind") if isinstance(meta, dict) else None
        raise checkpoint_error(path, f"is not an SPD {kind.removeprefix('spd_').replace('_', ' ')} (it holds "
                               f"{found or 'plain tensors'})", "Give the file that `mechscope spd train` wrote")
    fields = _FIELDS[kind]
    wrong = [k for k, t in fields.items() if not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool)]
    if wrong:
        raise checkpoint_error(path, f"corrupted metadata: field(s) {wrong} missing or of the wrong type (expected "
                               + ", ".join(f"{k}: {t.__name__}" for k, t in fields.items()) + ")")
    return tensors, meta


def load_decomposition(path: str | Path, model: nn.Module, example_inputs: Any = None) -> Decomposition:
    """Rebuild a decomposition of ``model`` from ``path``; refuses one made for another target."""
    tensors, meta = _read(path, DECOMPOSITION)
    _check_target(Path(path), meta, model)
    dec = Decomposition(model, _config(Path(path), meta, tensors), example_inputs)
    _load_state(Path(path), dec, tensors)
    return dec


def _config(path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> SPDConfig:
    """The recorded config; its sizes (C, the importance MLPs' widths) must be no larger than the
    file's tensors, checked before the decomposition is built: a damaged size must not allocate."""
    cfg = SPDConfig.from_dict(meta["config"])
    largest = max((d for t in tensors.values() for d in t.shape), default=0)
    sizes = [cfg.C, *cfg.C_per_site.values(), *cfg.ci_hidden]
    if max(sizes) > largest:
        raise checkpoint_error(path, f"corrupted metadata: its config asks for sizes up to {max(sizes)}, but no "
                               f"tensor in the file is larger than {largest}")
    return cfg


def read_extra(path: str | Path) -> dict[str, Any]:
    """The ``extra`` metadata saved with a decomposition (evaluation results, recipe)."""
    return _read(path, DECOMPOSITION)[1].get("extra", {})


def _load_state(path: Path, dec: Decomposition, tensors: dict[str, torch.Tensor]) -> None:
    try:
        dec.load_state_dict(tensors, strict=True)
    except RuntimeError as e:  # torch lists every mismatch over several lines: one line, shortened
        text = " ".join(str(e).split())
        raise checkpoint_error(path, f"does not fit the decomposition its config describes "
                               f"({text[:300]}{'...' if len(text) > 300 else ''})", "Retrain the decomposition") from None


def save_training_state(path: str | Path, dec: Decomposition, opt: torch.optim.Optimizer, step: int,
                        generators: dict[str, torch.Generator], history: list[dict[str, Any]],
                        fingerprint: dict[str, Any] | None = None,
                        continued: list[dict[str, int]] | None = None) -> None:
    """Everything needed to resume training after ``step`` completed steps."""
    tensors = {f"dec.{k}": v for k, v in dec.state_dict().items()}
    state = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    for name, gen in generators.items():
        tensors[f"gen.{name}"] = gen.get_state()
    meta = {"kind": TRAINING_STATE, **dec.describe(), "step": step, "history": history,
            "param_groups": state["param_groups"], "opt_scalars": scalars,
            "fingerprint": fingerprint or fingerprint_of(dec.cfg), "continued": continued or []}
    save_tensors(path, tensors, meta)


def load_training_state(path: str | Path, dec: Decomposition, opt: torch.optim.Optimizer,
                        generators: dict[str, torch.Generator]) -> tuple[int, list[dict[str, Any]]]:
    """Restore ``dec``, ``opt`` and ``generators`` from ``path``; returns (step, history)."""
    path = Path(path)
    tensors, meta = _read(path, TRAINING_STATE)
    _check_target(path, meta, dec.model)
    saved = _config(path, meta, tensors)
    ignore = {"steps", "log_every", "checkpoint_every"}
    diffs = [k for k in SPDConfig.field_names() if k not in ignore and getattr(saved, k) != getattr(dec.cfg, k)]
    if diffs:
        raise checkpoint_error(path, f"was written by a run with a different config ({', '.join(diffs)} differ)",
                               "Resume with the same settings, or start afresh in another directory")
    _load_state(path, dec, {k[4:]: v for k, v in tensors.items() if k.startswith("dec.")})
    try:  # torch's own checks of an optimiser state raise KeyError, TypeError or ValueError
        _restore_optimiser(tensors, meta, opt)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        raise checkpoint_error(path, f"corrupted metadata: the optimiser state cannot be restored "
                               f"({' '.join(str(e).split())[:200]})",
                               "Start afresh in another directory") from None
    for name, gen in generators.items():
        if f"gen.{name}" not in tensors:
            raise CheckpointError(f"{path}: no state for random generator {name!r}; start afresh")
        gen.set_state(tensors[f"gen.{name}"])
    return int(meta["step"]), list(meta.get("history", []))


# config fields that may change between a run and its resumption (steps: only with --continue)
_FREE = ("steps", "log_every", "checkpoint_every")


def fingerprint_of(cfg: SPDConfig, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What determines a run's result: the caller's record of the target and its data first
    (``--target``, ``--hf-config``), then the config (seed included) but for :data:`_FREE`."""
    configs = {k: v for k, v in cfg.to_dict().items() if k not in _FREE}
    if configs.get("dtype") == "float32":  # the precision before the option existed: older runs still resume
        del configs["dtype"]
    return {**{(f"data.{k}" if k in configs else k): v for k, v in (data or {}).items()}, **configs}


def schedule(cfg: SPDConfig, step: int, steps: int) -> dict[str, float]:
    """The learning rate and the importance-minimality exponent p at ``step`` of ``steps``."""
    return {"lr": cfg.lr * lr_factor(step, steps, cfg.lr_schedule, cfg.lr_warmup),
            "p": annealed_p(step / max(steps, 1), cfg.p, cfg.p_final, cfg.p_anneal_start, cfg.p_anneal_end)}


def check_resume(path: str | Path, cfg: SPDConfig, fingerprint: Mapping[str, Any], extend: bool = False,
                 option: str = "out_dir") -> list[dict[str, int]]:
    """Check the training state at ``path`` before a resume: the same fingerprint (else a
    FingerprintError naming the first differing field), and the same ``steps`` unless
    ``extend``, which replans the run for ``cfg.steps`` (the learning-rate schedule and the
    annealing of p recomputed for the new total). Returns the record of continuations."""
    path = Path(path)
    meta = (read_header(path)[1] or {}).get("metadata")
    if not isinstance(meta, dict) or meta.get("kind") != TRAINING_STATE:
        return []  # not a training state: load_training_state says what is wrong with the file
    saved, step, planned = meta.get("fingerprint"), meta.get("step"), (meta.get("config") or {}).get("steps")
    if isinstance(saved, dict):
        diff = fingerprint_difference(saved, fingerprint)
        if diff is not None:
            raise mismatch(path.parent, *diff, option=option)
    else:  # a state from before fingerprints: load_training_state still compares the configs
        warnings.warn(f"{path} records no fingerprint of its target (an older mechscope wrote it): resuming "
                      "without checking --target / --hf-config; the fingerprint is recorded from now on",
                      RunWarning, stacklevel=3)
    continued = [c for c in meta.get("continued", []) if isinstance(c, dict)]
    if not isinstance(step, int) or not isinstance(planned, int) or planned == cfg.steps:
        return continued
    rule = schedule_rule(schedule(cfg, step, planned), schedule(cfg, step, cfg.steps), step, cfg.steps)
    if extend and cfg.steps > step:
        warnings.warn(f"continuing the run in {path.parent} from step {step} to {cfg.steps}: {rule}", RunWarning,
                      stacklevel=3)
        return [*continued, {"step": step, "steps_before": planned, "steps": cfg.steps}]
    raise run_error(option, path.parent, "steps", planned, cfg.steps,
                    steps_message(path.parent, step, planned, cfg.steps, extend, rule, "steps"))


def _restore_optimiser(tensors: dict[str, torch.Tensor], meta: dict[str, Any], opt: torch.optim.Optimizer) -> None:
    slots: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            slots.setdefault(int(idx), {})[name] = value
    for idx, values in meta.get("opt_scalars", {}).items():
        slots.setdefault(int(idx), {}).update(values)
    opt.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})


def decomposition_from_state(path: str | Path, model: nn.Module) -> tuple[Decomposition, int]:
    """The decomposition held by a training state (e.g. of a run still in progress) and its step."""
    tensors, meta = _read(path, TRAINING_STATE)
    _check_target(Path(path), meta, model)
    dec = Decomposition(model, _config(Path(path), meta, tensors))
    _load_state(Path(path), dec, {k[4:]: v for k, v in tensors.items() if k.startswith("dec.")})
    return dec, int(meta["step"])


__all__ = ["check_resume", "decomposition_from_state", "fingerprint_of", "SPDError", "save_decomposition", "load_decomposition", "read_extra", "save_training_state",
           "load_training_state"]
