"""Figures for the bench and the report, drawn with matplotlib only when asked.

matplotlib is optional (``pip install 'mechscope[plot]'``) and is imported inside these
functions, never when mechscope is imported. Figures are built with
``matplotlib.figure.Figure`` directly (no pyplot, no global state, no GUI backend) and
rendered to PNG bytes with the Agg renderer.
"""

from __future__ import annotations

import importlib.util
import io
from typing import Any

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MISSING_NOTE = "matplotlib is not installed, so this figure was not drawn (pip install 'mechscope[plot]')"


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def new_figure(**kwargs: Any) -> Any:
    """A pyplot-free ``matplotlib.figure.Figure`` (kwargs go to its constructor)."""
    from matplotlib.figure import Figure

    kwargs.setdefault("figsize", (6.0, 3.6))
    kwargs.setdefault("layout", "constrained")
    return Figure(**kwargs)


def to_png(figure: Any, dpi: int = 110) -> bytes:
    """PNG bytes of a matplotlib figure, or ``figure`` itself if it already is PNG bytes."""
    if isinstance(figure, (bytes, bytearray)):
        data = bytes(figure)
        if not data.startswith(PNG_MAGIC):
            raise ValueError("figure bytes are not a PNG image (they do not start with the PNG "
                             "signature); pass a matplotlib Figure or PNG-encoded bytes")
        return data
    if not hasattr(figure, "savefig"):
        raise TypeError(f"a figure must be a matplotlib Figure or PNG bytes, got {type(figure).__name__}")
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=dpi)
    _close(figure)
    return buf.getvalue()


def _close(figure: Any) -> None:
    """Release a figure made with pyplot (figures from :func:`new_figure` need nothing)."""
    import sys

    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(figure)


class NullFigure:
    """Stands in for a figure when matplotlib is missing: every call is accepted and ignored.

    Lets plotting code in a check run unchanged (``fig.add_subplot().plot(x, y)``,
    ``for ax in fig.subplots(2): ...``) so that the check's numbers are still reported.
    """

    def __getattr__(self, name: str) -> "NullFigure":
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> "NullFigure":
        return self

    def __getitem__(self, key: Any) -> "NullFigure":
        return self

    def __iter__(self) -> Any:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __bool__(self) -> bool:
        return False
