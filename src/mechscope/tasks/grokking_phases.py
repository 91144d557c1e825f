"""The three phases of grokking, found in a recorded training history. Pure functions.

Nanda et al. (ICLR 2023, arXiv 2301.05217, section 5.1) split training into three phases,
read from the progress measures:

- **memorisation**: train loss falls, and the excluded loss (the logits with the final key
  frequencies removed, on the training pairs) falls with it: the model fits the training
  pairs without the Fourier circuit, and the test loss stays high;
- **circuit formation**: the excluded loss rises while the train loss stays flat: the
  Fourier circuit takes over the training pairs before it shows on the test pairs;
- **cleanup**: the test loss drops sharply (the memorising components are removed).

The detector reads the arrays a history records (steps; train, test and excluded loss in
nats) and the chance level ``ln p`` (the loss of a uniform guess). The rules, written before
the detector first ran on a real history; "two decades below chance" is ``ln p / 100``:

1. End of memorisation ``m``: the step of lowest excluded loss before the test loss first
   falls below chance (the turn of the excluded loss from falling to rising). Memorisation
   is found when at ``m`` the train and excluded losses are both two decades below chance
   (the training pairs are fitted, without the key frequencies) and the test loss is still
   at or above chance (the held-out pairs are not).
2. End of circuit formation ``c``: the first step after ``m`` at which the test loss falls
   below chance. Circuit formation is found when the excluded loss at ``c`` is at least ten
   times its value at ``m`` (it rose by a decade or more) while the train loss stayed within
   one decade of its value at ``m`` at every snapshot between them (flat, next to the
   two-decade fall that memorisation needs).
3. End of cleanup ``e``: the first step after ``c`` at which the test loss is two decades
   below chance. Cleanup is found when the test loss gets there sharply: in fewer steps than
   circuit formation took (``e - c < c - m``).

A phase counts only when the ones before it were found: :func:`detect` reports how many were
found in order (0 to 3) and their boundaries.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

PHASES = ("memorisation", "circuit_formation", "cleanup")
DECADES_BELOW_CHANCE = 100.0  # "two decades below chance": ln p / 100
EXCLUDED_RISE = 10.0  # circuit formation: the excluded loss rises at least tenfold
TRAIN_FLAT_DECADES = 1.0  # ... while the train loss stays within one decade


def _first(indices: range, cond: Any) -> int | None:
    return next((i for i in indices if cond(i)), None)


def _check(step: Sequence[float], *series: Sequence[float]) -> int:
    n = len(step)
    if n < 2 or any(len(s) != n for s in series):
        raise ValueError(f"a history needs at least 2 snapshots and equal-length arrays, got lengths "
                         f"{[n] + [len(s) for s in series]}")
    if any(not math.isfinite(v) or v <= 0 for s in series for v in s):
        raise ValueError("losses must be finite and positive (nats)")
    if any(b <= a for a, b in zip(step, step[1:])):
        raise ValueError("steps must increase")
    return n


def detect(step: Sequence[float], train_loss: Sequence[float], test_loss: Sequence[float],
           excluded_loss: Sequence[float], p: int) -> dict[str, Any]:
    """The phases of a training history, by the rules of the module docstring.

    Returns ``found`` (phases found in order, 0 to 3), ``boundaries`` (the steps ``m``, ``c``,
    ``e`` named ``memorisation_end``, ``circuit_formation_end``, ``cleanup_end``; None where a
    boundary does not exist), ``phases`` (each found phase's ``[start, end]`` step) and
    ``why``, one line per phase that was not found.
    """
    n = _check(step, train_loss, test_loss, excluded_loss)
    chance = math.log(p)
    low = chance / DECADES_BELOW_CHANCE
    below_chance = _first(range(n), lambda i: test_loss[i] < chance)
    before = range(below_chance if below_chance is not None else n)
    m = min(before, key=lambda i: excluded_loss[i]) if len(before) else None
    c = None if m is None else _first(range(m + 1, n), lambda i: test_loss[i] < chance)
    e = None if c is None else _first(range(c + 1, n), lambda i: test_loss[i] <= low)
    at = lambda i: None if i is None else step[i]  # noqa: E731
    out: dict[str, Any] = {"found": 0, "phases": {}, "why": [], "chance": chance,
                           "boundaries": {"memorisation_end": at(m), "circuit_formation_end": at(c),
                                          "cleanup_end": at(e)}}

    if m is None or m == 0:
        out["why"].append("memorisation: the test loss is below chance from the start" if m is None else
                          "memorisation: the excluded loss never falls below its first value (the training "
                          "pairs are never fitted without the key frequencies)")
        return out
    if not (train_loss[m] <= low and excluded_loss[m] <= low and test_loss[m] >= chance):
        out["why"].append(f"memorisation: at step {step[m]} train {train_loss[m]:.3g}, excluded "
                          f"{excluded_loss[m]:.3g} (both must be <= {low:.3g}), test {test_loss[m]:.3g} "
                          f"(must be >= {chance:.3g})")
        return out
    out["found"], out["phases"]["memorisation"] = 1, [step[0], step[m]]

    if c is None:
        out["why"].append("circuit formation: the test loss never falls below chance after memorisation")
        return out
    drift = max(abs(math.log10(train_loss[i] / train_loss[m])) for i in range(m, c + 1))
    rise = excluded_loss[c] / excluded_loss[m]
    if rise < EXCLUDED_RISE or drift > TRAIN_FLAT_DECADES:
        out["why"].append(f"circuit formation: excluded loss x{rise:.3g} (needs >= x{EXCLUDED_RISE:g}), train "
                          f"loss moved {drift:.2f} decades (at most {TRAIN_FLAT_DECADES:g})")
        return out
    out["found"], out["phases"]["circuit_formation"] = 2, [step[m], step[c]]

    if e is None:
        out["why"].append(f"cleanup: the test loss never reaches {low:.3g}")
        return out
    if not step[e] - step[c] < step[c] - step[m]:
        out["why"].append(f"cleanup: {step[e] - step[c]} steps from chance to {low:.3g}, not fewer than circuit "
                          f"formation's {step[c] - step[m]}")
        return out
    out["found"], out["phases"]["cleanup"] = 3, [step[c], step[e]]
    return out


def detect_series(series: dict[str, Sequence[float]], p: int) -> dict[str, Any]:
    """:func:`detect` on a progress series (the keys ``step``, ``train_loss``, ``test_loss``,
    ``excluded_loss`` of :func:`mechscope.tasks.modular.progress_over_training`)."""
    if "excluded_loss" not in series:
        return {"found": 0, "phases": {}, "boundaries": {}, "chance": math.log(p),
                "why": ["no excluded loss recorded (the final model has no key frequencies)"]}
    return detect(series["step"], series["train_loss"], series["test_loss"], series["excluded_loss"], p)


def untrained_series(series: dict[str, Sequence[float]]) -> dict[str, list[float]]:
    """The baseline history of a model that never trains: every snapshot is the first one
    (the initialisation), at the recorded steps."""
    return {k: [v[0]] * len(series["step"]) if k != "step" else list(v)
            for k, v in series.items() if isinstance(v, (list, tuple)) and v}
