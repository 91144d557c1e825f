"""Linear probes: L2-regularised logistic regression on standardised activations.

A probe says whether a label is *linearly decodable* from the activations at a site;
it says nothing about whether the model uses it (that needs an intervention). The fit is
the textbook one, made exact rather than approximate:

- features are standardised with the training split's mean and standard deviation;
- binary labels use one logit (sigmoid), more classes a softmax over all classes;
- the objective is ``mean cross-entropy + l2/2 * ||W||^2`` (the bias is not penalised
  beyond a tiny 1e-6 that keeps it finite for a class absent from the training split);
  it is convex and minimised to convergence with full-batch L-BFGS (float64 by default;
  ``dtype=torch.float32`` halves the time of large multi-task fits);
- the penalty ``l2`` is chosen from a grid by accuracy on a held-out validation split,
  and the probe is then scored on a test split it never saw; when the classes are
  imbalanced (:func:`is_imbalanced`), its balanced accuracy there too (:func:`balanced_accuracy`).

Several labelings of the same activations (``labels`` of shape ``[n, m]``: one column
per task, e.g. the 36 squares of a board) are fitted at once as ``m`` independent
probes sharing the standardisation; each task gets its own penalty from the grid.

Entry points: :func:`train_probe` (split, select the penalty, score) and
:func:`fit_probe` (one fit at a given penalty).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from mechscope.core.collect import RowsError, as_rows

DEFAULT_L2_GRID: tuple[float, ...] = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
_BIAS_L2 = 1e-6


class ProbeError(ValueError):
    """Activations or labels that a probe cannot be fitted on."""


# --------------------------------------------------------------------------- input checks
def as_activations(x: Any, what: str = "activations") -> Tensor:
    """``x`` as a float64 ``[n, d]`` tensor; NaN/inf and wrong ranks are clear errors."""
    try:
        return as_rows(x, what)
    except RowsError as e:
        raise ProbeError(str(e)) from None


def encode_labels(labels: Any, n: int, min_classes: int = 2) -> tuple[Tensor, Tensor]:
    """Labels ``[n]`` or ``[n, m]`` -> (class indices, sorted class values).

    Classes are the sorted distinct values over all tasks, so every task shares one
    label space. Wrong lengths and single-class labels are :class:`ProbeError`.
    """
    y = torch.as_tensor(labels)
    if y.is_floating_point():
        if not bool(torch.isfinite(y).all()) or not bool((y == y.round()).all()):
            raise ProbeError("labels must be integer class ids (or bools); got non-integer floats")
        y = y.long()
    if y.dtype == torch.bool:
        y = y.long()
    if y.dim() not in (1, 2):
        raise ProbeError(f"labels must be [n] or [n, n_tasks], got shape {list(y.shape)}")
    if y.shape[0] != n:
        raise ProbeError(f"labels have {y.shape[0]} entries but the activations have {n} rows; "
                         "give exactly one label per activation row (same order)")
    classes, idx = torch.unique(y, return_inverse=True)
    if classes.numel() < min_classes:
        raise ProbeError(f"labels hold a single class ({classes.tolist()}); a probe needs at least "
                         f"{min_classes} classes to tell apart")
    if y.dim() == 2:
        single = [j for j in range(y.shape[1]) if torch.unique(y[:, j]).numel() < 2]
        if single:
            raise ProbeError(f"label column(s) {single[:8]} hold a single class; drop those tasks "
                             "(a constant label needs no probe)")
    return idx, classes


# --------------------------------------------------------------------------- the fit
def _loss(z: Tensor, w: Tensor, b: Tensor, y: Tensor, l2: Tensor) -> Tensor:
    """Mean cross-entropy (summed over tasks) plus the penalties; z [n, d], w [m, d, c]."""
    logits = torch.einsum("nd,mdc->nmc", z, w) + b  # [n, m, c]
    if w.shape[-1] == 1:  # binary: one logit per task
        ce = torch.nn.functional.binary_cross_entropy_with_logits(logits[..., 0], y.to(logits.dtype), reduction="none")
    else:
        ce = torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), y, reduction="none")  # [n, m]
    penalty = 0.5 * (l2 * w.pow(2).sum(dim=(1, 2))).sum() + 0.5 * _BIAS_L2 * b.pow(2).sum()
    return ce.mean(dim=0).sum() + penalty


@torch.enable_grad()  # callers may be inside torch.no_grad() (e.g. reading activations)
def _lbfgs(z: Tensor, y: Tensor, n_out: int, l2: Tensor, init: tuple[Tensor, Tensor] | None,
           max_iter: int, tol: float) -> tuple[Tensor, Tensor, int, bool]:
    m, d = y.shape[1], z.shape[1]
    w = (init[0].clone() if init else torch.zeros(m, d, n_out, dtype=z.dtype)).requires_grad_(True)
    b = (init[1].clone() if init else torch.zeros(m, n_out, dtype=z.dtype)).requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=tol, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _loss(z, w, b, y, l2)
        loss.backward()
        return loss

    opt.step(closure)
    n_iter = int(opt.state[w].get("n_iter", 0))
    # converged when the gradient is (near) zero: L-BFGS may also stop on a flat change
    w2, b2 = w.detach().requires_grad_(True), b.detach().requires_grad_(True)
    g = torch.autograd.grad(_loss(z, w2, b2, y, l2), [w2, b2])
    gmax = max(float(t.abs().max()) for t in g)
    floor = 1e-6 if z.dtype == torch.float64 else 1e-4  # what the dtype's rounding lets a gradient reach
    return w.detach(), b.detach(), n_iter, gmax <= max(tol * 10, floor)


@dataclass
class LinearProbe:
    """A fitted probe (one or several tasks). ``weight`` [m, d, c], ``bias`` [m, c].

    ``c`` is 1 for binary tasks (one logit: class ``classes[1]`` against ``classes[0]``),
    else the number of classes.
    """

    mean: Tensor  # [d]
    std: Tensor  # [d]
    weight: Tensor  # [m, d, c]
    bias: Tensor  # [m, c]
    classes: Tensor  # [n_classes] original label values
    l2: Tensor  # [m]
    converged: bool = True
    n_iter: int = 0
    single_task: bool = True

    def logits(self, x: Any) -> Tensor:  # [n, d] -> [n, m, c]
        z = (as_activations(x).to(self.weight.dtype) - self.mean) / self.std
        if z.shape[1] != self.weight.shape[1]:
            raise ProbeError(f"the probe was fitted on width {self.weight.shape[1]}, got activations of width {z.shape[1]}")
        return torch.einsum("nd,mdc->nmc", z, self.weight) + self.bias

    def predict_index(self, x: Any) -> Tensor:  # [n, m] class indices
        lg = self.logits(x)
        return (lg[..., 0] > 0).long() if lg.shape[-1] == 1 else lg.argmax(-1)

    def predict(self, x: Any) -> Tensor:
        """Predicted labels (original values), ``[n]`` for one task, else ``[n, m]``."""
        out = self.classes[self.predict_index(x)]
        return out[:, 0] if self.single_task else out

    def log_proba(self, x: Any) -> Tensor:  # [n, m, n_classes]
        lg = self.logits(x)
        if lg.shape[-1] == 1:
            return torch.stack([torch.nn.functional.logsigmoid(-lg[..., 0]), torch.nn.functional.logsigmoid(lg[..., 0])], -1)
        return lg.log_softmax(-1)

    def accuracy(self, x: Any, labels: Any) -> Tensor:  # [m]
        idx = _class_index(labels, self.classes)
        return (self.predict_index(x) == idx).double().mean(0)

    def directions(self) -> Tensor:
        """Directions in the raw activation space, ``[m, d, c]``: ``logits = x @ dir + const``."""
        return self.weight / self.std[None, :, None]

    def direction(self, task: int = 0, cls: int | None = None) -> Tensor:  # [d]
        """One task's direction; for binary probes the one logit's, else class ``cls``'s."""
        dirs = self.directions()[task]
        if dirs.shape[-1] == 1:
            return dirs[:, 0]
        if cls is None:
            raise ProbeError(f"a {dirs.shape[-1]}-class probe has one direction per class; pass cls=")
        return dirs[:, cls]


