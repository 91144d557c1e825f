"""What a check receives (:class:`CheckContext`) and what it returns (:class:`Result`)."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mechscope.core.stats import bootstrap_interval, wilson_interval
from mechscope.report import figures as _fig

_FIGURE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Result:
    """One row of the scoreboard, as a check reports it.

    ``value`` is the metric's value (a finite number). ``baselines`` maps a control's name
    (``random_subspace``, ``shuffled_labels``, ``untrained_model``, ``neuron_basis``) to its
    value on the same metric and data. ``detail`` says what distinguishes the row (layer,
    variable, reduced setting, sizes); it must be JSON-serialisable. ``metric`` defaults to
    the check's registered metric; another one must be declared in ``other_metrics``.
    ``n`` is the number of examples the value was computed on, and ``interval`` its 95 %
    confidence interval (accuracies and IIA: :func:`mechscope.core.stats.wilson_interval`;
    other means: ``bootstrap_interval``); the scoreboard keeps both in ``detail``. A finding
    with an interval is reproduced only when the whole interval clears its threshold.
    """

    value: float
    baselines: dict[str, float] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    metric: str | None = None
    n: int | None = None
    interval: tuple[float, float] | None = None

    @classmethod
    def proportion(cls, value: float, n: int, **kwargs: Any) -> "Result":
        """An accuracy or IIA over ``n`` examples, with its Wilson 95 % interval."""
        return cls(float(value), n=int(n), interval=wilson_interval(float(value), int(n)), **kwargs)

    @classmethod
    def mean(cls, values: Any, seed: int, **kwargs: Any) -> "Result":
        """The mean of per-example ``values`` ``[n]``, with n and a seeded bootstrap 95 % interval."""
        return cls(float(values.mean()), n=len(values), interval=bootstrap_interval(values, seed=seed), **kwargs)


@dataclass
class CheckContext:
    """Everything a check may use from the runner.

    ``seed``: the run's seed (torch, numpy and random are already seeded with it);
    ``full``: run the published setting rather than the reduced default one;
    ``device``: where to put models and tensors; ``out_dir``: the bench output directory;
    ``log``: a logger whose lines go to the progress display and ``bench.log``.
    Figures are attached with :meth:`figure` (draw into a fresh matplotlib figure) or
    :meth:`add_figure` (a figure or PNG bytes made elsewhere); they appear in the task's
    section of the report.
    """

    task: str
    method: str
    seed: int
    full: bool
    device: str
    out_dir: Path
    log: logging.Logger
    dtype: str = "float32"  # what the real suite loads the reference model in
    figures: list[dict[str, Any]] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    cache_builds: list[dict[str, Any]] = field(default_factory=list)

    def record_model(self, record: dict[str, Any]) -> None:
        """Put a real model's record (:func:`mechscope.core.load.model_record`: weights SHA-256,
        library versions, dtype) into the scoreboard's ``models``."""
        if record not in self.models:
            self.models.append(record)

    def record_cache_build(self, what: str, seconds: float) -> None:
        """Say that this run built a cache that later runs reuse (an activation store, a
        converted model): the run's summary prints its time apart from the checks'."""
        self.cache_builds.append({"task": self.task, "method": self.method, "what": what,
                                  "seconds": round(float(seconds), 1)})

    @property
    def figures_dir(self) -> Path:
        return self.out_dir / "figures"

    @property
    def can_plot(self) -> bool:
        return _fig.matplotlib_available()

    def world_model(self, world: Any, what: str) -> Any:
        """A built-in world's model (``world``: a :class:`mechscope.tasks.registry.Task`, or
        anything with its ``load``, ``Recipe`` and ``train``): the shipped checkpoint
        (``world.load()``), or under ``--full`` one retrained by its recipe at the run's seed
        (``world.train(world.Recipe(seed))``)."""
        if self.full:
            self.log.info(f"--full: retraining {what} from its recipe")
            return world.train(world.Recipe(seed=self.seed))
        return world.load()

    @contextmanager
    def figure(self, name: str, caption: str = "", **figure_kwargs: Any) -> Iterator[Any]:
        """Draw into a new matplotlib Figure; it is saved and attached when the block ends.

        Without matplotlib the block gets a :class:`~mechscope.report.figures.NullFigure`
        that ignores every call, and the report notes the missing figure.
        """
        if not self.can_plot:
            yield _fig.NullFigure()
            self._record(name, caption, missing=_fig.MISSING_NOTE)
            return
        fig = _fig.new_figure(**figure_kwargs)
        yield fig
        self.add_figure(fig, name, caption)

    def add_figure(self, figure: Any, name: str, caption: str = "") -> Path:
        """Save ``figure`` (a matplotlib Figure or PNG bytes) as ``figures/<task>__<method>__<name>.png``."""
        if not _FIGURE_NAME.match(name):
            raise ValueError(f"figure name {name!r} must be letters, digits, '_', '-' or '.', "
                             f"e.g. 'iia_per_layer'")
        png = _fig.to_png(figure)
        self.figures_dir.mkdir(parents=True, exist_ok=True)
        path = self.figures_dir / f"{self.task}__{self.method}__{name}.png"
        path.write_bytes(png)
        self._record(name, caption, path=path.relative_to(self.out_dir).as_posix())
        return path

    def add_html(self, page: str, name: str, caption: str = "") -> Path:
        """Attach a self-contained HTML page (feature pages, say) as
        ``figures/<task>__<method>__<name>.html``; the report shows it in a sandboxed frame."""
        if not _FIGURE_NAME.match(name):
            raise ValueError(f"attachment name {name!r} must be letters, digits, '_', '-' or '.', e.g. 'feature_pages'")
        self.figures_dir.mkdir(parents=True, exist_ok=True)
        path = self.figures_dir / f"{self.task}__{self.method}__{name}.html"
        path.write_text(page, encoding="utf-8")
        self._record(name, caption, path=path.relative_to(self.out_dir).as_posix())
        return path

    def _record(self, name: str, caption: str, **where: str) -> None:
        self.figures = [f for f in self.figures if f["name"] != name]
        self.figures.append({"task": self.task, "method": self.method, "name": name,
                             "caption": caption, **where})
