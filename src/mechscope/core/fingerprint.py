"""Run fingerprints: what decided a resumable run's result, compared field by field when the
run is resumed, and the refusals that name the first field that differs.

A resumable run (an SAE training with a checkpoint directory, an SPD run) records a
fingerprint: its config, its data source and its model. Resumed with another one, it is
refused (:class:`FingerprintError`, a :class:`~mechscope.core.checkpoint.CheckpointError`)
with a one-line message naming the field and both values; a caller words the message
again with its own names for the fields (:meth:`FingerprintError.compose`, e.g. as CLI
options through :func:`cli_label`). Asking a run for other steps is refused too, unless it
is extended on purpose (``continue``), whose rule :func:`schedule_rule` states.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from mechscope.core.checkpoint import CheckpointError, PathLike


class RunWarning(UserWarning):
    """A resume that goes on with less checking than usual, or a run extended by ``continue``."""


class FingerprintError(CheckpointError):
    """A run directory holds a run with other settings. ``field``, ``saved`` and ``found`` say
    which and how; ``compose(option, label)`` words the message again for a caller that names
    the directory (``option``) and the fields (``label``) its own way, e.g. as CLI options."""

    field: str = ""
    saved: Any = None
    found: Any = None

    def compose(self, option: str, label: Callable[[str], str]) -> str:
        return self._compose(option, label)


def run_error(option: str, path: PathLike, field: str, saved: Any, found: Any,
              compose: Callable[[str, Callable[[str], str]], str]) -> FingerprintError:
    """A :class:`FingerprintError` for the run in ``path``; ``compose(option, label)`` is its message."""
    err = FingerprintError(compose(option, lambda f: {"continue": "extend=True"}.get(f, f)))
    err.path, err.problem = Path(path), "trained with other settings"
    err.field, err.saved, err.found, err._compose = field, saved, found, compose
    return err


def mismatch(path: PathLike, field: str, saved: Any, found: Any, option: str) -> FingerprintError:
    """``OPTION PATH was trained with FIELD SAVED, not FOUND; use another OPTION or the same settings``."""
    def compose(opt: str, label: Callable[[str], str]) -> str:
        return (f"{opt} {path} was trained with {label(field)} {show_value(saved)}, not {show_value(found)}; "
                f"use another {opt} or the same settings")
    return run_error(option, path, field, saved, found, compose)


def cli_label(field: str) -> str:
    """A fingerprint field as the command-line option that sets it: ``data_seed`` -> ``--data-seed``,
    ``model.model_sha256`` -> ``--model (model_sha256)``."""
    head, _, rest = field.partition(".")
    return f"--{head.replace('_', '-')}" + (f" ({rest})" if rest else "")


def _flat(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def fingerprint_difference(saved: Mapping[str, Any], found: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """The first field whose value differs, as ``(field, saved, found)``, or None.

    Nested records are compared field by field (``model.model_sha256``), in ``found``'s
    order, so that the caller decides which difference is named first. A field that is
    absent on one side is ``None`` there. Values are compared as JSON gives them back
    (tuples as lists), since the saved side went through JSON.
    """
    a, b = _flat(saved), _flat(json.loads(json.dumps(dict(found), default=str)))
    for key in [*b, *(k for k in a if k not in b)]:
        if a.get(key) != b.get(key):
            return key, a.get(key), b.get(key)
    return None


def show_value(value: Any, limit: int = 80) -> str:
    """A fingerprint value as one short piece of text (a long record is cut)."""
    if value is None:
        return "(none)"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def schedule_rule(before: Mapping[str, float], after: Mapping[str, float], step: int, steps: int) -> str:
    """What ``--continue`` does to the schedules: the rule, and the scheduled values at ``step``
    under the old plan and the new one (a decay that had reached 0 jumps back up)."""
    moves = ", ".join(f"{k} {before[k]:.3g} -> {after[k]:.3g}" for k in after)
    return (f"recomputes every schedule for {steps} steps and goes on from step {step} of it (at step {step}, "
            f"old plan -> new: {moves})")


def steps_message(run_dir: Path, step: int, planned: int, asked: int, extend: bool, rule: str,
                  steps_field: str) -> Callable[[str, Callable[[str], str]], str]:
    """The refusal of a run asked for ``asked`` steps, worded for ``compose(option, label)``."""
    def compose(option: str, label: Callable[[str], str]) -> str:
        where, flag, steps = f"{option} {run_dir}", label("continue"), label(steps_field)
        if extend:
            return f"{where} holds a run at step {step} already; to continue it give {steps} above {step}"
        if step >= planned:
            return (f"{where} holds a run that finished at step {step}; to train on to {asked} pass {flag}, which "
                    f"{rule}; or give {steps} {planned}")
        return (f"{where} holds a run planned for {planned} steps (at step {step}); resume it with {steps} {planned}, "
                f"or pass {flag} to replan it for {asked}, which {rule}")
    return compose