def _class_index(labels: Any, classes: Tensor) -> Tensor:
    y = torch.as_tensor(labels)
    y = y.long() if y.dtype == torch.bool or y.is_floating_point() else y
    y = y[:, None] if y.dim() == 1 else y
    idx = torch.searchsorted(classes, y.contiguous())
    ok = (idx < classes.numel()) & (classes[idx.clamp(max=classes.numel() - 1)] == y)
    if not bool(ok.all()):
        raise ProbeError(f"labels hold values the probe never saw: {torch.unique(y[~ok]).tolist()[:8]} "
                         f"(known classes: {classes.tolist()})")
    return idx


def standardise(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation per feature (a constant feature keeps scale 1)."""
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    return mean, torch.where(std > 1e-12, std, torch.ones_like(std))


def fit_probe(x: Any, labels: Any, l2: float | Sequence[float] = 1e-3, *, classes: Tensor | None = None,
              max_iter: int = 500, tol: float = 1e-7, init: LinearProbe | None = None,
              dtype: torch.dtype = torch.float64) -> LinearProbe:
    """Fit one probe per task at penalty ``l2`` (a float, or one per task) to convergence."""
    x = as_activations(x).to(dtype)
    if classes is None:
        idx, classes = encode_labels(labels, x.shape[0])
    else:
        idx = _class_index(labels, classes)
    y = idx[:, None] if idx.dim() == 1 else idx
    single = torch.as_tensor(labels).dim() == 1
    mean, std = (init.mean, init.std) if init is not None else standardise(x)
    z = (x - mean) / std
    n_out = 1 if classes.numel() == 2 else classes.numel()
    l2t = torch.as_tensor(l2, dtype=dtype).expand(y.shape[1]).clone()
    start = (init.weight, init.bias) if init is not None else None
    w, b, n_iter, ok = _lbfgs(z, y, n_out, l2t, start, max_iter, tol)
    return LinearProbe(mean, std, w, b, classes, l2t, ok, n_iter, single)


# --------------------------------------------------------------------------- splits and selection
def split_indices(n: int, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0,
                  groups: Any = None) -> list[Tensor]:
    """Random disjoint index sets with the given fractions; whole ``groups`` stay together."""
    if abs(sum(fractions) - 1.0) > 1e-9 or any(f <= 0 for f in fractions):
        raise ProbeError(f"split fractions must be positive and sum to 1, got {tuple(fractions)}")
    gen = torch.Generator().manual_seed(seed)
    if groups is None:
        units, unit_of = n, torch.arange(n)
    else:
        g = torch.as_tensor(groups)
        if g.shape != (n,):
            raise ProbeError(f"groups must give one group id per example ([{n}]), got shape {list(g.shape)}")
        uniq, unit_of = torch.unique(g, return_inverse=True)
        units = uniq.numel()
    if units < len(fractions):
        raise ProbeError(f"{units} examples/groups cannot be split into {len(fractions)} non-empty parts")
    order = torch.randperm(units, generator=gen)
    bounds = [0]
    for f in fractions[:-1]:
        bounds.append(min(units - 1, max(bounds[-1] + 1, round(bounds[-1] + f * units))))
    bounds.append(units)
    part_of_unit = torch.empty(units, dtype=torch.long)
    for p, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        part_of_unit[order[a:b]] = p
    part = part_of_unit[unit_of]
    return [torch.nonzero(part == p).flatten() for p in range(len(fractions))]


@dataclass
class ProbeFit:
    """A probe with its penalty chosen on validation and its held-out accuracy (per task)."""

    probe: LinearProbe
    train_accuracy: Tensor  # [m]
    val_accuracy: Tensor  # [m]
    test_accuracy: Tensor  # [m]
    majority_accuracy: Tensor  # [m] always predicting the training split's most common class
    val_curve: dict[float, Tensor] = field(default_factory=dict)  # l2 -> val accuracy [m]
    test_balanced_accuracy: Tensor | None = None  # [m] mean recall over the classes in the test split
    imbalanced: bool = False  # some task's most common class is over 1.1x its even share (is_imbalanced)

    @property
    def accuracy(self) -> float:
        """Mean held-out (test) accuracy over tasks."""
        return float(self.test_accuracy.mean())

    @property
    def balanced_accuracy(self) -> float | None:
        """Mean held-out balanced accuracy over tasks when the classes are imbalanced, else None."""
        if not self.imbalanced or self.test_balanced_accuracy is None:
            return None
        return float(self.test_balanced_accuracy.mean())

    def summary(self) -> dict[str, Any]:
        return {"test_accuracy": self.accuracy, "balanced_accuracy": self.balanced_accuracy,
                "train_accuracy": float(self.train_accuracy.mean()),
                "val_accuracy": float(self.val_accuracy.mean()), "majority_accuracy": float(self.majority_accuracy.mean()),
                "l2": [float(v) for v in self.probe.l2[:8]], "converged": self.probe.converged,
                "n_tasks": int(self.test_accuracy.numel())}


def balanced_accuracy(pred: Tensor, target: Tensor) -> Tensor:  # [n, m], [n, m] class indices -> [m]
    """Per task, the mean over the classes present in ``target`` of the fraction of that
    class predicted right (recall): chance is 1/classes however skewed the classes are."""
    pred, target = (t[:, None] if t.dim() == 1 else t for t in (pred, target))
    out = []
    for j in range(target.shape[1]):
        t, p = target[:, j], pred[:, j]
        out.append(torch.stack([(p[t == c] == c).double().mean() for c in torch.unique(t)]).mean())
    return torch.stack(out)


def is_imbalanced(labels: Any, ratio: float = 1.1) -> bool:
    """Whether some task's most common class holds more than ``ratio`` times its even share
    (binary labels: more than 55 % of the examples)."""
    y = torch.as_tensor(labels)
    cols = y[:, None] if y.dim() == 1 else y
    for j in range(cols.shape[1]):
        counts = torch.unique(cols[:, j], return_counts=True)[1]
        if float(counts.max()) > ratio * cols.shape[0] / counts.numel():
            return True
    return False


def probe_direction(acts: Any, labels: Any, **probe_options: Any) -> Tensor:  # -> [d]
    """The raw-space weight of a binary L2 logistic probe (``logit = x @ v + const``): the
    direction a steering method takes from a probe (pass it as ``probe_fit`` to
    :func:`mechscope.steer.directions.find_direction`)."""
    fit = train_probe(acts, labels, **probe_options)
    if fit.probe.classes.numel() != 2:
        raise ProbeError(f"a probe direction needs binary labels, got {fit.probe.classes.numel()} classes")
    return fit.probe.direction().float()


def majority_accuracy(train_idx: Tensor, test_idx: Tensor, n_classes: int) -> Tensor:
    """Accuracy on ``test_idx`` [n, m] of the training split's most common class, per task."""
    counts = torch.nn.functional.one_hot(train_idx, n_classes).sum(0)  # [m, classes]
    top = counts.argmax(-1)  # [m]
    return (test_idx == top).double().mean(0)


def train_probe(x: Any, labels: Any, *, l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0, groups: Any = None,
                split: Sequence[Tensor] | None = None, max_iter: int = 500,
                select_by: str = "accuracy", dtype: torch.dtype = torch.float64) -> ProbeFit:
    """Split, fit at every penalty of ``l2_grid``, keep the best on validation (per task), score on test.

    Penalties are visited from strongest to weakest, each fit warm-started from the last.
    ``select_by`` is ``"accuracy"`` (the probe's job: decode the label) or ``"log_loss"``
    (calibrated probabilities, which the online code needs). ``split`` (train, val, test
    index tensors) overrides the random split, so controls can be scored on exactly the
    same examples.
    """
    if select_by not in ("accuracy", "log_loss"):
        raise ProbeError(f"select_by must be 'accuracy' or 'log_loss', got {select_by!r}")
    x = as_activations(x).to(dtype)
    idx, classes = encode_labels(labels, x.shape[0])
    y = idx[:, None] if idx.dim() == 1 else idx
    tr, va, te = split if split is not None else split_indices(x.shape[0], fractions, seed, groups)
    if min(len(tr), len(va), len(te)) == 0:
        raise ProbeError(f"a split is empty (train {len(tr)}, val {len(va)}, test {len(te)}); give more examples")
    grid = sorted({float(v) for v in l2_grid}, reverse=True)
    if not grid or any(v < 0 for v in grid):
        raise ProbeError(f"l2_grid must hold non-negative penalties, got {tuple(l2_grid)}")
    best_acc = torch.full((y.shape[1],), -float("inf"), dtype=torch.float64)  # best validation score
    best_w: Tensor | None = None
    best_b: Tensor | None = None
    best_l2 = torch.zeros(y.shape[1], dtype=dtype)
    curve: dict[float, Tensor] = {}
    prev: LinearProbe | None = None
    converged = True
    for l2 in grid:
        # y holds class indices here, so the fit's label space is 0..K-1 (the values come back below)
        probe = fit_probe(x[tr], y[tr], l2, classes=torch.arange(classes.numel()), max_iter=max_iter, init=prev,
                          dtype=dtype)
        prev, converged = probe, converged and probe.converged
        acc = (probe.predict_index(x[va]) == y[va]).double().mean(0)
        curve[l2] = acc
        score = acc if select_by == "accuracy" else \
            probe.log_proba(x[va]).gather(-1, y[va][..., None])[..., 0].mean(0).double()  # [m] mean log-likelihood
        better = score > best_acc + 1e-12
        best_acc = torch.where(better, score, best_acc)
        best_l2 = torch.where(better, torch.full_like(best_l2, l2), best_l2)
        best_w = probe.weight.clone() if best_w is None else torch.where(better[:, None, None], probe.weight, best_w)
        best_b = probe.bias.clone() if best_b is None else torch.where(better[:, None], probe.bias, best_b)
    final = LinearProbe(prev.mean, prev.std, best_w, best_b, classes, best_l2, converged, prev.n_iter,
                        torch.as_tensor(labels).dim() == 1)

    def acc_on(rows: Tensor) -> Tensor:
        return (final.predict_index(x[rows]) == y[rows]).double().mean(0)

    return ProbeFit(final, acc_on(tr), acc_on(va), acc_on(te),
                    majority_accuracy(y[tr], y[te], classes.numel()), curve,
                    balanced_accuracy(final.predict_index(x[te]), y[te]), is_imbalanced(y))
