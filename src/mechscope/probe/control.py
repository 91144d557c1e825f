"""Controls for probes: control tasks and selectivity, shuffled labels, chance.

A probe's accuracy alone cannot tell "the representation encodes the label" from "the
probe is expressive enough to memorise anything". Two controls, scored by exactly the
same procedure on exactly the same split:

- **control task** (Hewitt & Liang 2019, arXiv 1909.03368): every input *type* (a token,
  an entity, an equivalence class of inputs) gets a random label drawn from the real
  label distribution, fixed per type. A probe can only do well on it by memorising types.
  **Selectivity** = task accuracy - control accuracy.
- **shuffled labels**: the real labels permuted across examples, which keeps the label
  distribution and destroys every relation to the input; its accuracy is chance as the
  probe procedure sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from mechscope.probe.linear import (
    DEFAULT_L2_GRID,
    ProbeError,
    ProbeFit,
    as_activations,
    encode_labels,
    split_indices,
    train_probe,
)


def control_labels(types: Any, labels: Any, seed: int = 0) -> Tensor:
    """One random label per input type, drawn from the real label distribution (per task).

    ``types`` [n] (any integer ids); ``labels`` [n] or [n, m]. Returns labels of the same
    shape whose value depends only on the example's type.
    """
    y = torch.as_tensor(labels)
    t = torch.as_tensor(types)
    if t.dim() != 1 or t.shape[0] != y.shape[0]:
        raise ProbeError(f"types must give one type id per example ([{y.shape[0]}]), got shape {list(t.shape)}; "
                         "a type is what the control label is fixed for (e.g. the token id)")
    _, type_idx = torch.unique(t, return_inverse=True)
    n_types = int(type_idx.max()) + 1
    cols = y[:, None] if y.dim() == 1 else y
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty_like(cols)
    for j in range(cols.shape[1]):
        values, counts = torch.unique(cols[:, j], return_counts=True)
        draw = torch.multinomial(counts.double(), n_types, replacement=True, generator=gen)
        out[:, j] = values[draw][type_idx]
    return out[:, 0] if y.dim() == 1 else out


def shuffled_labels(labels: Any, seed: int = 0) -> Tensor:
    """The labels permuted across examples (rows), the same permutation for every task."""
    y = torch.as_tensor(labels)
    gen = torch.Generator().manual_seed(seed)
    return y[torch.randperm(y.shape[0], generator=gen)]


def selectivity(task_accuracy: float | Tensor, control_accuracy: float | Tensor) -> float | Tensor:
    """Hewitt & Liang's selectivity: task accuracy minus control-task accuracy."""
    return task_accuracy - control_accuracy


@dataclass
class ControlledProbe:
    """A probe and its controls, all on the same split with the same procedure."""

    task: ProbeFit
    control: ProbeFit | None  # None when no types were given (or every control column is constant)
    shuffled: ProbeFit
    control_by_task: Tensor | None = None  # [m] held-out control accuracy per task
    control_balanced_by_task: Tensor | None = None  # [m] held-out control balanced accuracy per task
    split: tuple[Tensor, Tensor, Tensor] | None = None  # the (train, val, test) rows every probe used

    @property
    def accuracy(self) -> float:
        return self.task.accuracy

    @property
    def control_accuracy(self) -> float | None:
        return None if self.control_by_task is None else float(self.control_by_task.mean())

    @property
    def shuffled_accuracy(self) -> float:
        return self.shuffled.accuracy

    @property
    def majority_accuracy(self) -> float:
        return float(self.task.majority_accuracy.mean())

    @property
    def selectivity(self) -> float | None:
        c = self.control_accuracy
        return None if c is None else float(selectivity(self.accuracy, c))

    @property
    def balanced_selectivity(self) -> float | None:
        """Task minus control *balanced* accuracy on the same test rows: the selectivity that
        means something when one class dominates (a property of 2 % of tokens puts plain
        accuracy near 0.98 for any probe, task or control)."""
        task = self.task.test_balanced_accuracy
        if self.control_balanced_by_task is None or task is None:
            return None
        return float(selectivity(task.mean(), self.control_balanced_by_task.mean()))

    def summary(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "balanced_accuracy": self.task.balanced_accuracy,
                "control_accuracy": self.control_accuracy,
                "selectivity": self.selectivity, "balanced_selectivity": self.balanced_selectivity,
                "shuffled_accuracy": self.shuffled_accuracy,
                "majority_accuracy": self.majority_accuracy, "l2": self.task.summary()["l2"]}


def probe_with_controls(x: Any, labels: Any, types: Any = None, *, seed: int = 0,
                        l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                        fractions: Sequence[float] = (0.6, 0.2, 0.2), groups: Any = None,
                        max_iter: int = 500) -> ControlledProbe:
    """Fit the probe, the control-task probe (when ``types`` are given) and the shuffled-label
    probe on one split; compare with :attr:`ControlledProbe.selectivity`."""
    x = as_activations(x)
    encode_labels(labels, x.shape[0])  # validate once, with the user's names for things
    split = split_indices(x.shape[0], fractions, seed, groups)
    kw = dict(l2_grid=l2_grid, split=split, max_iter=max_iter)
    task = train_probe(x, labels, **kw)
    control, by_task, balanced = None, None, None
    if types is not None:
        control, by_task, balanced = _control_probe(x, control_labels(types, labels, seed + 1), kw)
    shuffled = train_probe(x, shuffled_labels(labels, seed + 2), **kw)
    return ControlledProbe(task, control, shuffled, by_task, balanced, tuple(split))


def _control_probe(x: Tensor, control: Tensor, kw: dict[str, Any]) -> tuple[ProbeFit | None, Tensor, Tensor]:
    """Fit the control task: ``(fit, accuracy per task, balanced accuracy per task)``. With few
    types a task's control labels can all be one class; a constant predictor is then exactly
    right, so that task's control accuracy (and balanced accuracy) is 1."""
    cols = control[:, None] if control.dim() == 1 else control
    varied = [j for j in range(cols.shape[1]) if torch.unique(cols[:, j]).numel() > 1]
    by_task = torch.ones(cols.shape[1], dtype=torch.float64)
    balanced = torch.ones(cols.shape[1], dtype=torch.float64)
    if not varied:
        return None, by_task, balanced
    fit = train_probe(x, cols[:, varied] if control.dim() == 2 else control, **kw)
    by_task[varied] = fit.test_accuracy
    if fit.test_balanced_accuracy is not None:
        balanced[varied] = fit.test_balanced_accuracy.double()
    return fit, by_task, balanced
