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
    "mechscope.bench.induction_checks",
    "mechscope.bench.causal_checks",
    "mechscope.bench.spd_checks",
    "mechscope.bench.sae_checks",
    "mechscope.bench.probe_checks",
    "mechscope.bench.control_checks",
    "mechscope.bench.othello_checks",
    "mechscope.bench.ravel_checks",
    "mechscope.bench.hypothesis_checks",
]


REAL_CHECK_MODULES: list[str] = [
    "mechscope.bench.real_checks",
]
"""The real-model suite (``--suite real``): the reference real model, never in CI's tests."""

SUITES: dict[str, list[str]] = {"default": CHECK_MODULES, "real": REAL_CHECK_MODULES}


def load_catalog(modules: list[str] | None = None, suite: str = "default") -> list[tuple[str, Exception]]:
    """Import every check module of ``suite`` (filling ``mechscope.bench.REGISTRY``), or the
    ``modules`` given; return the failures.

    A module that fails to import does not stop the others: the runner reports it as a
    failed row so that the breakage stays visible.
    """
    failures: list[tuple[str, Exception]] = []
    for name in SUITES[suite] if modules is None else modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import-time error is reported, not fatal
            failures.append((name, e))
    return failures
