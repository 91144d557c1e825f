"""Names a package exports but loads only on first use, so importing it stays cheap.

A package ``__init__`` lists its exports, ``name -> module`` (absolute, or relative to the
package with a leading dot), and installs the two module hooks of PEP 562::

    from mechscope.core.lazy import lazy_exports

    _EXPORTS = {"Alignment": ".alignment", "iia": "mechscope.causal.iia"}
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

``from package import Alignment`` then imports ``package.alignment`` at that moment (and
keeps the value in the package, so the next access is a plain lookup); an unknown name is
the usual ``AttributeError``. This module imports nothing beyond the standard library.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the module ``package`` that load ``exports`` on first use."""
    exports = dict(exports)

    def __getattr__(name: str) -> Any:
        target = exports.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(target, package), name)
        sys.modules[package].__dict__[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(sys.modules[package].__dict__) | set(exports))

    return __getattr__, __dir__


__all__ = ["lazy_exports"]
