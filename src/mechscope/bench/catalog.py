"""The one list of modules that register bench checks.

Each module registers its checks with :func:`mechscope.bench.check` when it is imported.
The runner imports them lazily (``mechscope --help`` stays fast); adding a task or a
method to the bench is one line here.
"""

from __future__ import annotations

import importlib


CHECK_MODULES: list[str] = [
    "mechscope.bench.core_checks",
    "mechscope.bench.toy_checks",
    "mechscope.bench.causal_checks",
    "mechscope.bench.spd_checks",
    "mechscope.bench.sae_checks",
    "mechscope.bench.control_checks",
    "mechscope.bench.othello_checks",
]


def load_catalog(modules: list[str] | None = None) -> list[tuple[str, Exception]]:
    """Import every check module (filling ``mechscope.bench.REGISTRY``); return the failures.

    A module that fails to import does not stop the others: the runner reports it as a
    failed row so that the breakage stays visible.
    """
    failures: list[tuple[str, Exception]] = []
    for name in CHECK_MODULES if modules is None else modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import-time error is reported, not fatal
            failures.append((name, e))
    return failures
