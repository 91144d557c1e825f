"""Experiment logging for long runs (SAE, SPD, DAS): metrics per step to a file, TensorBoard or
Weights & Biases, chosen by the user and imported only then.

``open_tracker(kind, run_dir, config=..., name=...)`` returns a :class:`Tracker` with
``log(metrics, step)`` and ``close()`` (also a context manager):

- ``"none"``: does nothing (the default everywhere);
- ``"jsonl"``: one JSON object per logged step appended to ``run_dir/metrics.jsonl``, after
  a first line holding the config; no dependency, nothing leaves the machine;
- ``"tensorboard"``: ``torch.utils.tensorboard.SummaryWriter(run_dir)`` (needs the
  ``tensorboard`` package);
- ``"wandb"``: ``wandb.init(project=..., dir=run_dir, config=..., name=...)``; it talks to
  the wandb service unless ``WANDB_MODE=offline`` is set. mechscope never starts it by itself.

Only finite numbers are logged; a metric that is not a number is skipped (with its name
listed once), so a history entry can be passed as it is. Only process 0 of a torchrun job
should log: pass ``enabled=False`` on the others.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path
from typing import Any, Literal, Mapping

TrackerKind = Literal["none", "jsonl", "tensorboard", "wandb"]
KINDS = ("none", "jsonl", "tensorboard", "wandb")


class TrackingError(ValueError):
    """A tracker that cannot be opened: an unknown kind, or its library is not installed."""


class Tracker:
    """Logs nothing; the base of the others."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of ``metrics`` as floats (bools, NaN, inf and the rest left out)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            continue
        item = getattr(v, "item", None)
        if callable(item) and getattr(v, "ndim", 0) == 0:
            v = item()
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[str(k)] = float(v)
    return out


class JsonlTracker(Tracker):
    """Appends ``{"step": N, ...metrics}`` lines to ``run_dir/metrics.jsonl``."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps({"config": dict(config)}, default=str) + "\n")
        self._file.flush()

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self._file.write(json.dumps({"step": int(step), **numbers(metrics)}) + "\n")
        self._file.flush()  # a killed run keeps every step it logged

    def close(self) -> None:
        self._file.close()


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        writer = _import("torch.utils.tensorboard", "tensorboard", "pip install tensorboard").SummaryWriter
        self._writer = writer(log_dir=str(run_dir))
        self._writer.add_text("config", json.dumps(dict(config), default=str, indent=1))

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for k, v in numbers(metrics).items():
            self._writer.add_scalar(k, v, int(step))

    def close(self) -> None:
        self._writer.close()


class WandbTracker(Tracker):
    def __init__(self, run_dir: Path, config: Mapping[str, Any], project: str, name: str | None) -> None:
        wandb = _import("wandb", "wandb", "pip install wandb")
        run_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=project, dir=str(run_dir), config=dict(config), name=name)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self._run.log(numbers(metrics), step=int(step))

    def close(self) -> None:
        self._run.finish()


def _import(module: str, package: str, how: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TrackingError(f"--log-to needs the {package} package, which is not installed ({e}); {how}, "
                            f"or log to jsonl") from None


def open_tracker(kind: str, run_dir: str | os.PathLike, *, config: Mapping[str, Any] | None = None,
                 project: str = "mechscope", name: str | None = None, enabled: bool = True) -> Tracker:
    """A tracker of ``kind`` (see the module docstring) writing under ``run_dir``."""
    if kind not in KINDS:
        raise TrackingError(f"unknown tracker {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "none" or not enabled:
        return Tracker()
    run_dir, config = Path(run_dir), dict(config or {})
    if kind == "jsonl":
        return JsonlTracker(run_dir, config)
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir, config)
    return WandbTracker(run_dir, config, project, name)
