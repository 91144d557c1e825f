"""The bench: pre-registered checks of every method on built-in tasks, and their scoreboard.

Register a check (in a module listed in :mod:`mechscope.bench.catalog`)::

    from mechscope.bench import Result, check

    @check("task_name", "method_name", "metric_name", threshold=(">=", 0.9), kind="finding",
           source="where the threshold comes from",
           baselines={"random_subspace": "same metric on a random subspace"})
    def my_check(ctx):            # ctx: CheckContext (seed, full, device, out_dir, log, figures)
        with ctx.figure("iia_per_layer", caption="IIA per layer") as fig:
            fig.add_subplot().plot(layers, iia)
        return Result.proportion(0.97, n=2000, baselines={"random_subspace": 0.5}, detail={"layer": 1})

Run them with ``mechscope bench`` or :func:`mechscope.bench.runner.run_bench`.
"""

from mechscope.bench.context import CheckContext, Result
from mechscope.bench.registry import (
    REGISTRY,
    Amendment,
    Check,
    Criterion,
    Registry,
    RegistryError,
    SelectionError,
    Threshold,
    amended,
    check,
    register_check,
)

__all__ = ["REGISTRY", "Amendment", "Check", "CheckContext", "Criterion", "Registry", "RegistryError",
           "Result", "SelectionError", "Threshold", "amended", "check", "register_check"]
